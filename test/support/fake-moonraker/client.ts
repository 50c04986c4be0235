// A small JSON-RPC client for tests and the demo: talks to the fake (or a real Moonraker) over the unix socket
// (ETX framing) or the websocket, records every message, and can answer requests when acting as an agent.
import net from "node:net";
import WebSocket from "ws";
import { EtxDecoder, encodeEtxFrame } from "./framing.js";

/** A JSON-RPC error reply, as an Error. */
export class RpcCallError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly data?: unknown,
  ) {
    super(message);
    this.name = "RpcCallError";
  }
}

export interface TestClient {
  call(method: string, params?: unknown): Promise<unknown>;
  notify(method: string, params?: unknown): void;
  readonly notifications: Array<{ method: string; params?: unknown }>;
  /**
   * Resolves with the params of the first matching notification not returned by an earlier
   * waitForNotification, already received or still to come.
   */
  waitForNotification(method: string, pred?: (params: unknown) => boolean, timeoutMs?: number): Promise<unknown>;
  /** Calls `listener` for every notification from now on; returns a function that stops it. */
  onNotification(listener: (method: string, params: unknown) => void): () => void;
  onRequest(handler: (method: string, params: unknown) => unknown | Promise<unknown>): void;
  close(): Promise<void>;
  /** Every message received, in order, as parsed JSON. */
  readonly received: unknown[];
  /** Sends any JSON value as one message, unchanged. */
  sendRaw(message: unknown): void;
  /** Resolves once the connection is closed, from either side. */
  readonly closed: Promise<void>;
  readonly isClosed: boolean;
}

export type TestClientTarget = { socketPath: string } | { wsUrl: string; apiKey?: string };

interface PendingCall {
  resolve(value: unknown): void;
  reject(error: Error): void;
}

interface Link {
  send(text: string): void;
  close(): void;
}

class JsonRpcTestClient implements TestClient {
  readonly received: unknown[] = [];
  readonly notifications: Array<{ method: string; params?: unknown }> = [];
  readonly closed: Promise<void>;
  isClosed = false;
  private readonly pending = new Map<number, PendingCall>();
  private readonly consumed = new Set<number>();
  private readonly waiters = new Set<() => void>();
  private readonly listeners = new Set<(method: string, params: unknown) => void>();
  private requestHandler: ((method: string, params: unknown) => unknown | Promise<unknown>) | null = null;
  private nextId = 1;
  private markClosed!: () => void;

  constructor(private readonly link: Link) {
    this.closed = new Promise((resolve) => (this.markClosed = resolve));
  }

  handleText(text: string): void {
    let message: unknown;
    try {
      message = JSON.parse(text);
    } catch {
      message = { unparsable: text };
    }
    this.received.push(message);
    if (typeof message === "object" && message !== null && !Array.isArray(message)) {
      this.handleMessage(message as Record<string, unknown>);
    }
    for (const wake of [...this.waiters]) wake();
  }

  private handleMessage(msg: Record<string, unknown>): void {
    if (typeof msg.method === "string") {
      // A request (an agent call via server.extensions.request) is answered by the onRequest handler;
      // without one it stays unanswered in `received`, for the test to answer with sendRaw.
      if (msg.id !== undefined && msg.id !== null) {
        if (this.requestHandler !== null) void this.answer(msg.id, msg.method, msg.params, this.requestHandler);
        return;
      }
      this.notifications.push(msg.params === undefined ? { method: msg.method } : { method: msg.method, params: msg.params });
      for (const listener of this.listeners) listener(msg.method, msg.params);
      return;
    }
    if (typeof msg.id !== "number") return;
    const call = this.pending.get(msg.id);
    if (call === undefined) return;
    this.pending.delete(msg.id);
    const error = msg.error as { code?: number; message?: string; data?: unknown } | undefined;
    if (error !== undefined) call.reject(new RpcCallError(error.code ?? 0, error.message ?? "", error.data));
    else call.resolve(msg.result);
  }

  private async answer(
    id: unknown,
    method: string,
    params: unknown,
    handler: (method: string, params: unknown) => unknown | Promise<unknown>,
  ): Promise<void> {
    try {
      const result = await handler(method, params);
      this.sendRaw({ jsonrpc: "2.0", id, result });
    } catch (err) {
      const e = err as { code?: unknown; message?: unknown; data?: unknown };
      const error: Record<string, unknown> = {
        code: typeof e.code === "number" ? e.code : -32000,
        message: typeof e.message === "string" ? e.message : String(err),
      };
      if (e.data !== undefined) error.data = e.data;
      this.sendRaw({ jsonrpc: "2.0", id, error });
    }
  }

  handleClosed(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const call of this.pending.values()) call.reject(new Error("connection closed before the reply arrived"));
    this.pending.clear();
    this.markClosed();
    for (const wake of [...this.waiters]) wake();
  }

  call(method: string, params?: unknown): Promise<unknown> {
    if (this.isClosed) return Promise.reject(new Error(`cannot call ${method}: connection closed`));
    const id = this.nextId++;
    const message: Record<string, unknown> = { jsonrpc: "2.0", method, id };
    if (params !== undefined) message.params = params;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.sendRaw(message);
    });
  }

  notify(method: string, params?: unknown): void {
    const message: Record<string, unknown> = { jsonrpc: "2.0", method };
    if (params !== undefined) message.params = params;
    this.sendRaw(message);
  }

  sendRaw(message: unknown): void {
    if (!this.isClosed) this.link.send(JSON.stringify(message));
  }

  onNotification(listener: (method: string, params: unknown) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  waitForNotification(method: string, pred: (params: unknown) => boolean = () => true, timeoutMs = 2000): Promise<unknown> {
    const find = (): { found: true; params: unknown } | { found: false } => {
      for (let i = 0; i < this.notifications.length; i++) {
        const n = this.notifications[i];
        if (n === undefined || this.consumed.has(i) || n.method !== method || !pred(n.params)) continue;
        this.consumed.add(i);
        return { found: true, params: n.params };
      }
      return { found: false };
    };
    return new Promise((resolve, reject) => {
      const check = (): void => {
        const hit = find();
        if (hit.found) {
          cleanup();
          resolve(hit.params);
        } else if (this.isClosed) {
          cleanup();
          reject(new Error(`connection closed while waiting for ${method}`));
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        const seen = this.notifications.map((n) => n.method).join(", ");
        reject(new Error(`no ${method} notification within ${timeoutMs} ms (received: ${seen || "none"})`));
      }, timeoutMs);
      const cleanup = (): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      this.waiters.add(check);
      check();
    });
  }

  onRequest(handler: (method: string, params: unknown) => unknown | Promise<unknown>): void {
    this.requestHandler = handler;
  }

  close(): Promise<void> {
    if (!this.isClosed) this.link.close();
    return this.closed;
  }
}

/** Opens a connection; the returned client is ready to send. */
export async function connectTestClient(target: TestClientTarget): Promise<TestClient> {
  if ("socketPath" in target) return connectUnix(target.socketPath);
  return connectWebsocket(target.wsUrl, target.apiKey);
}

function connectUnix(socketPath: string): Promise<TestClient> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const decoder = new EtxDecoder();
    const client = new JsonRpcTestClient({
      send: (text) => socket.write(encodeEtxFrame(text)),
      close: () => socket.end(),
    });
    socket.on("data", (chunk: Buffer) => {
      for (const frame of decoder.push(chunk)) client.handleText(frame);
    });
    socket.on("close", () => client.handleClosed());
    // Errors after connecting surface as "close"; before it, they fail the connect.
    socket.on("error", (err) => reject(err));
    socket.once("connect", () => resolve(client));
  });
}

function connectWebsocket(url: string, apiKey: string | undefined): Promise<TestClient> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = apiKey ? { "X-Api-Key": apiKey } : {};
    const ws = new WebSocket(url, { headers });
    const client = new JsonRpcTestClient({ send: (text) => ws.send(text), close: () => ws.close() });
    ws.on("message", (data) => client.handleText(data.toString()));
    ws.on("close", () => client.handleClosed());
    // Errors after the upgrade surface as "close"; before it, they fail the connect.
    ws.on("error", (err) => reject(err));
    ws.once("open", () => resolve(client));
  });
}
