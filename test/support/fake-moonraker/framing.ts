// Moonraker's unix socket frames every JSON-RPC message with a trailing ETX byte, in both directions.

export const ETX = 0x03;

/** Encodes one message's JSON text as it goes on the unix socket: the text, then ETX. */
export function encodeEtxFrame(json: string): Buffer {
  return Buffer.concat([Buffer.from(json, "utf8"), Buffer.from([ETX])]);
}

/** Splits a byte stream into ETX-terminated frames; keeps an unterminated tail for the next chunk. */
export class EtxDecoder {
  private tail: Buffer = Buffer.alloc(0);

  /** Returns the text of every frame completed by this chunk, in order. */
  push(chunk: Buffer): string[] {
    const data = this.tail.length > 0 ? Buffer.concat([this.tail, chunk]) : chunk;
    const frames: string[] = [];
    let start = 0;
    for (let end = data.indexOf(ETX, start); end !== -1; end = data.indexOf(ETX, start)) {
      frames.push(data.subarray(start, end).toString("utf8"));
      start = end + 1;
    }
    this.tail = Buffer.from(data.subarray(start));
    return frames;
  }
}
