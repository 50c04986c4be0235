// The connection to Moonraker: connect, identify as an agent, register remote methods, answer calls, and keep
// doing so across Moonraker restarts (backoff, plus a watch on the unix socket file). What is done with the
// connection once it is up (following Klipper, services) belongs to the session's other parts.

import { watch, existsSync, type FSWatcher } from "node:fs";
import { basename, dirname } from "node:path";
import type { Logger } from "pino";
import { MoonflashError } from "../core/errors.js";
import { asRecord } from "./klipper-tracker.js";
import { errorText, unavailable } from "./failures.js";
import { MoonrakerRpcError, RpcPeer, type IncomingCall } from "./rpc.js";
import { describeEndpoint, type MoonrakerEndpoint } from "./transport.js";

export interface ConnectionOptions {
  endpoint: MoonrakerEndpoint;
  clientName: string;
  version: string;
  url: string;
  /** Remote method names to register; the same names answer `server.extensions.request`. */
  methods: string[];
  onCall(method: string, params: Record<string, unknown>, info: { viaMacro: boolean }): Promise<unknown>;
  logger: Logger;
  /** Reconnect backoff; defaults 250 ms doubling to 10 s. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Limit for one request to Moonraker; default 30 s. */
  requestTimeoutMs?: number;
}

/** What the session plugs into every connection. */
export interface ConnectionHooks {
  /** Notification handlers for a new peer, installed before it connects so nothing is missed. */
  install(peer: RpcPeer, isCurrent: () => boolean): void;
  /** After identify and registration, before the connection counts as identified: read the state. */
  synchronise(peer: RpcPeer, isCurrent: () => boolean): Promise<void>;
  identified(): void;
  /** The connection closed; `wasIdentified` tells a lost session from a failed attempt. */
  lost(wasIdentified: boolean): void;
}

const DEFAULT_BACKOFF_INITIAL_MS = 250;
const DEFAULT_BACKOFF_MAX_MS = 10_000;
const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
const MAX_CONNECT_TIMEOUT_MS = 10_000;
const DUPLICATE_AGENT = /already registered and connected/i;

export class MoonrakerConnection {
  connectionId: number | null = null;
  readonly endpointName: string;

  private readonly log: Logger;
  private readonly backoffInitialMs: number;
  private readonly backoffMaxMs: number;
  private readonly requestTimeoutMs: number;
  private running = false;
  /** The open connection (identified or still in the handshake); null between connections. */
  private peer: RpcPeer | null = null;
  /** The connection once Moonraker accepted our identify. */
  private callablePeer: RpcPeer | null = null;
  private isIdentified = false;
  private connectAttempt: Promise<void> | null = null;
  private attempts = 0;
  private reconnectDelayMs: number;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private socketWatcher: FSWatcher | null = null;
  /** One warning per outage; the flag clears on the next successful identify. */
  private outageReported = false;
  private duplicateReported = false;

  constructor(
    private readonly opts: ConnectionOptions,
    private readonly hooks: ConnectionHooks,
  ) {
    this.log = opts.logger;
    this.endpointName = describeEndpoint(opts.endpoint);
    this.backoffInitialMs = opts.backoff?.initialMs ?? DEFAULT_BACKOFF_INITIAL_MS;
    this.backoffMaxMs = Math.max(opts.backoff?.maxMs ?? DEFAULT_BACKOFF_MAX_MS, this.backoffInitialMs);
    this.requestTimeoutMs = opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.reconnectDelayMs = this.backoffInitialMs;
  }

  get identified(): boolean {
    return this.isIdentified;
  }

  /** The open connection, identified or not; null between connections. */
  get current(): RpcPeer | null {
    return this.peer;
  }

  /** The connection requests may go out on (identified, or in the handshake after identify). */
  requirePeer(): RpcPeer {
    if (!this.peer || this.callablePeer !== this.peer) {
      throw unavailable(`moonflash is not connected to Moonraker at ${this.endpointName} right now`);
    }
    return this.peer;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.reconnectDelayMs = this.backoffInitialMs;
    this.beginConnect();
  }

  /** Closes the connection and stops reconnecting. */
  async stop(): Promise<void> {
    this.running = false;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.unwatchSocket();
    const peer = this.peer;
    if (peer?.isOpen) {
      const closed = new Promise<void>((resolve) => peer.onClose(() => resolve()));
      peer.close();
      await closed;
    }
    await this.connectAttempt;
  }

  private beginConnect(): void {
    this.reconnectTimer = null;
    if (!this.running) return;
    this.connectAttempt = this.connectOnce().finally(() => {
      this.connectAttempt = null;
    });
  }

  private async connectOnce(): Promise<void> {
    const attempt = ++this.attempts;
    const peer = new RpcPeer({
      logger: this.log,
      requestTimeoutMs: this.requestTimeoutMs,
      connectTimeoutMs: Math.min(this.requestTimeoutMs, MAX_CONNECT_TIMEOUT_MS),
    });
    const isCurrent = (): boolean => peer === this.peer;
    for (const method of this.opts.methods) peer.handle(method, (call) => this.dispatchCall(call));
    this.hooks.install(peer, isCurrent);
    peer.onClose((error) => this.handleClosed(peer, error));
    this.log.debug({ attempt, endpoint: this.endpointName }, "connecting to Moonraker");
    try {
      await peer.connect(this.opts.endpoint);
    } catch (err) {
      this.reportOutage(`cannot reach Moonraker at ${this.endpointName}: ${errorText(err)}; retrying`, err);
      this.scheduleReconnect();
      return;
    }
    if (!this.running) {
      peer.close();
      return;
    }
    this.peer = peer;
    try {
      await this.handshake(peer, isCurrent);
    } catch (err) {
      if (!isCurrent()) return;
      if (err instanceof MoonrakerRpcError && DUPLICATE_AGENT.test(err.message)) {
        this.reportDuplicate();
      } else {
        this.reportOutage(`the Moonraker handshake failed: ${errorText(err)}; retrying`, err);
      }
      // Moonraker keeps a refused socket marked as identified, so only a fresh connection can try again.
      peer.close();
    }
  }

  private async handshake(peer: RpcPeer, isCurrent: () => boolean): Promise<void> {
    const { clientName, version, url } = this.opts;
    const identity = await peer.request<{ connection_id?: unknown }>("server.connection.identify", {
      client_name: clientName,
      version,
      type: "agent",
      url,
    });
    // Calls may go out from here on: a macro can call us as soon as a method is registered, before the rest of
    // the handshake finishes, and its console reply must not be refused.
    this.callablePeer = peer;
    for (const methodName of this.opts.methods) {
      try {
        await peer.request("connection.register_remote_method", { method_name: methodName });
      } catch (err) {
        if (!(err instanceof MoonrakerRpcError)) throw err;
        // Another agent (or Moonraker itself) owns the name; the other methods still work.
        this.log.error(
          { method: methodName, reason: err.message },
          `Moonraker refused the remote method '${methodName}'; macros cannot call it until the owner releases it`,
        );
      }
    }
    await this.hooks.synchronise(peer, isCurrent);
    if (!isCurrent()) return;
    this.isIdentified = true;
    this.connectionId = typeof identity.connection_id === "number" ? identity.connection_id : null;
    this.reconnectDelayMs = this.backoffInitialMs;
    this.log.info(
      { endpoint: this.endpointName, connectionId: this.connectionId },
      this.outageReported ? "reconnected to Moonraker" : "connected to Moonraker",
    );
    this.outageReported = false;
    this.duplicateReported = false;
    this.unwatchSocket();
    this.hooks.identified();
  }

  private handleClosed(peer: RpcPeer, error?: Error): void {
    if (peer !== this.peer) return;
    this.peer = null;
    const wasIdentified = this.isIdentified;
    this.isIdentified = false;
    this.connectionId = null;
    if (wasIdentified) {
      if (this.running) {
        this.log.warn({ endpoint: this.endpointName, err: error }, "lost the Moonraker connection; reconnecting");
        this.outageReported = true;
      } else {
        this.log.debug("Moonraker connection closed");
      }
    }
    this.hooks.lost(wasIdentified);
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (!this.running || this.reconnectTimer) return;
    const jitter = 0.8 + Math.random() * 0.4;
    const delay = Math.round(Math.min(this.reconnectDelayMs * jitter, this.backoffMaxMs));
    this.reconnectDelayMs = Math.min(this.reconnectDelayMs * 2, this.backoffMaxMs);
    this.log.debug({ delayMs: delay }, "reconnecting to Moonraker after a pause");
    this.reconnectTimer = setTimeout(() => this.beginConnect(), delay);
    this.watchSocket();
  }

  /**
   * With the unix socket, Moonraker's restart is visible as its socket file being replaced: start the backoff over
   * from its shortest pause instead of waiting out one that may have grown to 10 s. Not "connect now": a real
   * Moonraker creates the file a moment before it accepts, and a refused attempt would earn the long pause again.
   */
  private watchSocket(): void {
    const endpoint = this.opts.endpoint;
    if (endpoint.kind !== "unix" || this.socketWatcher) return;
    try {
      this.socketWatcher = watch(dirname(endpoint.path), (_event, name) => {
        if (name !== basename(endpoint.path) || !this.reconnectTimer || !existsSync(endpoint.path)) return;
        if (this.reconnectDelayMs <= this.backoffInitialMs * 2) return; // already retrying quickly
        clearTimeout(this.reconnectTimer);
        this.reconnectTimer = null;
        this.reconnectDelayMs = this.backoffInitialMs;
        this.log.debug("Moonraker's socket was replaced; retrying with a short pause");
        this.scheduleReconnect();
      });
      this.socketWatcher.on("error", () => this.unwatchSocket());
    } catch {
      // No comms directory yet: the backoff alone retries.
    }
  }

  private unwatchSocket(): void {
    this.socketWatcher?.close();
    this.socketWatcher = null;
  }

  private reportOutage(message: string, err: unknown): void {
    if (this.outageReported) {
      this.log.debug({ err }, message);
      return;
    }
    this.outageReported = true;
    this.log.warn({ endpoint: this.endpointName, reason: errorText(err) }, message);
  }

  private reportDuplicate(): void {
    if (this.duplicateReported) {
      this.log.debug("Moonraker still has another agent with our name");
      return;
    }
    this.duplicateReported = true;
    this.outageReported = true;
    this.log.error(
      { name: this.opts.clientName },
      `another moonflash agent is connected to Moonraker as '${this.opts.clientName}'; ` +
        "stop the other one (only one may run per printer). Retrying with backoff until it goes away.",
    );
  }

  /** Requests (server.extensions.request) get a non-null result; macro notifications never get an answer. */
  private async dispatchCall(call: IncomingCall): Promise<unknown> {
    const params = call.params === undefined || call.params === null ? {} : asRecord(call.params);
    if (!params) {
      throw new MoonflashError(
        "INVALID_PARAMS",
        `${call.method} takes named arguments (a JSON object), not a list. Pass {"name": value, ...}.`,
        { method: call.method },
      );
    }
    const viaMacro = !call.expectsReply;
    this.log.debug({ method: call.method, viaMacro }, "call from Moonraker");
    const result = await this.opts.onCall(call.method, params, { viaMacro });
    if (viaMacro) return undefined;
    // Moonraker treats a null result as an agent error.
    return result ?? "ok";
  }
}
