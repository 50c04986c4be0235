// Which MCU a Klipper image was built for. Klipper embeds its zlib-compressed data dictionary (klipper.dict JSON,
// with "version" and config.MCU) in klipper.bin (scripts/buildcommands.py); flashtool.py finds it by trying
// zlib.decompress at every offset. We only try offsets that start a valid zlib header, which is far cheaper.
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
    if (!isZlibHeader(buf[offset]!, buf[offset + 1]!)) continue;
    const found = tryDictionaryAt(buf, offset);
    if (found) return found;
  }
  return null;
}

// RFC 1950: CM = 8 (deflate), CINFO <= 7, no preset dictionary, and CMF*256+FLG divisible by 31.
function isZlibHeader(cmf: number, flg: number): boolean {
  return (cmf & 0x0f) === 8 && cmf >> 4 <= 7 && (flg & 0x20) === 0 && ((cmf << 8) | flg) % 31 === 0;
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
