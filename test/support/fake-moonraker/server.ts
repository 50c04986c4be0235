// The fake Moonraker: one JSON-RPC dispatcher behind two transports (unix socket with ETX framing, websocket),
// with the agent, machine, peripherals and printer endpoints behaving as recorded from Moonraker v0.10.
import crypto from "node:crypto";
import fs from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { WebSocketServer, type WebSocket } from "ws";
import { connectTestClient, type TestClient } from "./client.js";
import { EtxDecoder, encodeEtxFrame } from "./framing.js";
import { SimKlipper, type KlipperHost, type SimKlipperOptions } from "./klipper-sim.js";
import {
  API_VERSION, API_VERSION_STRING, CLIENT_TYPES, COMPONENTS, MOONRAKER_REMOTE_METHODS, MOONRAKER_VERSION,
  REGISTERED_DIRECTORIES, systemInfoStatic,
} from "./recorded.js";
import { ServerError, pythonRepr, requireString } from "./server-error.js";

export interface FakeMoonrakerOptions {
  dataDir: string;
  /** Moonraker's database at start: namespace → top-level keys → values (e.g. what Mainsail stored). */
  database?: Record<string, Record<string, unknown>>;
  /** Listen on a websocket too (default true). */
  websocket?: boolean;
  /** Port for the websocket; 0 (default) picks a free one. */
  port?: number;
  /** When set, websocket clients must send X-Api-Key at upgrade or api_key in identify. */
  apiKey?: string;
  /** Delays of the service actions; defaults are scaled down for tests. */
  timing?: {
    stopOkMs?: number;
    stopStateMs?: number;
    startOkMs?: number;
    startStateMs?: number;
    readyMs?: number;
    /** After a restart of the fake, how long until the running Klippy has connected to it again. */
    klippyReconnectMs?: number;
    /** How long machine.system_info takes to answer (a slow Pi); the agent's handshake waits for it. */
    systemInfoMs?: number;
    /** notify_proc_stat_update to every client, as Moonraker sends it once a second (proc_stats.py); 0 = never. */
    procStatMs?: number;
  };
  klipper?: SimKlipperOptions & {
    /** The klipper unit name, as system_info.instance_ids.klipper reports it (default "klipper"). */
    serviceName?: string;
  };
  /**
   * The services Moonraker may manage and their states at start, in the order machine.system_info lists them
   * (default: the klipper service, klipper_mcu and moonraker, all running).
   */
  services?: Record<string, { active_state: string; sub_state: string }>;
  serialDevices?: Array<Record<string, unknown>>;
  canbus?: Record<string, Array<{ uuid: string; application: string }>>;
}

export interface FakeMoonraker {
  readonly socketPath: string;
  readonly wsUrl: string;
  readonly klipper: SimKlipper;
  readonly consoleLines: string[];
  readonly serviceActions: Array<{ action: string; service: string; at: number }>;
  /** Moonraker's database, namespace → top-level records. */
  readonly database: Map<string, Record<string, unknown>>;
  /** Webcams added through server.webcams.post_item, by name (as components/webcam.py keeps them). */
  readonly webcams: Map<string, Record<string, unknown>>;
  agents(): Array<{ name: string; version: string; type: string; url: string }>;
  remoteMethods(): string[];
  connectClient(opts?: ConnectClientOptions): Promise<TestClient>;
  waitFor(pred: () => boolean, timeoutMs?: number): Promise<void>;
  restart(downMs?: number): Promise<void>;
  stop(): Promise<void>;
}

export interface ConnectClientOptions {
  transport?: "ws" | "unix";
  /** Send server.connection.identify right away (default true). */
  identify?: boolean;
  name?: string;
  type?: string;
  /** X-Api-Key header for the websocket; defaults to the fake's apiKey, "" sends none. */
  apiKey?: string;
}

interface ClientData {
  name: string;
  version: string;
  type: string;
  url: string;
}

type ObjectFilter = Record<string, string[] | null>;

interface PendingAgentCall {
  resolve(value: unknown): void;
  reject(error: Error): void;
}

class Connection {
  clientData: ClientData | null = null;
  closed = false;
  subscription: ObjectFilter | null = null;
  /** Last values pushed to this subscriber, per object and field, as JSON text. */
  lastPushed = new Map<string, Map<string, string>>();
  readonly pendingAgentCalls = new Map<number, PendingAgentCall>();

  constructor(
    readonly uid: number,
    public needAuth: boolean,
    private readonly write: (json: string) => void,
    readonly drop: () => void,
  ) {}

  send(message: unknown): void {
    if (!this.closed) this.write(JSON.stringify(message));
  }
}

type Handler = (conn: Connection, params: Record<string, unknown>) => unknown;

const DEFAULT_TIMING = { stopOkMs: 50, stopStateMs: 20, startOkMs: 100, startStateMs: 20, readyMs: 100, klippyReconnectMs: 100, systemInfoMs: 0, procStatMs: 1000 };

export class FakeMoonrakerServer implements FakeMoonraker {
  readonly socketPath: string;
  readonly klipper: SimKlipper;
  readonly consoleLines: string[] = [];
  readonly serviceActions: Array<{ action: string; service: string; at: number }> = [];
  private readonly timing: typeof DEFAULT_TIMING;
  private readonly klipperService: string;
  private readonly services = new Map<string, { active_state: string; sub_state: string }>();
  private readonly connections = new Set<Connection>();
  private readonly agentsByName = new Map<string, Connection>();
  /** Moonraker's database, namespace → top-level records. */
  readonly database = new Map<string, Record<string, unknown>>();
  readonly webcams = new Map<string, Record<string, unknown>>();
  private readonly remoteMethodOwners = new Map<string, Connection>();
  private readonly handlers = new Map<string, Handler>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private httpServer: http.Server | null = null;
  private wss: WebSocketServer | null = null;
  private unixServer: net.Server | null = null;
  private port: number;
  private nextUid = 140381074000000;
  private nextAgentRequestId = 140381075000000;
  private stopped = false;
  private procStatTimer: NodeJS.Timeout | null = null;

  constructor(private readonly opts: FakeMoonrakerOptions) {
    this.socketPath = path.join(opts.dataDir, "comms", "moonraker.sock");
    this.port = opts.port ?? 0;
    this.timing = { ...DEFAULT_TIMING, ...opts.timing };
    this.klipperService = opts.klipper?.serviceName ?? "klipper";
    const running = { active_state: "active", sub_state: "running" };
    const services = opts.services ?? { [this.klipperService]: running, klipper_mcu: running, moonraker: running };
    for (const [name, state] of Object.entries(services)) this.services.set(name, { ...state });
    for (const [namespace, record] of Object.entries(opts.database ?? {})) this.database.set(namespace, structuredClone(record));
    const host: KlipperHost = {
      notifyAll: (method, params) => this.notifyAll(method, params),
      statusChanged: () => this.pushStatusUpdates(),
      klippyDisconnected: () => {
        for (const conn of this.connections) this.clearSubscription(conn);
      },
      klippyConnected: () => {
        this.klippySeenSinceStart = true;
      },
      callRemoteMethod: (method, params) => this.forwardRemoteCall(method, params),
      remoteMethods: () => this.remoteMethods(),
      schedule: (fn, ms) => this.schedule(fn, ms),
      restartMs: this.timing.readyMs,
    };
    this.klipper = new SimKlipper(host, opts.klipper);
    this.registerHandlers();
  }

  get wsUrl(): string {
    return `ws://127.0.0.1:${this.port}/websocket`;
  }

  async listen(): Promise<void> {
    await fs.mkdir(path.dirname(this.socketPath), { recursive: true });
    await fs.rm(this.socketPath, { force: true });
    const unixServer = net.createServer((socket) => this.acceptUnix(socket));
    await new Promise<void>((resolve, reject) => {
      unixServer.once("error", reject);
      unixServer.listen(this.socketPath, () => resolve());
    });
    this.unixServer = unixServer;
    this.startProcStats();
    if (this.opts.websocket === false) return;
    const wss = new WebSocketServer({ noServer: true });
    const httpServer = http.createServer((_req, res) => {
      res.writeHead(404).end();
    });
    httpServer.on("upgrade", (req, socket, head) => {
      if (new URL(req.url ?? "/", "http://127.0.0.1").pathname !== "/websocket") {
        socket.destroy();
        return;
      }
      wss.handleUpgrade(req, socket, head, (ws) => this.acceptWebsocket(ws, req.headers["x-api-key"]));
    });
    await new Promise<void>((resolve, reject) => {
      httpServer.once("error", reject);
      httpServer.listen(this.port, "127.0.0.1", () => resolve());
    });
    this.port = (httpServer.address() as net.AddressInfo).port;
    this.httpServer = httpServer;
    this.wss = wss;
  }

  private acceptUnix(socket: net.Socket): void {
    if (Date.now() < this.refuseUnixUntil) {
      socket.destroy();
      return;
    }
    const decoder = new EtxDecoder();
    // The unix socket never needs authentication (extensions.py: UnixSocketClient).
    const conn = new Connection(this.nextUid++, false, (json) => socket.write(encodeEtxFrame(json)), () => socket.destroy());
    this.connections.add(conn);
    socket.on("data", (chunk: Buffer) => {
      for (const frame of decoder.push(chunk)) this.handleText(conn, frame);
    });
    socket.on("error", () => socket.destroy());
    socket.on("close", () => this.onClose(conn));
  }

  private acceptWebsocket(ws: WebSocket, apiKeyHeader: string | string[] | undefined): void {
    const needAuth = this.opts.apiKey !== undefined && apiKeyHeader !== this.opts.apiKey;
    const conn = new Connection(this.nextUid++, needAuth, (json) => ws.send(json), () => ws.terminate());
    this.connections.add(conn);
    ws.on("message", (data) => this.handleText(conn, data.toString()));
    ws.on("error", () => ws.terminate());
    ws.on("close", () => this.onClose(conn));
  }

  private onClose(conn: Connection): void {
    if (conn.closed) return;
    conn.closed = true;
    this.forget(conn);
  }

  private forget(conn: Connection): void {
    this.connections.delete(conn);
    for (const call of conn.pendingAgentCalls.values()) call.reject(new ServerError("Client Socket Disconnected", 500));
    conn.pendingAgentCalls.clear();
    const data = conn.clientData;
    if (data?.type === "agent" && this.agentsByName.get(data.name) === conn) {
      this.agentsByName.delete(data.name);
      for (const [method, owner] of this.remoteMethodOwners) {
        if (owner === conn) this.remoteMethodOwners.delete(method);
      }
      this.notifyAll("notify_agent_event", [{ agent: data.name, event: "disconnected" }], conn);
    }
  }

  // --- JSON-RPC (common.py: JsonRPC.dispatch) ---

  private handleText(conn: Connection, text: string): void {
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      conn.send({ jsonrpc: "2.0", error: { code: -32700, message: "Parse error" }, id: null });
      return;
    }
    if (Array.isArray(parsed)) {
      void Promise.all(parsed.map((item) => this.processObject(conn, item))).then((replies) => {
        const sent = replies.filter((r) => r !== null);
        if (sent.length > 0) conn.send(sent);
      });
      return;
    }
    void this.processObject(conn, parsed).then((reply) => {
      if (reply !== null) conn.send(reply);
    });
  }

  private async processObject(conn: Connection, obj: unknown): Promise<Record<string, unknown> | null> {
    if (typeof obj !== "object" || obj === null) {
      return { jsonrpc: "2.0", error: { code: -32600, message: "Invalid Request" }, id: null };
    }
    const msg = obj as Record<string, unknown>;
    // No method: a reply to a request we sent (an agent answering server.extensions.request); unknown ids are dropped.
    if (!("method" in msg)) {
      this.handleAgentReply(conn, msg);
      return null;
    }
    const id = msg.id;
    const fail = (error: ServerError): Record<string, unknown> => ({ jsonrpc: "2.0", error: error.toRpcError(), id: id ?? null });
    if (msg.jsonrpc !== "2.0" || typeof msg.method !== "string") return fail(new ServerError("Invalid Request", -32600));
    const handler = this.handlers.get(msg.method);
    if (handler === undefined) return fail(new ServerError("Method not found", 404));
    if (conn.needAuth && msg.method !== "server.connection.identify") return fail(new ServerError("Unauthorized", 401));
    const params = typeof msg.params === "object" && msg.params !== null && !Array.isArray(msg.params)
      ? (msg.params as Record<string, unknown>)
      : {};
    try {
      const result = await handler(conn, params);
      // A request without id gets no reply when it succeeds.
      return id === undefined ? null : { jsonrpc: "2.0", result, id };
    } catch (err) {
      return fail(err instanceof ServerError ? err : new ServerError(String(err), 500));
    }
  }

  private handleAgentReply(conn: Connection, msg: Record<string, unknown>): void {
    if (typeof msg.id !== "number") return;
    const call = conn.pendingAgentCalls.get(msg.id);
    if (call === undefined) return;
    conn.pendingAgentCalls.delete(msg.id);
    const name = conn.clientData?.name ?? `Client ${conn.uid}`;
    // Moonraker treats a null or missing result as an agent error whose data is the reply's `error`, null when it has
    // none (moonraker/common.py: JsonRPC.process_response).
    if (msg.result === undefined || msg.result === null) {
      call.reject(new ServerError(`Agent ${name} RPC error`, 424, msg.error ?? null));
    } else call.resolve(msg.result);
  }

  /** Moonraker's once-a-second host statistics (components/proc_stats.py), to agents too; values vary a little. */
  private startProcStats(): void {
    const every = this.timing.procStatMs;
    if (every <= 0 || this.procStatTimer) return;
    const started = Date.now();
    this.procStatTimer = setInterval(() => {
      const time = (Date.now() - started) / 1000;
      const wave = Math.sin(time);
      this.notifyAll("notify_proc_stat_update", [
        {
          moonraker_stats: { time: 1764640000 + time, cpu_usage: 1.5 + wave, memory: 48712, mem_units: "kB" },
          cpu_temp: 45.3 + wave,
          network: { lo: { rx_bytes: 1000 * time, tx_bytes: 1000 * time, rx_packets: 10 * time, tx_packets: 10 * time, rx_errs: 0, tx_errs: 0, rx_drop: 0, tx_drop: 0, bandwidth: 2000 } },
          system_cpu_usage: { cpu: 4.2 + wave, cpu0: 5 + wave, cpu1: 3.4 + wave },
          system_memory: { total: 3881296, available: 3200000, used: 681296 },
          websocket_connections: this.connections.size,
        },
      ]);
    }, every);
    this.procStatTimer.unref();
  }

  private notifyAll(method: string, params?: unknown[], except?: Connection): void {
    if (method === "notify_gcode_response" && typeof params?.[0] === "string") this.consoleLines.push(params[0]);
    const message: Record<string, unknown> = { jsonrpc: "2.0", method };
    if (params !== undefined && params.length > 0) message.params = params;
    for (const conn of this.connections) {
      // Clients that still need authentication receive no notifications (websockets.py: notify_clients).
      if (conn !== except && !conn.needAuth) conn.send(message);
    }
  }

  private registerHandlers(): void {
    const on = (method: string, handler: Handler): void => {
      this.handlers.set(method, handler);
    };
    const printer = (method: string, handler: Handler): void => {
      on(method, (conn, params) => {
        // Moonraker registers the printer endpoints when Klippy first connects after its own start.
        if (!this.klippySeenSinceStart) throw new ServerError("Method not found", 404);
        if (!this.klipper.connected) throw new ServerError("Klippy Host not connected", 503);
        return handler(conn, params);
      });
    };

    on("server.connection.identify", (conn, params) => this.identify(conn, params));
    on("server.websocket.id", (conn) => ({ websocket_id: conn.uid }));
    on("server.info", () => ({
      klippy_connected: this.klipper.connected,
      klippy_state: this.klipper.connected ? this.klipper.state : "disconnected",
      components: COMPONENTS,
      failed_components: [],
      registered_directories: REGISTERED_DIRECTORIES,
      warnings: [],
      websocket_count: this.connections.size,
      moonraker_version: MOONRAKER_VERSION,
      missing_klippy_requirements: [],
      api_version: API_VERSION,
      api_version_string: API_VERSION_STRING,
    }));
    on("server.extensions.list", () => ({ agents: this.agents() }));
    on("server.extensions.request", (_conn, params) => this.callAgent(params));
    on("connection.register_remote_method", (conn, params) => {
      if (conn.clientData?.type !== "agent") {
        throw new ServerError("Only connections of the 'agent' type can register methods");
      }
      const method = requireString(params, "method_name");
      if (this.remoteMethodOwners.has(method) || MOONRAKER_REMOTE_METHODS.includes(method)) {
        throw new ServerError(`Remote method (${method}) already registered`);
      }
      this.remoteMethodOwners.set(method, conn);
      return "ok";
    });
    on("connection.send_event", (conn, params) => {
      if (conn.clientData?.type !== "agent") throw new ServerError("Only connections of the 'agent' type can send events");
      const event = requireString(params, "event");
      if (event === "connected" || event === "disconnected") throw new ServerError(`Event '${event}' is reserved`);
      const evt: Record<string, unknown> = { agent: conn.clientData.name, event };
      if (params.data !== undefined && params.data !== null) evt.data = params.data;
      this.notifyAll("notify_agent_event", [evt], conn);
      return "ok";
    });

    on("machine.system_info", async () => {
      if (this.timing.systemInfoMs) await this.delay(this.timing.systemInfoMs);
      return this.systemInfo();
    });
    for (const action of ["start", "stop", "restart"] as const) {
      on(`machine.services.${action}`, (_conn, params) => this.serviceAction(action, requireString(params, "service")));
    }
    // components/database.py as the real one answered (checked against Moonraker on the rig): dotted keys reach into
    // objects; post creates the objects on the way; a missing top-level record names its first key, a missing
    // nested one the whole key; delete answers the value it removed and leaves the parent, maybe empty.
    on("server.database.list", () => ({ namespaces: [...this.database.keys()], backups: [] }));
    on("server.database.get_item", (_conn, params) => {
      const namespace = requireString(params, "namespace");
      const key = requireString(params, "key");
      const [first, ...rest] = key.split(".");
      const record = this.database.get(namespace);
      if (!record || !(first! in record)) throw new ServerError(`Key '${first}' in namespace '${namespace}' not found`, 404);
      let value: unknown = record[first!];
      for (const part of rest) {
        if (value === null || typeof value !== "object" || !(part in value)) throw new ServerError(`Key '${key}' in namespace '${namespace}' not found`, 404);
        value = (value as Record<string, unknown>)[part];
      }
      return { namespace, key, value: structuredClone(value) };
    });
    on("server.database.post_item", (_conn, params) => {
      const namespace = requireString(params, "namespace");
      const key = requireString(params, "key");
      if (!("value" in params)) throw new ServerError("No data for argument: value");
      const parts = key.split(".");
      let record = this.database.get(namespace);
      if (!record) this.database.set(namespace, (record = {}));
      let node: Record<string, unknown> = record;
      for (const part of parts.slice(0, -1)) {
        if (node[part] === null || typeof node[part] !== "object" || Array.isArray(node[part])) node[part] = {};
        node = node[part] as Record<string, unknown>;
      }
      node[parts.at(-1)!] = structuredClone(params.value);
      return { namespace, key, value: params.value };
    });
    on("server.database.delete_item", (_conn, params) => {
      const namespace = requireString(params, "namespace");
      const key = requireString(params, "key");
      const parts = key.split(".");
      let node: unknown = this.database.get(namespace);
      for (const part of parts.slice(0, -1)) node = node && typeof node === "object" ? (node as Record<string, unknown>)[part] : undefined;
      const last = parts.at(-1)!;
      if (!node || typeof node !== "object" || !(last in node)) throw new ServerError(`Key '${key}' in namespace '${namespace}' not found`, 404);
      const value = (node as Record<string, unknown>)[last];
      delete (node as Record<string, unknown>)[last];
      return { namespace, key, value };
    });
    // components/webcam.py: post_item creates (defaults as WebCam.from_web_request) or updates by name; delete_item
    // and get_item find by uid or name (404 "Webcam <name> not found"); every change is told to all clients.
    const webcamChanged = (): void => this.notifyAll("notify_webcams_changed", [{ webcams: [...this.webcams.values()] }]);
    const lookupWebcam = (params: Record<string, unknown>): Record<string, unknown> => {
      if (typeof params.uid === "string") {
        const cam = [...this.webcams.values()].find((c) => c.uid === params.uid);
        if (!cam) throw new ServerError(`Webcam with UID ${params.uid} not found`, 404);
        return cam;
      }
      const name = requireString(params, "name");
      const cam = this.webcams.get(name);
      if (!cam) throw new ServerError(`Webcam ${name} not found`, 404);
      return cam;
    };
    on("server.webcams.list", () => ({ webcams: [...this.webcams.values()] }));
    on("server.webcams.get_item", (_conn, params) => ({ webcam: structuredClone(lookupWebcam(params)) }));
    on("server.webcams.post_item", (_conn, params) => {
      const name = requireString(params, "name");
      const existing = this.webcams.get(name);
      const { uid: _uid, source: _source, ...given } = params;
      const cam = existing
        ? { ...existing, ...given }
        : {
            name, enabled: true, icon: "mdiWebcam", aspect_ratio: "4:3", target_fps: 15, target_fps_idle: 5, location: "printer",
            service: "mjpegstreamer", stream_url: requireString(params, "stream_url"), snapshot_url: "", flip_horizontal: false,
            flip_vertical: false, rotation: 0, source: "database", extra_data: {}, ...given, uid: crypto.randomUUID(),
          };
      this.webcams.set(name, cam);
      webcamChanged();
      return { webcam: structuredClone(cam) };
    });
    on("server.webcams.delete_item", (_conn, params) => {
      const cam = lookupWebcam(params);
      this.webcams.delete(cam.name as string);
      webcamChanged();
      return { webcam: cam };
    });
    on("machine.peripherals.serial", () => ({ serial_devices: this.opts.serialDevices ?? [] }));
    on("machine.peripherals.canbus", (_conn, params) => {
      const iface = typeof params.interface === "string" ? params.interface : "can0";
      const nodes = this.opts.canbus?.[iface];
      // Real Moonraker: binding a missing interface fails with a 500 (moonraker utils/cansocket.py).
      if (!nodes) throw new ServerError(`Unable to bind socket to interface '${iface}'`, 500);
      return { can_uuids: nodes };
    });

    printer("printer.info", () => this.klipper.printerInfo());
    printer("printer.objects.list", () => ({ objects: this.klipper.objectNames() }));
    printer("printer.objects.query", (_conn, params) => ({
      eventtime: this.klipper.eventtime(),
      status: this.filterStatus(objectFilter(params)),
    }));
    printer("printer.objects.subscribe", (conn, params) => {
      const filter = objectFilter(params);
      const status = this.filterStatus(filter);
      conn.subscription = Object.keys(filter).length > 0 ? filter : null;
      conn.lastPushed = snapshotOf(status);
      return { eventtime: this.klipper.eventtime(), status };
    });
    // Macros render in a python3 child process (macro-render.ts), so a script may take a moment.
    printer("printer.gcode.script", async (_conn, params) => {
      await this.klipper.runScript(requireString(params, "script"));
      return "ok";
    });
    printer("printer.firmware_restart", async () => {
      await this.klipper.runScript("FIRMWARE_RESTART");
      return "ok";
    });
    printer("printer.restart", async () => {
      await this.klipper.runScript("RESTART");
      return "ok";
    });
    printer("printer.emergency_stop", () => {
      this.klipper.setState("shutdown");
      return "ok";
    });
  }

  private systemInfo(): unknown {
    return {
      system_info: {
        ...systemInfoStatic(),
        provider: "supervisord_cli",
        available_services: [...this.services.keys()],
        service_state: Object.fromEntries([...this.services].map(([name, state]) => [name, { ...state }])),
        instance_ids: { moonraker: "moonraker", klipper: this.klipperService },
      },
    };
  }

  private identify(conn: Connection, params: Record<string, unknown>): unknown {
    // Order as in websockets.py: _handle_identify.
    if (conn.clientData !== null) throw new ServerError(`Connection already identified: ${pythonRepr(conn.clientData)}`);
    const name = requireString(params, "client_name");
    const version = requireString(params, "version");
    const type = requireString(params, "type").toLowerCase();
    const url = requireString(params, "url");
    if (conn.needAuth) {
      if (this.opts.apiKey === undefined || params.api_key !== this.opts.apiKey) throw new ServerError("Unauthorized", 401);
      conn.needAuth = false;
    }
    if (!CLIENT_TYPES.includes(type)) throw new ServerError(`Invalid Client Type: ${type}`);
    conn.clientData = { name, version, type, url };
    if (type === "agent") {
      if (this.agentsByName.has(name)) {
        // The client data is already stored, so the socket stays identified with an empty type.
        conn.clientData.type = "";
        throw new ServerError(`Agent '${name}' already registered and connected'`);
      }
      this.agentsByName.set(name, conn);
      this.notifyAll("notify_agent_event", [{ agent: name, event: "connected", data: { ...conn.clientData } }], conn);
    }
    return { connection_id: conn.uid };
  }

  private callAgent(params: Record<string, unknown>): Promise<unknown> {
    const agent = requireString(params, "agent");
    const method = requireString(params, "method");
    const args = params.arguments ?? null;
    if (args !== null && typeof args !== "object") {
      throw new ServerError("The 'arguments' field must contain an object or a list");
    }
    const conn = this.agentsByName.get(agent);
    if (conn === undefined) throw new ServerError(`Agent ${agent} not connected`);
    const id = this.nextAgentRequestId++;
    const request: Record<string, unknown> = { jsonrpc: "2.0", method, id };
    if (args !== null && Object.keys(args).length > 0) request.params = args;
    return new Promise((resolve, reject) => {
      conn.pendingAgentCalls.set(id, { resolve, reject });
      conn.send(request);
    });
  }

  // Klipper calls the remote method on Moonraker, which passes it to the agent as a notification;
  // with no owner it is dropped (Moonraker only logs it).
  private forwardRemoteCall(method: string, params: Record<string, unknown>): void {
    const owner = this.remoteMethodOwners.get(method);
    if (owner === undefined) return;
    const message: Record<string, unknown> = { jsonrpc: "2.0", method };
    if (Object.keys(params).length > 0) message.params = params;
    owner.send(message);
  }

  // --- machine.services (machine.py: _handle_service_request, supervisord_cli provider) ---

  private async serviceAction(action: "start" | "stop" | "restart", service: string): Promise<string> {
    if (service === "moonraker") {
      if (action !== "restart") throw new ServerError(`Service action '${action}' not available for moonraker`);
      this.serviceActions.push({ action, service, at: Date.now() });
      this.schedule(() => void this.restart(), 0);
      return "ok";
    }
    if (!this.services.has(service)) throw new ServerError(`Service '${service}' not allowed`);
    this.serviceActions.push({ action, service, at: Date.now() });
    if (action === "stop") await this.stopService(service, false);
    else if (action === "start") await this.startService(service);
    else {
      await this.stopService(service, true);
      await this.startService(service);
    }
    return "ok";
  }

  // Recorded order: notify_klippy_disconnected, then "ok", then the service state turns inactive/stopped.
  private async stopService(service: string, stateBeforeReturn: boolean): Promise<void> {
    if (this.services.get(service)?.active_state !== "active") return;
    if (service === this.klipperService) this.klipper.serviceStopped();
    await this.delay(this.timing.stopOkMs);
    if (stateBeforeReturn) this.setServiceState(service, "inactive", "stopped");
    else this.schedule(() => this.setServiceState(service, "inactive", "stopped"), this.timing.stopStateMs);
  }

  // Recorded order: "starting" state, "ok", "running" state, then notify_klippy_ready once klippy is up.
  private async startService(service: string): Promise<void> {
    if (this.services.get(service)?.active_state === "active") return;
    if (service === this.klipperService) this.klipper.serviceStarted();
    this.setServiceState(service, "inactive", "starting");
    await this.delay(this.timing.startOkMs);
    this.schedule(() => {
      this.setServiceState(service, "active", "running");
      if (service === this.klipperService) this.schedule(() => this.klipper.connect(), this.timing.readyMs);
    }, this.timing.startStateMs);
  }

  private setServiceState(service: string, active_state: string, sub_state: string): void {
    this.services.set(service, { active_state, sub_state });
    this.notifyAll("notify_service_state_changed", [{ [service]: { active_state, sub_state } }]);
  }

  // --- printer objects ---

  // klippy/webhooks.py: QueryStatusHelper._do_query — an unknown object answers {}, an unknown field null.
  private filterStatus(filter: ObjectFilter): Record<string, Record<string, unknown>> {
    const all = this.klipper.status();
    const out: Record<string, Record<string, unknown>> = {};
    for (const [name, fields] of Object.entries(filter)) {
      const full = all[name] ?? {};
      out[name] = fields === null ? full : Object.fromEntries(fields.map((f) => [f, f in full ? full[f] : null]));
    }
    return out;
  }

  private pushStatusUpdates(): void {
    for (const conn of this.connections) {
      if (conn.subscription === null || conn.needAuth) continue;
      const status = this.filterStatus(conn.subscription);
      const changed: Record<string, Record<string, unknown>> = {};
      for (const [name, fields] of Object.entries(status)) {
        const previous = conn.lastPushed.get(name) ?? new Map<string, string>();
        for (const [field, value] of Object.entries(fields)) {
          const json = JSON.stringify(value);
          if (previous.get(field) === json) continue;
          previous.set(field, json);
          (changed[name] ??= {})[field] = value;
        }
        conn.lastPushed.set(name, previous);
      }
      if (Object.keys(changed).length > 0) {
        conn.send({ jsonrpc: "2.0", method: "notify_status_update", params: [changed, this.klipper.eventtime()] });
      }
    }
  }

  private clearSubscription(conn: Connection): void {
    conn.subscription = null;
    conn.lastPushed = new Map();
  }

  // --- public API ---

  agents(): ClientData[] {
    return [...this.agentsByName.values()].flatMap((c) => (c.clientData === null ? [] : [{ ...c.clientData }]));
  }

  remoteMethods(): string[] {
    return [...this.remoteMethodOwners.keys()];
  }

  async connectClient(opts: ConnectClientOptions = {}): Promise<TestClient> {
    const transport = opts.transport ?? (this.opts.websocket === false ? "unix" : "ws");
    const apiKey = opts.apiKey ?? this.opts.apiKey;
    const client = await connectTestClient(
      transport === "unix" ? { socketPath: this.socketPath } : { wsUrl: this.wsUrl, ...(apiKey ? { apiKey } : {}) },
    );
    if (opts.identify !== false) {
      const name = opts.name ?? `test-client-${this.nextUid}`;
      await client.call("server.connection.identify", {
        client_name: name, version: "0.1.0", type: opts.type ?? "web", url: `https://example.invalid/${name}`,
      });
    }
    return client;
  }

  async waitFor(pred: () => boolean, timeoutMs = 2000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      if (Date.now() > deadline) throw new Error(`fake Moonraker: condition not met within ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  /** Drops every connection and listener, then listens again at the same socket path and port after downMs. */
  /**
   * Moonraker going away and coming back as the real one does (seen on a real rig): its socket file stays while
   * it is down (connections are refused), and on start a new file appears a moment before it accepts.
   */
  async restart(downMs = 50): Promise<void> {
    await this.closeListeners();
    // Klippy keeps running but loses its Moonraker connection; the new Moonraker connects to it again a moment
    // after it starts, and until then knows no printer endpoints.
    this.klipper.disconnect();
    this.klippySeenSinceStart = false;
    await fs.writeFile(this.socketPath, "");
    await new Promise((resolve) => setTimeout(resolve, downMs));
    if (this.stopped) return;
    this.refuseUnixUntil = Date.now() + 150;
    await this.listen();
    this.schedule(() => this.klipper.connect(), this.timing.klippyReconnectMs);
  }

  /** False from a restart until Klippy has connected again (a fresh fake counts as having seen it). */
  private klippySeenSinceStart = true;

  /** Until then, new unix socket connections are dropped: the socket file exists but Moonraker does not accept yet. */
  private refuseUnixUntil = 0;

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.procStatTimer) clearInterval(this.procStatTimer);
    this.procStatTimer = null;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    await this.closeListeners();
  }

  private async closeListeners(): Promise<void> {
    // Everyone goes at once, so nobody is told about the others leaving.
    const dropped = [...this.connections];
    for (const conn of dropped) {
      conn.closed = true;
      conn.drop();
    }
    for (const conn of dropped) this.forget(conn);
    const unixServer = this.unixServer;
    const httpServer = this.httpServer;
    this.unixServer = null;
    this.httpServer = null;
    this.wss?.close();
    this.wss = null;
    if (unixServer !== null) await new Promise<void>((resolve) => unixServer.close(() => resolve()));
    if (httpServer !== null) {
      httpServer.closeAllConnections();
      await new Promise<void>((resolve) => httpServer.close(() => resolve()));
    }
    await fs.rm(this.socketPath, { force: true });
  }

  private schedule(fn: () => void, ms: number): void {
    if (this.stopped) return;
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      fn();
    }, ms);
    this.timers.add(timer);
  }

  private delay(ms: number): Promise<void> {
    return new Promise((resolve) => this.schedule(resolve, ms));
  }
}

// Klipper checks the query (klippy/webhooks.py: QueryStatusHelper._handle_query, WebRequest.get); Moonraker passes
// its error on as a 400.
function objectFilter(params: Record<string, unknown>): ObjectFilter {
  if (!("objects" in params)) throw new ServerError("Missing Argument [objects]");
  const objects = params.objects;
  if (typeof objects !== "object" || objects === null || Array.isArray(objects)) {
    throw new ServerError("Invalid Argument Type [objects]");
  }
  const filter: ObjectFilter = {};
  for (const [name, fields] of Object.entries(objects as Record<string, unknown>)) {
    if (fields !== null && !(Array.isArray(fields) && fields.every((f) => typeof f === "string"))) {
      throw new ServerError("Invalid argument");
    }
    filter[name] = fields;
  }
  return filter;
}

function snapshotOf(status: Record<string, Record<string, unknown>>): Map<string, Map<string, string>> {
  return new Map(
    Object.entries(status).map(([name, fields]) => [
      name,
      new Map(Object.entries(fields).map(([field, value]) => [field, JSON.stringify(value)])),
    ]),
  );
}
