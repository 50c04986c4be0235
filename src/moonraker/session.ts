// The agent's Moonraker session: connect, identify as an agent, register remote methods, follow Klipper,
// answer calls from the web UI and from macros, and keep doing so across Moonraker restarts.
// It implements PrinterPort, so engines talk to "the printer" and never see JSON-RPC.

import { watch, existsSync, type FSWatcher } from "node:fs";
import { basename, dirname } from "node:path";
import { EventEmitter } from "node:events";
import type { Logger } from "pino";
import { MoonflashError } from "../core/errors.js";
import type {
  CanbusNode,
  McuInfo,
  McuReport,
  PrinterPort,
  PrinterState,
  SerialPeripheral,
  ServiceState,
} from "../core/printer.js";
import { KlipperTracker, asRecord, type ServerInfo, type SystemInfo } from "./klipper-tracker.js";
import { MoonrakerRpcError, RpcPeer, type IncomingCall } from "./rpc.js";
import { describeEndpoint, type MoonrakerEndpoint } from "./transport.js";

export type { MoonrakerEndpoint } from "./transport.js";

export interface AgentSessionOptions {
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

const DEFAULT_BACKOFF_INITIAL_MS = 250;
const DEFAULT_BACKOFF_MAX_MS = 10_000;
const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
const MAX_CONNECT_TIMEOUT_MS = 10_000;
// Moonraker sends nothing when Klipper reaches startup or error, so we ask, like Mainsail does.
const KLIPPY_POLL_INITIAL_MS = 500;
const KLIPPY_POLL_MAX_MS = 5_000;
const DEFAULT_STOP_TIMEOUT_MS = 60_000;
const DEFAULT_START_TIMEOUT_MS = 120_000;
// The service request itself may take as long as the wait; the wait, not the request, reports the timeout.
const SERVICE_REQUEST_GRACE_MS = 5_000;

const SUBSCRIBED_OBJECTS = { webhooks: null, print_stats: null, idle_timeout: null };
const MCU_OBJECT_FIELDS = ["mcu_version", "mcu_build_versions", "mcu_constants"];
const MCU_SECTION = /^mcu(\s|$)/i;
const DUPLICATE_AGENT = /already registered and connected/i;

interface StateWaiter {
  check(): boolean;
  resolve(): void;
  reject(err: Error): void;
}

export class AgentSession implements PrinterPort {
  connectionId: number | null = null;

  private readonly opts: AgentSessionOptions;
  private readonly log: Logger;
  private readonly endpointName: string;
  private readonly tracker: KlipperTracker;
  private readonly events = new EventEmitter();
  private readonly waiters = new Set<StateWaiter>();
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
  /** Bumped on every start/stop of the Klipper poll so that a poll in flight from an older round ends. */
  private klippyPollRound = 0;
  private klippyPolling = false;
  private klippyPollDelayMs = KLIPPY_POLL_INITIAL_MS;
  private klippyPollTimer: NodeJS.Timeout | null = null;
  /** One warning per outage; the flag clears on the next successful identify. */
  private outageReported = false;
  private duplicateReported = false;

  constructor(opts: AgentSessionOptions) {
    this.opts = opts;
    this.log = opts.logger;
    this.endpointName = describeEndpoint(opts.endpoint);
    this.tracker = new KlipperTracker(this.log);
    this.backoffInitialMs = opts.backoff?.initialMs ?? DEFAULT_BACKOFF_INITIAL_MS;
    this.backoffMaxMs = Math.max(opts.backoff?.maxMs ?? DEFAULT_BACKOFF_MAX_MS, this.backoffInitialMs);
    this.requestTimeoutMs = opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.reconnectDelayMs = this.backoffInitialMs;
    this.tracker.onChange(() => this.settleWaiters());
  }

  get identified(): boolean {
    return this.isIdentified;
  }

  on(event: "identified" | "disconnected", fn: () => void): this {
    this.events.on(event, fn);
    return this;
  }

  off(event: "identified" | "disconnected", fn: () => void): this {
    this.events.off(event, fn);
    return this;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.reconnectDelayMs = this.backoffInitialMs;
    this.beginConnect();
  }

  /** Closes the connection and stops reconnecting; pending service waits fail with MOONRAKER_UNAVAILABLE. */
  async stop(): Promise<void> {
    this.running = false;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.unwatchSocket();
    this.stopKlippyPoll();
    for (const waiter of [...this.waiters]) {
      waiter.reject(unavailable("the Moonraker session was stopped"));
    }
    const peer = this.peer;
    if (peer?.isOpen) {
      const closed = new Promise<void>((resolve) => peer.onClose(() => resolve()));
      peer.close();
      await closed;
    }
    await this.connectAttempt;
  }

  // ---- PrinterPort -------------------------------------------------------------------------------------

  state(): PrinterState {
    return { ...this.tracker.state, services: { ...this.tracker.state.services } };
  }

  isPrinting(): boolean {
    return this.tracker.isPrinting();
  }

  onStateChange(listener: (state: PrinterState) => void): () => void {
    return this.tracker.onChange(listener);
  }

  async stopService(service?: string, timeoutMs = DEFAULT_STOP_TIMEOUT_MS): Promise<void> {
    const peer = this.requirePeer();
    const unit = service ?? this.tracker.state.klipperService;
    const stopped = (): boolean => isStopped(this.tracker.state.services[unit]);
    if (stopped()) return;
    await this.serviceAction(peer, "stop", unit, stopped, timeoutMs);
  }

  async startService(service?: string, timeoutMs = DEFAULT_START_TIMEOUT_MS): Promise<void> {
    const peer = this.requirePeer();
    const unit = service ?? this.tracker.state.klipperService;
    const started = (): boolean => {
      const state = this.tracker.state;
      const klippyNeeded = unit === state.klipperService;
      // Klipper is up once it left "startup": ready, or error/shutdown (e.g. another MCU still outdated), which
      // the caller reports; Moonraker says "connected" ~1 s before Klipper finished starting.
      const klippyUp = state.klippyConnected && state.klippyState !== "startup";
      return state.services[unit]?.active_state === "active" && (!klippyNeeded || klippyUp);
    };
    if (started()) return;
    // The Klipper poll may have slowed to its cap while the service was down; Klipper coming up in
    // error (no notification) should be seen promptly.
    if (unit === this.tracker.state.klipperService && this.klippyPolling) {
      this.stopKlippyPoll();
      this.startKlippyPoll();
    }
    await this.serviceAction(peer, "start", unit, started, timeoutMs);
  }

  async gcode(script: string): Promise<void> {
    const peer = this.requirePeer();
    try {
      await peer.request("printer.gcode.script", { script });
    } catch (err) {
      // -32601: Moonraker has not seen Klipper since it started, so printer.* is not even registered.
      if (err instanceof MoonrakerRpcError && (err.code === 503 || err.code === -32601)) {
        throw klipperNotConnected(err.message);
      }
      throw requestFailed(err);
    }
  }

  async sendEvent(event: string, data?: unknown): Promise<void> {
    await this.call("connection.send_event", data === undefined ? { event } : { event, data });
  }

  async mcuReport(): Promise<McuReport> {
    const peer = this.requirePeer();
    if (!this.tracker.state.klippyConnected) return { hostVersion: null, mcus: [] };
    try {
      const listed = await peer.request<{ objects?: unknown }>("printer.objects.list");
      const objectNames = (Array.isArray(listed.objects) ? listed.objects : []).filter(
        (name): name is string => typeof name === "string" && MCU_SECTION.test(name),
      );
      const query: Record<string, string[]> = { configfile: ["settings"] };
      for (const name of objectNames) query[name] = MCU_OBJECT_FIELDS;
      const queried = await peer.request<{ status?: unknown }>("printer.objects.query", { objects: query });
      const printerInfo = await peer.request<{ software_version?: unknown }>("printer.info");
      const status = asRecord(queried.status) ?? {};
      const settings = asRecord(asRecord(status.configfile)?.settings) ?? {};
      return {
        hostVersion: typeof printerInfo.software_version === "string" ? printerInfo.software_version : null,
        mcus: buildMcuList(objectNames, settings, status),
      };
    } catch (err) {
      if (err instanceof MoonrakerRpcError && (err.code === 503 || err.code === -32601)) {
        return { hostVersion: null, mcus: [] };
      }
      throw requestFailed(err);
    }
  }

  async serialPeripherals(): Promise<SerialPeripheral[]> {
    const result = asRecord(await this.call("machine.peripherals.serial"));
    return Array.isArray(result?.serial_devices) ? (result.serial_devices as SerialPeripheral[]) : [];
  }

  async canbusNodes(iface: string): Promise<CanbusNode[]> {
    const result = asRecord(await this.call("machine.peripherals.canbus", { interface: iface }));
    return Array.isArray(result?.can_uuids) ? (result.can_uuids as CanbusNode[]) : [];
  }

  // ---- connection lifecycle ------------------------------------------------------------------------------

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
    this.installHandlers(peer);
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
      await this.handshake(peer);
    } catch (err) {
      if (peer !== this.peer) return;
      if (err instanceof MoonrakerRpcError && DUPLICATE_AGENT.test(err.message)) {
        this.reportDuplicate();
      } else {
        this.reportOutage(`the Moonraker handshake failed: ${errorText(err)}; retrying`, err);
      }
      // Moonraker keeps a refused socket marked as identified, so only a fresh connection can try again.
      peer.close();
    }
  }

  private async handshake(peer: RpcPeer): Promise<void> {
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
    await this.loadSystemInfo(peer);
    await this.syncKlippy(peer);
    if (peer !== this.peer) return;
    this.isIdentified = true;
    this.connectionId = typeof identity.connection_id === "number" ? identity.connection_id : null;
    this.reconnectDelayMs = this.backoffInitialMs;
    this.log.info(
      { endpoint: this.endpointName, connectionId: this.connectionId },
      this.outageReported ? "reconnected to Moonraker" : "connected to Moonraker",
    );
    this.outageReported = false;
    this.duplicateReported = false;
    this.tracker.moonrakerConnected();
    this.unwatchSocket();
    this.events.emit("identified");
  }

  private handleClosed(peer: RpcPeer, error?: Error): void {
    if (peer !== this.peer) return;
    this.peer = null;
    const wasIdentified = this.isIdentified;
    this.isIdentified = false;
    this.connectionId = null;
    this.stopKlippyPoll();
    this.tracker.moonrakerLost();
    // A service wait cannot be judged without Moonraker: its caller asks the real state after the reconnect.
    for (const waiter of [...this.waiters]) {
      waiter.reject(unavailable("the Moonraker connection closed while waiting for a service to change state"));
    }
    if (wasIdentified) {
      if (this.running) {
        this.log.warn({ endpoint: this.endpointName, err: error }, "lost the Moonraker connection; reconnecting");
        this.outageReported = true;
      } else {
        this.log.debug("Moonraker connection closed");
      }
      this.events.emit("disconnected");
    }
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

  // ---- incoming calls and notifications ------------------------------------------------------------------

  private installHandlers(peer: RpcPeer): void {
    for (const method of this.opts.methods) {
      peer.handle(method, (call) => this.dispatchCall(call));
    }
    const current = (): boolean => peer === this.peer;
    peer.handle("notify_klippy_ready", async () => {
      if (!current()) return;
      this.tracker.klippyReady();
      await this.subscribe(peer).catch((err: unknown) => this.log.debug({ err }, "subscribing after ready failed"));
    });
    peer.handle("notify_klippy_shutdown", async () => {
      if (!current()) return;
      this.tracker.klippyShutdown();
      this.startKlippyPoll();
    });
    peer.handle("notify_klippy_disconnected", async () => {
      if (!current()) return;
      this.tracker.klippyDisconnected();
      this.startKlippyPoll();
    });
    peer.handle("notify_status_update", async ({ params }) => {
      const status = Array.isArray(params) ? asRecord(params[0]) : undefined;
      if (current() && status) this.tracker.status(status);
    });
    peer.handle("notify_service_state_changed", async ({ params }) => {
      const changes = Array.isArray(params) ? asRecord(params[0]) : undefined;
      if (current() && changes) this.tracker.serviceStateChanged(toServiceStates(changes));
    });
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

  // ---- Klipper state ------------------------------------------------------------------------------------

  private async loadSystemInfo(peer: RpcPeer): Promise<void> {
    try {
      const result = await peer.request<{ system_info?: unknown }>("machine.system_info");
      if (peer === this.peer) this.tracker.systemInfo((asRecord(result.system_info) ?? {}) as SystemInfo);
    } catch (err) {
      if (!(err instanceof MoonrakerRpcError)) throw err;
      this.log.warn({ reason: err.message }, "machine.system_info failed; assuming the Klipper unit is 'klipper'");
    }
  }

  private async syncKlippy(peer: RpcPeer): Promise<void> {
    const info = await peer.request<ServerInfo>("server.info");
    if (peer !== this.peer) return;
    this.tracker.serverInfo(info);
    if (info.klippy_connected === true && info.klippy_state === "ready") await this.subscribe(peer);
    else {
      await this.readStateMessage(peer, info);
      this.startKlippyPoll();
    }
  }

  /** Klipper connected but not ready (startup, error, shutdown): its state message says why, e.g. MCU Protocol error. */
  private async readStateMessage(peer: RpcPeer, info: ServerInfo): Promise<void> {
    if (info.klippy_connected !== true) return;
    try {
      const printer = await peer.request<{ state?: unknown; state_message?: unknown }>("printer.info");
      if (peer === this.peer) this.tracker.printerInfo(printer);
    } catch (err) {
      this.log.debug({ err }, "printer.info failed while Klipper is not ready");
    }
  }

  /** Moonraker drops subscriptions whenever Klipper disconnects, so this runs after every ready. */
  private async subscribe(peer: RpcPeer): Promise<void> {
    this.stopKlippyPoll();
    try {
      const result = await peer.request<{ status?: unknown }>("printer.objects.subscribe", {
        objects: SUBSCRIBED_OBJECTS,
      });
      const status = asRecord(result.status);
      if (peer === this.peer && status) this.tracker.status(status);
    } catch (err) {
      if (!(err instanceof MoonrakerRpcError)) throw err;
      // Klipper went away between the ready and our request.
      this.log.debug({ reason: err.message }, "subscribing to Klipper objects failed; polling server.info");
      if (peer === this.peer) this.startKlippyPoll();
    }
  }

  private startKlippyPoll(): void {
    if (this.klippyPolling || !this.peer) return;
    this.klippyPolling = true;
    this.klippyPollDelayMs = KLIPPY_POLL_INITIAL_MS;
    this.scheduleKlippyPoll(++this.klippyPollRound);
  }

  private stopKlippyPoll(): void {
    this.klippyPolling = false;
    this.klippyPollRound++;
    if (this.klippyPollTimer) clearTimeout(this.klippyPollTimer);
    this.klippyPollTimer = null;
  }

  private scheduleKlippyPoll(round: number): void {
    const delay = this.klippyPollDelayMs;
    this.klippyPollDelayMs = Math.min(this.klippyPollDelayMs * 2, KLIPPY_POLL_MAX_MS);
    this.klippyPollTimer = setTimeout(() => void this.pollKlippy(round), delay);
  }

  private async pollKlippy(round: number): Promise<void> {
    this.klippyPollTimer = null;
    const peer = this.peer;
    const stillPolling = (): boolean => round === this.klippyPollRound && peer === this.peer;
    if (!peer || !stillPolling()) return;
    try {
      const info = await peer.request<ServerInfo>("server.info");
      if (!stillPolling()) return;
      this.tracker.serverInfo(info);
      if (info.klippy_connected === true && info.klippy_state === "ready") {
        await this.subscribe(peer);
        return;
      }
      await this.readStateMessage(peer, info);
    } catch (err) {
      this.log.debug({ err }, "polling server.info failed");
    }
    if (stillPolling()) this.scheduleKlippyPoll(round);
  }

  // ---- services -----------------------------------------------------------------------------------------

  private async serviceAction(
    peer: RpcPeer,
    action: "stop" | "start",
    unit: string,
    reached: () => boolean,
    timeoutMs: number,
  ): Promise<void> {
    const wanted = action === "stop" ? "stopped" : "running";
    const wait = this.waitForState(reached, timeoutMs, () => {
      const seconds = Math.round(timeoutMs / 100) / 10;
      return new MoonflashError(
        "SERVICE_TIMEOUT",
        `Moonraker did not report the service '${unit}' ${wanted} within ${seconds} s. ` +
          `Check the service (e.g. systemctl status ${unit}) and Moonraker's log, then try again.`,
        { service: unit, action, timeoutMs },
      );
    });
    const request = peer
      .request(`machine.services.${action}`, { service: unit }, timeoutMs + SERVICE_REQUEST_GRACE_MS)
      .then(
        () => undefined,
        (err: unknown) => {
          if (err instanceof MoonrakerRpcError) {
            throw new MoonflashError(
              "SERVICE_FAILED",
              `Moonraker could not ${action} the service '${unit}': ${err.message}. ` +
                `Check that '${unit}' is listed in moonraker.asvc and that Moonraker may manage it.`,
              { service: unit, action, rpcCode: err.code },
            );
          }
          throw err;
        },
      );
    try {
      await Promise.all([request, wait.promise]);
    } finally {
      wait.cancel();
    }
  }

  private waitForState(
    reached: () => boolean,
    timeoutMs: number,
    timeoutError: () => MoonflashError,
  ): { promise: Promise<void>; cancel(): void } {
    let waiter!: StateWaiter;
    const finish = (): void => {
      clearTimeout(timer);
      this.waiters.delete(waiter);
    };
    const promise = new Promise<void>((resolve, reject) => {
      waiter = {
        check: reached,
        resolve: () => {
          finish();
          resolve();
        },
        reject: (err) => {
          finish();
          reject(err);
        },
      };
    });
    this.waiters.add(waiter);
    const timer = setTimeout(() => waiter.reject(timeoutError()), timeoutMs);
    return { promise, cancel: finish };
  }

  private settleWaiters(): void {
    for (const waiter of [...this.waiters]) {
      if (waiter.check()) waiter.resolve();
    }
  }

  // ---- helpers ------------------------------------------------------------------------------------------

  private requirePeer(): RpcPeer {
    if (!this.peer || this.callablePeer !== this.peer) {
      throw unavailable(`moonflash is not connected to Moonraker at ${this.endpointName} right now`);
    }
    return this.peer;
  }

  private async call(method: string, params?: Record<string, unknown>): Promise<unknown> {
    const peer = this.requirePeer();
    try {
      return await peer.request(method, params);
    } catch (err) {
      throw requestFailed(err);
    }
  }
}

function isStopped(state: ServiceState | undefined): boolean {
  return state?.active_state === "inactive" || state?.active_state === "failed";
}

function toServiceStates(changes: Record<string, unknown>): Record<string, ServiceState> {
  const states: Record<string, ServiceState> = {};
  for (const [name, value] of Object.entries(changes)) {
    const entry = asRecord(value);
    if (typeof entry?.active_state !== "string") continue;
    states[name] = {
      active_state: entry.active_state,
      sub_state: typeof entry.sub_state === "string" ? entry.sub_state : "",
    };
  }
  return states;
}

/** One McuInfo per `[mcu*]` section, in Klipper's object order; config sections without an object come last. */
function buildMcuList(
  objectNames: string[],
  settings: Record<string, unknown>,
  status: Record<string, unknown>,
): McuInfo[] {
  // configfile.settings keys are lower-case; printer object names keep the config's spelling.
  const sections = new Map<string, string>();
  for (const name of objectNames) sections.set(name.toLowerCase(), name);
  for (const key of Object.keys(settings)) {
    if (MCU_SECTION.test(key) && !sections.has(key.toLowerCase())) sections.set(key.toLowerCase(), key);
  }
  return [...sections].map(([key, section]) =>
    toMcuInfo(section, asRecord(settings[key]) ?? {}, asRecord(status[section]) ?? {}),
  );
}

function toMcuInfo(section: string, settings: Record<string, unknown>, object: Record<string, unknown>): McuInfo {
  const name = section.replace(MCU_SECTION, "").trim();
  const info: McuInfo = { section, name: name === "" ? "mcu" : name };
  const text = (value: unknown): string | undefined =>
    typeof value === "string" && value !== "" ? value : undefined;
  const serial = text(settings.serial);
  if (serial) info.serial = serial;
  const canbusUuid = text(settings.canbus_uuid);
  if (canbusUuid) info.canbusUuid = canbusUuid;
  const canbusInterface = text(settings.canbus_interface);
  if (canbusInterface) info.canbusInterface = canbusInterface;
  const baud = typeof settings.baud === "string" ? Number(settings.baud) : settings.baud;
  if (typeof baud === "number" && Number.isFinite(baud)) info.baud = baud;
  const restartMethod = text(settings.restart_method);
  if (restartMethod) info.restartMethod = restartMethod;
  const mcuVersion = text(object.mcu_version);
  if (mcuVersion) info.mcuVersion = mcuVersion;
  const buildVersions = text(object.mcu_build_versions);
  if (buildVersions) info.mcuBuildVersions = buildVersions;
  const mcuType = text(asRecord(object.mcu_constants)?.MCU);
  if (mcuType) info.mcuType = mcuType;
  return info;
}

function unavailable(message: string): MoonflashError {
  return new MoonflashError(
    "MOONRAKER_UNAVAILABLE",
    `${message}. Check that Moonraker is running; moonflash reconnects by itself.`,
  );
}

function klipperNotConnected(reason: string): MoonflashError {
  return new MoonflashError(
    "KLIPPER_NOT_CONNECTED",
    `Klipper is not connected to Moonraker (${reason}). Start Klipper (or wait until it is up) and try again.`,
  );
}

function requestFailed(err: unknown): unknown {
  if (!(err instanceof MoonrakerRpcError)) return err;
  return new MoonflashError(
    "MOONRAKER_REQUEST_FAILED",
    `Moonraker answered ${err.method} with an error: ${err.message}. See Moonraker's log for details.`,
    { method: err.method, rpcCode: err.code, data: err.data },
  );
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
