// Moonraker's websocket (`ws://host:port/websocket`): one JSON-RPC message per text frame.
// An api key goes in the X-Api-Key header at upgrade, which Moonraker checks before identify.

import type { Transport, TransportHandlers, TransportOptions } from "./transport.js";

export async function openWebSocketTransport(
  url: string,
  apiKey: string | undefined,
  handlers: TransportHandlers,
  options: TransportOptions,
): Promise<Transport> {
  // Loaded only for websocket endpoints: the default unix socket does not need ws (docs/BENCHMARKS.md).
  const { default: WebSocket } = await import("ws");
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url, {
      headers: apiKey ? { "X-Api-Key": apiKey } : {},
      handshakeTimeout: options.connectTimeoutMs,
    });
    let open = false;
    let closed = false;
    let lastError: Error | undefined;

    socket.on("error", (err) => {
      lastError = err;
      if (!open) reject(err);
    });
    socket.on("message", (data, isBinary) => {
      if (isBinary) return;
      handlers.onMessage(data.toString());
    });
    socket.on("close", () => {
      if (!open || closed) return;
      closed = true;
      handlers.onClose(lastError);
    });
    socket.on("open", () => {
      open = true;
      resolve({
        description: url,
        send(message: string): Promise<void> {
          return new Promise((done, fail) => {
            if (socket.readyState !== WebSocket.OPEN) {
              fail(new Error(`the websocket ${url} is closed`));
              return;
            }
            socket.send(message, (err) => (err ? fail(err) : done()));
          });
        },
        close(): void {
          // terminate, not close: a half-dead peer would otherwise hold the close handshake for 30 s.
          socket.terminate();
        },
      });
    });
  });
}
