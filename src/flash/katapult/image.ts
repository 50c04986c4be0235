// Which MCU a Klipper image was built for. Klipper embeds its zlib-compressed data dictionary (klipper.dict JSON,
// with "version" and config.MCU) in klipper.bin (scripts/buildcommands.py); flashtool.py finds it by trying
// zlib.decompress at every offset. We only try offsets that start a valid zlib header whose first deflate block can
// begin with '{' (mayStartDictionary), which is far cheaper.
//
// node:zlib is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

export interface ImageMcu {
  mcu: string;
  version: string;
}

/** Klipper's dictionary is a few tens of KiB; anything that inflates past this is not it. */
const MAX_DICTIONARY_BYTES = 4 * 1024 * 1024;

/** Finds the embedded Klipper dictionary and returns its MCU and version, or null when the image has none. */
export function detectImageMcu(image: Uint8Array): ImageMcu | null {
  const buf = Buffer.from(image.buffer, image.byteOffset, image.byteLength);
  for (let offset = 0; offset + 2 <= buf.length; offset++) {
    if (!isZlibHeader(buf[offset]!, buf[offset + 1]!) || !mayStartDictionary(buf, offset + 2)) continue;
    const found = tryDictionaryAt(buf, offset);
    if (found) return found;
  }
  return null;
}

// RFC 1950: CM = 8 (deflate), CINFO <= 7, no preset dictionary, and CMF*256+FLG divisible by 31.
function isZlibHeader(cmf: number, flg: number): boolean {
  return (cmf & 0x0f) === 8 && cmf >> 4 <= 7 && (flg & 0x20) === 0 && ((cmf << 8) | flg) % 31 === 0;
}

/**
 * Whether the deflate data at `start` can begin Klipper's dictionary, judged from its first block header without
 * zlib. About one offset in 2000 of random firmware bytes passes isZlibHeader (some 130 in a 256 KiB image), and
 * every inflateSync leaves a native inflate state of about 20 KiB until the next garbage collection: measured
 * +2.9 MiB RSS for 130 tries. This test lets through what zlib could inflate into a text starting with '{'.
 */
function mayStartDictionary(buf: Buffer, start: number): boolean {
  // Room for the longest header checked here: 3 + 14 + 19 * 3 bits (a dynamic block).
  if (start + 10 > buf.length) return false;
  let bit = start * 8;
  // Deflate packs header fields least significant bit first, Huffman codes most significant bit first.
  const read = (count: number): number => {
    let value = 0;
    for (let i = 0; i < count; i++, bit++) value |= ((buf[bit >> 3]! >> (bit & 7)) & 1) << i;
    return value;
  };
  read(1); // BFINAL
  switch (read(2)) {
    case 0: {
      // Stored: LEN and its one's complement NLEN from the next byte boundary, then the text itself.
      const at = (bit + 7) >> 3;
      if (at + 5 > buf.length) return false;
      return buf.readUInt16LE(at) === (buf.readUInt16LE(at + 2) ^ 0xffff) && buf[at + 4] === 0x7b;
    }
    case 1: {
      // Fixed codes: the first symbol must be the literal '{', code 0x30 + 0x7b in 8 bits.
      let code = 0;
      for (let i = 0; i < 8; i++) code = (code << 1) | read(1);
      return code === 0x30 + 0x7b;
    }
    case 2: {
      // Dynamic: zlib's limits on the symbol counts, and a code-length code that is complete (zlib refuses one
      // that is over-subscribed or incomplete).
      const literals = read(5) + 257;
      const distances = read(5) + 1;
      const lengths = read(4) + 4;
      if (literals > 286 || distances > 30) return false;
      const perLength = [0, 0, 0, 0, 0, 0, 0, 0];
      for (let i = 0; i < lengths; i++) perLength[read(3)]!++;
      let left = 1;
      for (let length = 1; length <= 7; length++) {
        left = 2 * left - perLength[length]!;
        if (left < 0) return false;
      }
      return left === 0;
    }
    default:
      return false;
  }
}

function tryDictionaryAt(buf: Buffer, offset: number): ImageMcu | null {
  let text: string;
  try {
    // inflateSync stops at the end of the zlib stream and ignores the firmware bytes after it.
    text = process.getBuiltinModule("node:zlib").inflateSync(buf.subarray(offset), { maxOutputLength: MAX_DICTIONARY_BYTES }).toString("utf8");
  } catch {
    return null;
  }
  if (!text.startsWith("{")) return null;
  try {
    const dict = JSON.parse(text) as { version?: unknown; config?: { MCU?: unknown } };
    const mcu = dict.config?.MCU;
    if (typeof mcu === "string" && typeof dict.version === "string") return { mcu, version: dict.version };
  } catch {
    return null;
  }
  return null;
}
