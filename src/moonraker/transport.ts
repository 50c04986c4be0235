// One text-message transport to Moonraker, whatever the wire: the JSON-RPC peer only sees whole messages.
// Moonraker offers the same API over its unix socket (ETX-framed) and its websocket.

import { openUnixTransport } from "./unix-transport.js";
import { openWebSocketTransport } from "./ws-transport.js";

export type MoonrakerEndpoint = { kind: "unix"; path: string } | { kind: "ws"; url: string; apiKey?: string };

export interface TransportHandlers {
  /** One whole JSON-RPC message as text. */
  onMessage(message: string): void;
  /** Called once when an open transport closes, for any reason (error when it broke rather than closed). */
  onClose(error?: Error): void;
}

export interface Transport {
  /** Where this transport is connected, for logs. */
  readonly description: string;
  /** Rejects when the transport is closed or the write fails. */
  send(message: string): Promise<void>;
  /** Idempotent; `onClose` follows. */
  close(): void;
}

export interface TransportOptions {
  connectTimeoutMs: number;
}

/** Handlers are given before connecting so that no message can arrive before someone listens. */
export function openTransport(
  endpoint: MoonrakerEndpoint,
  handlers: TransportHandlers,
  options: TransportOptions,
): Promise<Transport> {
  if (endpoint.kind === "unix") return openUnixTransport(endpoint.path, handlers, options);
  return openWebSocketTransport(endpoint.url, endpoint.apiKey, handlers, options);
}

export function describeEndpoint(endpoint: MoonrakerEndpoint): string {
  return endpoint.kind === "unix" ? `unix:${endpoint.path}` : endpoint.url;
}
