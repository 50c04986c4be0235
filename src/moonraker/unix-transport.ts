// Moonraker's unix socket: every JSON-RPC message is followed by ETX (0x03), in both directions.
// A read may hold several messages or part of one, so bytes are buffered until the next ETX.

import net from "node:net";
import type { Transport, TransportHandlers, TransportOptions } from "./transport.js";

export const ETX = 0x03;

/** Splits a byte stream into ETX-terminated messages. ETX never occurs inside UTF-8 multi-byte sequences. */
export class EtxDecoder {
  private pending: Buffer[] = [];

  /** Returns every message completed by this chunk, in order; keeps the unfinished tail. */
  push(chunk: Buffer): string[] {
    const messages: string[] = [];
    let start = 0;
    for (let end = chunk.indexOf(ETX, start); end !== -1; end = chunk.indexOf(ETX, start)) {
      this.pending.push(chunk.subarray(start, end));
      const message = Buffer.concat(this.pending).toString("utf8");
      this.pending = [];
      if (message.trim() !== "") messages.push(message);
      start = end + 1;
    }
    if (start < chunk.length) this.pending.push(chunk.subarray(start));
    return messages;
  }
}

export function encodeEtx(message: string): Buffer {
  return Buffer.concat([Buffer.from(message, "utf8"), Buffer.of(ETX)]);
}

export function openUnixTransport(
  path: string,
  handlers: TransportHandlers,
  options: TransportOptions,
): Promise<Transport> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path });
    const decoder = new EtxDecoder();
    let open = false;
    let closed = false;
    let lastError: Error | undefined;

    const connectTimer = setTimeout(() => {
      socket.destroy(new Error(`connecting to ${path} timed out after ${options.connectTimeoutMs} ms`));
    }, options.connectTimeoutMs);

    socket.on("error", (err) => {
      lastError = err;
      if (!open) {
        clearTimeout(connectTimer);
        reject(err);
      }
    });
    socket.on("data", (chunk: Buffer) => {
      for (const message of decoder.push(chunk)) handlers.onMessage(message);
    });
    socket.on("close", () => {
      clearTimeout(connectTimer);
      if (!open || closed) return;
      closed = true;
      handlers.onClose(lastError);
    });
    socket.on("connect", () => {
      clearTimeout(connectTimer);
      open = true;
      resolve({
        description: `unix:${path}`,
        send(message: string): Promise<void> {
          return new Promise((done, fail) => {
            if (closed || socket.destroyed) {
              fail(new Error(`the socket ${path} is closed`));
              return;
            }
            socket.write(encodeEtx(message), (err) => (err ? fail(err) : done()));
          });
        },
        close(): void {
          socket.destroy();
        },
      });
    });
  });
}
