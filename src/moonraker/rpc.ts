// The JSON-RPC peer over one transport: we call Moonraker and Moonraker calls us (agent methods, notify_*).
// Replies are matched by id, so out-of-order answers are fine. A closed connection fails every pending
// call with MOONRAKER_UNAVAILABLE; an error *answer* from Moonraker becomes a MoonrakerRpcError.

import {
  JSONRPCClient,
  JSONRPCErrorException,
  JSONRPCServer,
  JSONRPCServerAndClient,
  createJSONRPCErrorResponse,
  createJSONRPCSuccessResponse,
  type JSONRPCRequest,
} from "json-rpc-2.0";
import type { Logger } from "pino";
import { MoonflashError, toJsonRpcError } from "../core/errors.js";
import { describeEndpoint, openTransport, type MoonrakerEndpoint, type Transport } from "./transport.js";

/** Moonraker answered a request with a JSON-RPC error object (its code is HTTP-like: 400, 503, -32601 …). */
export class MoonrakerRpcError extends Error {
  readonly method: string;
  readonly code: number;
  readonly data: unknown;

  constructor(method: string, code: number, message: string, data?: unknown) {
    super(message);
    this.name = "MoonrakerRpcError";
    this.method = method;
    this.code = code;
    this.data = data;
  }
}

export interface IncomingCall {
  method: string;
  /** As sent: an object, an array (notify_* params) or undefined when absent. */
  params: unknown;
  /** False for JSON-RPC notifications, which must never be answered. */
  expectsReply: boolean;
}

/** Returns the result for calls that expect a reply; throwing sends the error from `toJsonRpcError`. */
export type IncomingHandler = (call: IncomingCall) => Promise<unknown>;

export interface RpcPeerOptions {
  logger: Logger;
  requestTimeoutMs: number;
  connectTimeoutMs: number;
}

// The json-rpc-2.0 client reports its own failures (timeouts, lost connection) with code 0; Moonraker never does.
const LOCAL_FAILURE_CODE = 0;

export class RpcPeer {
  private readonly peer: JSONRPCServerAndClient<void, void>;
  private readonly log: Logger;
  private transport: Transport | null = null;
  private closed = false;
  private closeListeners: Array<(error?: Error) => void> = [];

  constructor(private readonly options: RpcPeerOptions) {
    this.log = options.logger;
    const errorListener = (message: string, data: unknown): void => {
      this.log.debug({ data }, message);
    };
    this.peer = new JSONRPCServerAndClient(
      new JSONRPCServer<void>({ errorListener }),
      new JSONRPCClient<void>((payload) => this.sendPayload(payload)),
      { errorListener },
    );
  }

  /** Registers `handler` for incoming `method` (requests and notifications alike). Register before connect(). */
  handle(method: string, handler: IncomingHandler): void {
    this.peer.addMethodAdvanced(method, async (request: JSONRPCRequest) => {
      const expectsReply = request.id !== undefined;
      const call: IncomingCall = { method, params: request.params, expectsReply };
      try {
        const result = await handler(call);
        return expectsReply ? createJSONRPCSuccessResponse(request.id ?? null, result) : null;
      } catch (err) {
        if (!expectsReply) {
          this.log.warn({ err, method }, "handling a notification from Moonraker failed");
          return null;
        }
        const error = toJsonRpcError(err);
        return createJSONRPCErrorResponse(request.id ?? null, error.code, error.message, error.data);
      }
    });
  }

  onClose(listener: (error?: Error) => void): void {
    this.closeListeners.push(listener);
  }

  async connect(endpoint: MoonrakerEndpoint): Promise<void> {
    this.transport = await openTransport(
      endpoint,
      {
        onMessage: (message) => this.receive(message),
        onClose: (error) => this.handleClosed(error),
      },
      { connectTimeoutMs: this.options.connectTimeoutMs },
    );
    this.log.debug({ endpoint: describeEndpoint(endpoint) }, "transport open");
  }

  get isOpen(): boolean {
    return this.transport !== null && !this.closed;
  }

  /** Calls `method` on Moonraker. Rejects with MoonrakerRpcError for an error answer, MOONRAKER_UNAVAILABLE otherwise. */
  async request<T = unknown>(method: string, params?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    if (!this.isOpen) throw unavailable(`the Moonraker connection is closed, so ${method} was not sent`, method);
    const limit = timeoutMs ?? this.options.requestTimeoutMs;
    try {
      return (await this.peer.timeout(limit).request(method, params, undefined)) as T;
    } catch (err) {
      if (err instanceof JSONRPCErrorException && err.code !== LOCAL_FAILURE_CODE) {
        throw new MoonrakerRpcError(method, err.code, err.message, err.data);
      }
      if (this.closed) throw unavailable(`the Moonraker connection closed while ${method} was pending`, method);
      const reason = err instanceof Error ? err.message : String(err);
      throw unavailable(`Moonraker did not answer ${method} (${reason}, limit ${limit} ms)`, method);
    }
  }

  /** Sends a notification (no id, no answer on success). */
  notify(method: string, params?: Record<string, unknown>): void {
    if (this.isOpen) this.peer.notify(method, params, undefined);
  }

  close(): void {
    this.transport?.close();
  }

  private async sendPayload(payload: unknown): Promise<void> {
    if (!this.transport || this.closed) throw new Error("the Moonraker connection is closed");
    await this.transport.send(JSON.stringify(payload));
  }

  private receive(message: string): void {
    let payload: unknown;
    try {
      payload = JSON.parse(message);
    } catch {
      this.log.warn({ message: message.slice(0, 200) }, "Moonraker sent a message that is not JSON; ignored");
      return;
    }
    if (typeof payload !== "object" || payload === null) {
      this.log.warn({ message: message.slice(0, 200) }, "Moonraker sent a message that is not JSON-RPC; ignored");
      return;
    }
    this.peer.receiveAndSend(payload, undefined, undefined).catch((err: unknown) => {
      this.log.debug({ err }, "could not process or answer a message from Moonraker");
    });
  }

  private handleClosed(error?: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.peer.rejectAllPendingRequests("the Moonraker connection closed");
    for (const listener of this.closeListeners) listener(error);
  }
}

function unavailable(message: string, method: string): MoonflashError {
  return new MoonflashError(
    "MOONRAKER_UNAVAILABLE",
    `${message}. Check that Moonraker is running; moonflash reconnects by itself.`,
    { method },
  );
}
