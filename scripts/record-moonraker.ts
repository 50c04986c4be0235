// Records the Moonraker traffic that test/conformance/fixtures.test.ts replays against the fake Moonraker
// (test/support/fake-moonraker): every scenario is driven against a LIVE Moonraker + Klipper, and what each
// connection sent and received is written to <out>/<scenario>.jsonl, one {conn, dir, msg} per line, plus README.md.
//
//   npm run record:moonraker -- --url ws://127.0.0.1:7125/websocket --out test/fixtures/moonraker
//   options: --scenario NAME (repeatable: record only these), --home DIR (the prefix written as "~"; default: the
//   directory that holds printer_data, taken from Klipper's config_file path)
//
// What the live printer needs:
// - Moonraker reachable at --url without an API key (a trusted client, e.g. `trusted_clients: 127.0.0.0/8`), with a
//   [machine] provider that may stop and start the `klipper` service (the services scenario stops Klipper for ~5 s).
// - No agent connected (stop moonflash first: its own traffic would end up in the recording); the recorder checks.
// - Klipper ready, with this macro in its config (the remote-method call it records):
//       [gcode_macro RECORD_REMOTE_CALL]
//       gcode:
//         {action_call_remote_method("recorder.test", device="abc", dry_run=1)}
//   Any other config records, but the conformance test configures the fake like the rig in
//   test/fixtures/moonraker/README.md (host MCU, kinematics none, [respond], [virtual_sdcard], ...).
//
// The recorder itself plays every client: "web" (a browser-like client) and "agent", "agent2", "agent3" (clients
// that identify as the agents moonflash-recorder / moonflash-recorder-2, register the remote method, answer
// server.extensions.request, send events). All use the websocket at --url.
//
// Before writing, it normalises what varies between runs or hosts (the conformance test treats a "<...>" string as
// "any string"): notify_proc_stat_update is dropped; connection_id/websocket_id become 100001, 100002... and the
// ids of requests Moonraker makes to an agent 200001... (one per connection / request); every eventtime and pid
// becomes 0, the mcu's last_stats counters 0; the hostname, CPU and the host system's versions (Python, kernel,
// distribution, compiler in mcu_build_versions) become placeholders; MAC and IP addresses 00:00:00:00:00:00,
// 127.0.0.1 and ::1; the home directory "~". Macros other than RECORD_REMOTE_CALL are the printer's own config
// (moonflash.cfg, a user's macros), so they are dropped from printer.objects.list and configfile. Between two sends,
// the messages received are grouped by connection (order within a connection kept): which connection's socket
// Moonraker wrote to first is scheduling, not behaviour. Timing-dependent observations (the service state poll, every
// 2 s in Moonraker's moonraker/components/machine.py) are checked: when the poll fell where a client rarely sees
// it (a state missed, or on the other side of the action's reply), the scenario is recorded again (3 attempts).
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import WebSocket from "ws";

type Msg = Record<string, unknown>;
interface Line {
  conn: string;
  dir: "send" | "recv";
  msg: Msg;
}

const CLIENT_VERSION = "0.1.0";
const WEB = "moonflash-recorder-web";
const AGENT = "moonflash-recorder";
const AGENT2 = "moonflash-recorder-2";
const REMOTE_METHOD = "recorder.test";
const MACRO = "RECORD_REMOTE_CALL";
const MACRO_PARAMS = { device: "abc", dry_run: 1 };
/** The macro's gcode line, as the Klipper config must have it. */
const MACRO_GCODE = `{action_call_remote_method(${[JSON.stringify(REMOTE_METHOD), ...Object.entries(MACRO_PARAMS).map(([k, v]) => `${k}=${JSON.stringify(v)}`)].join(", ")})}`;
const CALL_TIMEOUT_MS = 10_000;
/** After each reply: long enough for the notifications the request caused (~1 ms on loopback) to arrive. */
const SETTLE_MS = 150;
const ATTEMPTS = 3;

/** A scenario saw a timing-dependent sequence other than the one it records; it is run again. */
class Retry extends Error {}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const isObject = (v: unknown): v is Msg => typeof v === "object" && v !== null && !Array.isArray(v);

function identity(name: string, type = "agent"): Msg {
  return { client_name: name, version: CLIENT_VERSION, type, url: `https://example.invalid/${name}` };
}

/** One websocket of a scenario; every message it gets is kept, and expect() hands each out at most once. */
class RecordedConnection {
  readonly received: Msg[] = [];
  private readonly claimed = new Set<number>();
  nextId = 1;
  isClosed = false;

  constructor(
    readonly name: string,
    readonly ws: WebSocket,
  ) {}

  /** The first message matching `pred` not handed out yet, or undefined. */
  take(pred: (m: Msg) => boolean): Msg | undefined {
    const index = this.received.findIndex((m, i) => !this.claimed.has(i) && pred(m));
    if (index < 0) return undefined;
    this.claimed.add(index);
    return this.received[index];
  }
}

/** The messages of one scenario, in the order this process saw them. */
class Recording {
  readonly lines: Line[] = [];
  private readonly conns = new Map<string, RecordedConnection>();
  private lastMessageAt = Date.now();
  private readonly waiters = new Set<() => void>();

  constructor(private readonly url: string) {}

  async open(name: string): Promise<void> {
    const ws = new WebSocket(this.url);
    await new Promise<void>((resolve, reject) => {
      ws.once("open", () => resolve());
      ws.once("error", reject);
    });
    const conn = new RecordedConnection(name, ws);
    this.conns.set(name, conn);
    ws.on("message", (data) => {
      const msg = JSON.parse(data.toString()) as Msg;
      if (msg.method === "notify_proc_stat_update") return;
      conn.received.push(msg);
      this.lines.push({ conn: name, dir: "recv", msg });
      this.lastMessageAt = Date.now();
      for (const wake of this.waiters) wake();
    });
    ws.on("close", () => {
      conn.isClosed = true;
      this.lines.push({ conn: name, dir: "recv", msg: { _closed: true } });
      for (const wake of this.waiters) wake();
    });
  }

  send(name: string, msg: Msg): void {
    this.lines.push({ conn: name, dir: "send", msg });
    this.conn(name).ws.send(JSON.stringify(msg));
  }

  /** Sends a request with the connection's next id and resolves with the reply, once it has settled. */
  async call(name: string, method: string, params?: unknown, timeoutMs = CALL_TIMEOUT_MS): Promise<Msg> {
    const conn = this.conn(name);
    const id = conn.nextId++;
    this.send(name, params === undefined ? { jsonrpc: "2.0", method, id } : { jsonrpc: "2.0", method, id, params });
    const reply = await this.expect(name, (m) => m.id === id && !("method" in m), `the reply to ${method}`, timeoutMs);
    await this.quiet(SETTLE_MS);
    return reply;
  }

  /** Resolves with the first message on `name` matching `pred` that no earlier expect() returned. */
  async expect(name: string, pred: (m: Msg) => boolean, what: string, timeoutMs = CALL_TIMEOUT_MS): Promise<Msg> {
    const conn = this.conn(name);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = conn.take(pred);
      if (found !== undefined) return found;
      if (conn.isClosed) throw new Error(`${name}: closed while waiting for ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`${name}: no ${what} within ${timeoutMs} ms; received: ${JSON.stringify(conn.received.slice(-5))}`);
      }
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          clearTimeout(timer);
          this.waiters.delete(wake);
          resolve();
        };
        const timer = setTimeout(wake, left);
        this.waiters.add(wake);
      });
    }
  }

  /** Waits until no connection has received anything for `ms`. */
  async quiet(ms: number): Promise<void> {
    this.lastMessageAt = Math.max(this.lastMessageAt, Date.now());
    while (Date.now() - this.lastMessageAt < ms) await sleep(ms - (Date.now() - this.lastMessageAt));
  }

  /** Closes the socket from this side: a `_close` send marker, then the `_closed` receive marker when it is gone. */
  async close(name: string): Promise<void> {
    const conn = this.conn(name);
    this.lines.push({ conn: name, dir: "send", msg: { _close: true } });
    conn.ws.close();
    await this.expectClosed(name);
  }

  private async expectClosed(name: string): Promise<void> {
    const conn = this.conn(name);
    const deadline = Date.now() + CALL_TIMEOUT_MS;
    while (!conn.isClosed) {
      if (Date.now() > deadline) throw new Error(`${name}: socket not closed`);
      await sleep(5);
    }
  }

  /** Every message received on `name` so far, in order. */
  received(name: string): readonly Msg[] {
    return this.conn(name).received;
  }

  terminateAll(): void {
    for (const conn of this.conns.values()) if (!conn.isClosed) conn.ws.terminate();
  }

  private conn(name: string): RecordedConnection {
    const conn = this.conns.get(name);
    if (conn === undefined) throw new Error(`no connection ${name}`);
    return conn;
  }
}

const agentEvent = (agent: string, event: string) => (m: Msg): boolean =>
  m.method === "notify_agent_event" && Array.isArray(m.params) && isObject(m.params[0]) &&
  m.params[0].agent === agent && m.params[0].event === event;
const notification = (method: string) => (m: Msg): boolean => m.method === method;
const klipperServiceState = (sub: string) => (m: Msg): boolean =>
  m.method === "notify_service_state_changed" && Array.isArray(m.params) && isObject(m.params[0]) &&
  isObject(m.params[0].klipper) && m.params[0].klipper.sub_state === sub;

/** Identifies `name` as an agent and waits until every other open connection `others` was told. */
async function identifyAgent(rec: Recording, conn: string, agent: string, others: string[]): Promise<void> {
  await rec.call(conn, "server.connection.identify", identity(agent));
  for (const other of others) await rec.expect(other, agentEvent(agent, "connected"), `${agent} connected`);
}

/** Closes an agent's socket and waits until the others were told it left. */
async function closeAgent(rec: Recording, conn: string, agent: string, others: string[]): Promise<void> {
  await rec.close(conn);
  for (const other of others) await rec.expect(other, agentEvent(agent, "disconnected"), `${agent} disconnected`);
  await rec.quiet(SETTLE_MS);
}

/**
 * Sends server.extensions.request from web and answers it as the agent with `reply` (a result or an error object),
 * as an agent connected to Moonraker does (moonraker/components/extensions.py: _handle_call_agent).
 */
async function agentRequest(rec: Recording, method: string, args: unknown, reply: (req: Msg) => Msg): Promise<void> {
  const params: Msg = { agent: AGENT, method };
  if (args !== undefined) params.arguments = args;
  const pending = rec.call("web", "server.extensions.request", params);
  const request = await rec.expect("agent", (m) => m.method === method && m.id !== undefined, `the ${method} request`);
  rec.send("agent", { jsonrpc: "2.0", id: request.id, ...reply(request) });
  await pending;
}

interface Scenario {
  name: string;
  /** What it shows, for README.md. */
  about: string;
  run(rec: Recording): Promise<void>;
}

const SCENARIOS: Scenario[] = [
  {
    name: "identify_register",
    about:
      `web identifies, then agent identifies as \`${AGENT}\`: web gets \`notify_agent_event\` \`connected\` with the ` +
      `client data, the agent does not. \`connection.register_remote_method\` returns \`"ok"\`; \`server.extensions.list\` ` +
      "lists the agent; `server.websocket.id` equals the connection id. When the agent closes, web gets `disconnected` " +
      "and the list is empty.",
    async run(rec) {
      await rec.open("web");
      await rec.call("web", "server.connection.identify", identity(WEB, "web"));
      await rec.open("agent");
      await identifyAgent(rec, "agent", AGENT, ["web"]);
      await rec.call("agent", "connection.register_remote_method", { method_name: REMOTE_METHOD });
      await rec.call("web", "server.extensions.list");
      await rec.call("web", "server.websocket.id");
      await closeAgent(rec, "agent", AGENT, ["web"]);
      await rec.call("web", "server.extensions.list");
      await rec.close("web");
    },
  },
  {
    name: "remote_method_call",
    about:
      `The agent registers \`${REMOTE_METHOD}\`; web runs \`printer.gcode.script {"script":"${MACRO}"}\`. The agent ` +
      `gets a JSON-RPC notification without \`id\`: \`${JSON.stringify({ method: REMOTE_METHOD, params: MACRO_PARAMS })}\`; ` +
      `web's \`"ok"\` does not wait for the agent.`,
    async run(rec) {
      await rec.open("agent");
      await rec.call("agent", "server.connection.identify", identity(AGENT));
      await rec.call("agent", "connection.register_remote_method", { method_name: REMOTE_METHOD });
      // Moonraker answers "ok" before Klipper has registered the method (klippy_connection.py:
      // register_method_from_agent starts a task); a macro run before that is dropped by Klipper.
      await rec.quiet(500);
      await rec.open("web");
      await rec.call("web", "server.connection.identify", identity(WEB, "web"));
      const script = rec.call("web", "printer.gcode.script", { script: MACRO });
      await rec.expect("agent", notification(REMOTE_METHOD), `the ${REMOTE_METHOD} call`);
      await script;
      await closeAgent(rec, "agent", AGENT, ["web"]);
      await rec.close("web");
    },
  },
  {
    name: "extensions_request",
    about:
      "`server.extensions.request` from web reaches the agent as a request with a server-made `id` (`params` absent " +
      "when the arguments are empty; a list stays a list). The agent's `result` is relayed unchanged; an `error` reply " +
      `becomes 424 \`Agent ${AGENT} RPC error\` with the agent's error as \`data\`; a \`null\` result is an error too ` +
      "(424, `data` null). An unknown agent gives 400 `Agent nobody not connected`; `arguments` that are neither " +
      "object nor list give 400.",
    async run(rec) {
      await rec.open("agent");
      await rec.call("agent", "server.connection.identify", identity(AGENT));
      await rec.open("web");
      await rec.call("web", "server.connection.identify", identity(WEB, "web"));
      await agentRequest(rec, "recorder.status", { device: "abc" }, (req) => ({ result: { state: "idle", echo: req.params } }));
      await agentRequest(rec, "recorder.list_args", ["abc", 1], (req) => ({ result: { echo: req.params ?? null } }));
      await agentRequest(rec, "recorder.empty_args", {}, (req) => ({ result: { echo: req.params ?? null } }));
      await agentRequest(rec, "recorder.no_such_method", undefined, () => ({ error: { code: -32601, message: "Method not found" } }));
      await agentRequest(rec, "recorder.null_result", undefined, () => ({ result: null }));
      await rec.call("web", "server.extensions.request", { agent: "nobody", method: "recorder.status" });
      await rec.call("web", "server.extensions.request", { agent: AGENT, method: "recorder.status", arguments: "abc" });
      await closeAgent(rec, "agent", AGENT, ["web"]);
      await rec.close("web");
    },
  },
  {
    name: "send_event",
    about:
      "The agent sends `connection.send_event` and gets `\"ok\"`; the other clients get `notify_agent_event` " +
      `\`[{"agent":"${AGENT}","event":...,"data":...}]\`; without data (or with \`null\`) the \`data\` key is absent; ` +
      "a list is passed on as it is.",
    async run(rec) {
      await rec.open("web");
      await rec.call("web", "server.connection.identify", identity(WEB, "web"));
      await rec.open("agent");
      await identifyAgent(rec, "agent", AGENT, ["web"]);
      const events: Msg[] = [
        { event: "progress", data: { device: "abc", stage: "flashing", percent: 42, message: "writing block 21/50" } },
        { event: "done" },
        { event: "cleared", data: null },
        { event: "log", data: ["line 1", 2] },
      ];
      for (const params of events) {
        await rec.call("agent", "connection.send_event", params);
        await rec.expect("web", agentEvent(AGENT, String(params.event)), `the ${String(params.event)} event`);
      }
      await closeAgent(rec, "agent", AGENT, ["web"]);
      await rec.close("web");
    },
  },
  {
    name: "services_stop_start",
    about:
      "web subscribes to `webhooks` and `print_stats.state`; the agent stops Klipper (`machine.services.stop`): both " +
      "get `notify_klippy_disconnected` (the agent before its `\"ok\"`), then `notify_service_state_changed` " +
      "`inactive/stopped` from Moonraker's service poll. While Klipper is down `printer.info` gives 503 `Klippy Host " +
      "not connected`. `machine.services.start`: `inactive/starting`, `\"ok\"`, `active/running`, `notify_klippy_ready`. " +
      `\`${MACRO}\` then still reaches the agent: Moonraker registers agent methods with the new Klipper again.`,
    async run(rec) {
      const both = ["web", "agent"];
      await rec.open("web");
      await rec.call("web", "server.connection.identify", identity(WEB, "web"));
      await rec.call("web", "printer.objects.subscribe", { objects: { webhooks: null, print_stats: ["state"] } });
      await rec.open("agent");
      await identifyAgent(rec, "agent", AGENT, ["web"]);
      await rec.call("agent", "connection.register_remote_method", { method_name: REMOTE_METHOD });
      const stopped = await rec.call("agent", "machine.services.stop", { service: "klipper" });
      for (const conn of both) await rec.expect(conn, notification("notify_klippy_disconnected"), "klippy disconnected");
      for (const conn of both) await rec.expect(conn, klipperServiceState("stopped"), "klipper stopped", 15_000);
      await rec.quiet(SETTLE_MS);
      await rec.call("agent", "server.info");
      await rec.call("web", "printer.info");
      const started = await rec.call("agent", "machine.services.start", { service: "klipper" }, 20_000);
      for (const conn of both) await rec.expect(conn, klipperServiceState("running"), "klipper running", 15_000);
      for (const conn of both) await rec.expect(conn, notification("notify_klippy_ready"), "klippy ready", 30_000);
      await rec.quiet(1000);
      await rec.call("agent", "server.info");
      const script = rec.call("web", "printer.gcode.script", { script: MACRO });
      await rec.expect("agent", notification(REMOTE_METHOD), `the ${REMOTE_METHOD} call`);
      await script;
      await closeAgent(rec, "agent", AGENT, ["web"]);
      await rec.close("web");
      // Moonraker polls supervisorctl every 2 s (machine.py: SupervisordCliProvider), so a short state (stopping,
      // starting) may fall between two polls, and a poll may come before or after the action's reply. The recording
      // keeps the sequence a client sees most of the time: stopped after the stop's "ok", starting before the
      // start's "ok", running after it.
      const agentSaw = rec.received("agent");
      const states = agentSaw.filter((m) => m.method === "notify_service_state_changed").map((m) => {
        const p = m.params;
        const state = Array.isArray(p) && isObject(p[0]) && isObject(p[0].klipper) ? String(p[0].klipper.sub_state) : "other";
        return agentSaw.indexOf(m) < agentSaw.indexOf(stopped) ? `${state} (before the stop's ok)`
          : agentSaw.indexOf(m) > agentSaw.indexOf(started) ? `${state} (after the start's ok)` : state;
      });
      const typical = ["stopped", "starting", "running (after the start's ok)"];
      if (states.join(", ") !== typical.join(", ")) throw new Retry(`service states seen: ${states.join(", ")}`);
    },
  },
  {
    name: "objects_query",
    about:
      "`printer.info`, `server.info`, `printer.objects.list`, `printer.objects.query {print_stats, configfile: " +
      "[settings], mcu, webhooks}`, a query for an unknown object (`{}`) and field (`null`), and `machine.system_info` (`provider`, " +
      "`available_services`, `service_state`, `instance_ids` for supervisord_cli).",
    async run(rec) {
      await rec.open("agent");
      await rec.call("agent", "server.connection.identify", identity(AGENT));
      await rec.call("agent", "printer.info");
      await rec.call("agent", "server.info");
      await rec.call("agent", "printer.objects.list");
      await rec.call("agent", "printer.objects.query", {
        objects: { print_stats: null, configfile: ["settings"], mcu: null, webhooks: null },
      });
      await rec.call("agent", "printer.objects.query", { objects: { "mcu nope": null, webhooks: ["state", "nope"] } });
      await rec.call("agent", "machine.system_info");
      await rec.close("agent");
    },
  },
  {
    name: "errors",
    about:
      "Unknown methods (-32601 `Method not found`); services that are not allowed, `stop moonraker`, a missing " +
      "`service` (400 `No data for argument: service`) and a number for it (converted with `str()`); identifying " +
      "twice; agent-only endpoints from a web client; an invalid client type; registering a method twice, from a " +
      "second agent, and Moonraker's own `shutdown_machine`; a missing `method_name`; the reserved event " +
      "`connected`; a duplicate agent name (the connection stays identified, with type `\"\"`); `printer.objects.query` " +
      `without objects; \`NOT_A_COMMAND\` (a console line and \`"ok"\`); \`${MACRO}\` after its agent left (\`"ok"\`, ` +
      "dropped); a request without `method` (no reply).",
    async run(rec) {
      await rec.open("web");
      await rec.call("web", "server.info");
      await rec.call("web", "server.connection.identify", identity(WEB, "web"));
      await rec.call("web", "printer.nope");
      await rec.call("web", "machine.services.nope");
      await rec.call("web", "machine.services.stop", { service: "nope" });
      await rec.call("web", "machine.services.stop", { service: "klipper_2" });
      await rec.call("web", "machine.services.stop", { service: "moonraker" });
      await rec.call("web", "machine.services.stop");
      await rec.call("web", "machine.services.stop", { service: 5 });
      await rec.call("web", "server.connection.identify", identity(WEB, "web"));
      await rec.call("web", "connection.register_remote_method", { method_name: REMOTE_METHOD });
      await rec.call("web", "connection.send_event", { event: "progress" });
      await rec.call("web", "printer.objects.query", {});
      await rec.open("agent");
      await rec.call("agent", "server.connection.identify", identity(AGENT, "bogus"));
      await rec.open("agent2");
      await identifyAgent(rec, "agent", AGENT, ["web", "agent2"]);
      await rec.call("agent", "connection.register_remote_method", { method_name: REMOTE_METHOD });
      await rec.call("agent", "connection.register_remote_method", { method_name: REMOTE_METHOD });
      await rec.call("agent", "connection.register_remote_method", {});
      await rec.call("agent", "connection.send_event", { event: "connected" });
      await rec.call("agent2", "server.connection.identify", identity(AGENT));
      await rec.call("agent2", "server.connection.identify", identity(AGENT2));
      await rec.open("agent3");
      await identifyAgent(rec, "agent3", AGENT2, ["web", "agent", "agent2"]);
      await rec.call("agent3", "connection.register_remote_method", { method_name: REMOTE_METHOD });
      await rec.call("agent3", "connection.register_remote_method", { method_name: "shutdown_machine" });
      await rec.call("agent2", "connection.send_event", { event: "progress" });
      const script = rec.call("web", "printer.gcode.script", { script: "NOT_A_COMMAND" });
      for (const conn of ["web", "agent", "agent2", "agent3"]) {
        await rec.expect(conn, notification("notify_gcode_response"), "the console line");
      }
      await script;
      await closeAgent(rec, "agent", AGENT, ["web", "agent2", "agent3"]);
      await rec.call("web", "printer.gcode.script", { script: MACRO });
      rec.send("web", { jsonrpc: "2.0", id: 999 });
      await rec.quiet(1000);
      await rec.close("agent2");
      await closeAgent(rec, "agent3", AGENT2, ["web"]);
      await rec.close("web");
    },
  },
];

// --- normalisation ---

const PLACEHOLDER_CPU = "<cpu>";
const RECORDER_MACROS = new Set([MACRO]);

interface HostFacts {
  home: string;
}

/** Keeps `gcode_macro NAME` only for the recorder's own macros. */
const foreignMacro = (name: string): boolean => {
  const match = /^gcode_macro\s+(\S+)$/i.exec(name);
  return match !== null && !RECORDER_MACROS.has((match[1] ?? "").toUpperCase());
};

function withoutForeignMacros(obj: unknown): unknown {
  if (!isObject(obj)) return obj;
  return Object.fromEntries(Object.entries(obj).filter(([key]) => !foreignMacro(key)));
}

function zeroNumbers(value: unknown): unknown {
  if (typeof value === "number") return 0;
  if (Array.isArray(value)) return value.map(zeroNumbers);
  if (isObject(value)) return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, zeroNumbers(v)]));
  return value;
}

/** Printer object status, as printer.objects.query/subscribe and notify_status_update carry it. */
function normaliseStatus(status: unknown): unknown {
  if (!isObject(status)) return status;
  const out: Msg = {};
  for (const [name, value] of Object.entries(status)) {
    if (foreignMacro(name)) continue;
    if (!isObject(value)) {
      out[name] = value;
      continue;
    }
    const obj: Msg = { ...value };
    if (name === "mcu" || name.startsWith("mcu ")) {
      // Traffic counters and clock estimates change from second to second; the compiler is the host's.
      if ("last_stats" in obj) obj.last_stats = zeroNumbers(obj.last_stats);
      if (typeof obj.mcu_build_versions === "string") obj.mcu_build_versions = "<build versions>";
    }
    if (name === "configfile") {
      if ("settings" in obj) obj.settings = withoutForeignMacros(obj.settings);
      if ("config" in obj) obj.config = withoutForeignMacros(obj.config);
    }
    out[name] = obj;
  }
  return out;
}

function placeholders(obj: unknown, fields: Record<string, string>): void {
  if (!isObject(obj)) return;
  for (const [key, placeholder] of Object.entries(fields)) if (typeof obj[key] === "string") obj[key] = placeholder;
}

/** machine.system_info: the host's identity and the versions of its system. */
function normaliseSystemInfo(result: unknown): void {
  const info = isObject(result) ? result.system_info : undefined;
  if (!isObject(info)) return;
  placeholders(info.python, { version_string: "<python version>" });
  placeholders(info.cpu_info, {
    bits: "<bits>", processor: "<processor>", cpu_desc: PLACEHOLDER_CPU, serial_number: "<serial number>",
    hardware_desc: "<hardware>", model: "<model>",
  });
  if (isObject(info.cpu_info) && typeof info.cpu_info.total_memory === "number") info.cpu_info.total_memory = 0;
  placeholders(info.distribution, {
    name: "<distribution>", id: "<distribution id>", version: "<distribution version>", like: "<distribution like>",
    codename: "<codename>", kernel_version: "<kernel version>",
  });
  if (isObject(info.distribution) && isObject(info.distribution.version_parts)) {
    const parts = info.distribution.version_parts;
    for (const key of Object.keys(parts)) if (typeof parts[key] === "string") parts[key] = "<version part>";
  }
  placeholders(info.virtualization, { virt_type: "<virtualization>", virt_identifier: "<virtualization>" });
  if (isObject(info.sd_info)) {
    for (const key of Object.keys(info.sd_info)) {
      if (typeof info.sd_info[key] === "string") info.sd_info[key] = "<sd card>";
    }
  }
  if (isObject(info.network)) {
    for (const iface of Object.values(info.network)) {
      if (!isObject(iface)) continue;
      if (typeof iface.mac_address === "string") iface.mac_address = "00:00:00:00:00:00";
      if (!Array.isArray(iface.ip_addresses)) continue;
      for (const addr of iface.ip_addresses) {
        if (isObject(addr) && typeof addr.address === "string") addr.address = addr.family === "ipv6" ? "::1" : "127.0.0.1";
      }
    }
  }
}

/** Every string: the home directory becomes "~"; every "eventtime" is 0. */
function normaliseEverywhere(value: unknown, host: HostFacts): unknown {
  if (typeof value === "string") {
    if (host.home.length <= 1) return value;
    return value === host.home ? "~" : value.split(`${host.home}/`).join("~/");
  }
  if (Array.isArray(value)) return value.map((v) => normaliseEverywhere(v, host));
  if (isObject(value)) {
    return Object.fromEntries(
      Object.entries(value).map(([k, v]) => [k, k === "eventtime" && typeof v === "number" ? 0 : normaliseEverywhere(v, host)]),
    );
  }
  return value;
}

function normalise(lines: Line[], host: HostFacts): Line[] {
  const requestMethods = new Map<string, string>();
  // A connection id describes the connection that receives it (identify, websocket.id), so it is keyed by that.
  const connectionIds = new Map<string, number>();
  const connectionId = (conn: string, v: unknown): unknown => {
    if (typeof v !== "number") return v;
    if (!connectionIds.has(conn)) connectionIds.set(conn, 100001 + connectionIds.size);
    return connectionIds.get(conn);
  };
  // Moonraker's ids for requests to an agent are Python id()s, which come back once the old request is freed:
  // each request gets the next number, and the agent's reply the number of the latest request with its id.
  let serverRequests = 0;
  const serverRequestIds = new Map<string, number>();
  const out = lines.map((line): Line => {
    const msg = structuredClone(line.msg);
    const isRequest = typeof msg.method === "string";
    const key = `${line.conn}:${JSON.stringify(msg.id)}`;
    if (line.dir === "send" && isRequest && msg.id !== undefined) requestMethods.set(key, msg.method as string);
    if (line.dir === "recv" && isRequest && msg.id !== undefined) {
      serverRequestIds.set(key, 200001 + serverRequests++);
      msg.id = serverRequestIds.get(key);
    }
    if (line.dir === "send" && !isRequest && serverRequestIds.has(key)) msg.id = serverRequestIds.get(key);
    if (line.dir === "recv" && !isRequest && isObject(msg.result)) {
      const result = msg.result;
      switch (requestMethods.get(key)) {
        case "server.connection.identify":
          result.connection_id = connectionId(line.conn, result.connection_id);
          break;
        case "server.websocket.id":
          result.websocket_id = connectionId(line.conn, result.websocket_id);
          break;
        case "printer.info":
          if (typeof result.process_id === "number") result.process_id = 0;
          placeholders(result, { hostname: "<hostname>", cpu_info: PLACEHOLDER_CPU });
          break;
        case "printer.objects.list":
          if (Array.isArray(result.objects)) result.objects = result.objects.filter((o) => typeof o !== "string" || !foreignMacro(o));
          break;
        case "printer.objects.query":
        case "printer.objects.subscribe":
          result.status = normaliseStatus(result.status);
          break;
        case "machine.system_info":
          normaliseSystemInfo(result);
          break;
      }
    }
    if (line.dir === "recv" && msg.method === "notify_status_update" && Array.isArray(msg.params)) {
      msg.params = [normaliseStatus(msg.params[0]), ...msg.params.slice(1).map((p) => (typeof p === "number" ? 0 : p))];
    }
    return { conn: line.conn, dir: line.dir, msg: normaliseEverywhere(msg, host) as Msg };
  });
  return groupReceivedByConnection(out);
}

/** Between two sends, received lines are ordered by connection (first-seen order), each connection's order kept. */
function groupReceivedByConnection(lines: Line[]): Line[] {
  const rank = new Map<string, number>();
  for (const line of lines) if (!rank.has(line.conn)) rank.set(line.conn, rank.size);
  const out: Line[] = [];
  let run: Line[] = [];
  const flush = (): void => {
    out.push(...run.map((line, i) => ({ line, i })).sort((a, b) => (rank.get(a.line.conn)! - rank.get(b.line.conn)!) || a.i - b.i).map((x) => x.line));
    run = [];
  };
  for (const line of lines) {
    if (line.dir === "send") {
      flush();
      out.push(line);
    } else {
      run.push(line);
    }
  }
  flush();
  return out;
}

// --- the live printer ---

/** One unrecorded connection for checks before and between scenarios. */
async function control<T>(url: string, fn: (call: (method: string, params?: unknown) => Promise<Msg>) => Promise<T>): Promise<T> {
  const ws = new WebSocket(url);
  await new Promise<void>((resolve, reject) => {
    ws.once("open", () => resolve());
    ws.once("error", reject);
  });
  let nextId = 1;
  const pending = new Map<number, (m: Msg) => void>();
  ws.on("message", (data) => {
    const msg = JSON.parse(data.toString()) as Msg;
    if (typeof msg.id === "number" && !("method" in msg)) pending.get(msg.id)?.(msg);
  });
  const call = (method: string, params?: unknown): Promise<Msg> =>
    new Promise((resolve, reject) => {
      const id = nextId++;
      const timer = setTimeout(() => reject(new Error(`${method}: no reply within ${CALL_TIMEOUT_MS} ms`)), CALL_TIMEOUT_MS);
      pending.set(id, (m) => {
        clearTimeout(timer);
        resolve(m);
      });
      ws.send(JSON.stringify({ jsonrpc: "2.0", method, id, ...(params === undefined ? {} : { params }) }));
    });
  try {
    return await fn(call);
  } finally {
    ws.close();
    await new Promise((resolve) => ws.once("close", resolve));
  }
}

const resultOf = (reply: Msg, what: string): Msg => {
  if (!isObject(reply.result)) throw new Error(`${what}: ${JSON.stringify(reply.error ?? reply)}`);
  return reply.result;
};

/** Waits until Moonraker reports Klipper ready (it is so only after re-registering the agents' remote methods). */
async function waitReady(url: string, timeoutMs = 60_000): Promise<Msg> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await control(url, async (call) => resultOf(await call("server.info"), "server.info"));
    if (info.klippy_state === "ready") return info;
    if (Date.now() > deadline) throw new Error(`Klipper is not ready (Moonraker says ${String(info.klippy_state)})`);
    await sleep(500);
  }
}

interface LiveFacts {
  moonrakerVersion: string;
  apiVersion: string;
  klipperVersion: string;
  provider: string;
  /** Each service Moonraker may manage, with its state when the recording started. */
  services: string;
  host: HostFacts;
}

async function preflight(url: string, homeOption: string | undefined): Promise<LiveFacts> {
  const server = await waitReady(url);
  return control(url, async (call) => {
    const agents = resultOf(await call("server.extensions.list"), "server.extensions.list").agents;
    if (Array.isArray(agents) && agents.length > 0) {
      const names = agents.map((a) => (isObject(a) ? String(a.name) : "?")).join(", ");
      throw new Error(`agent(s) connected: ${names}. Their traffic would end up in the recording; stop them first.`);
    }
    const objects = resultOf(await call("printer.objects.list"), "printer.objects.list").objects;
    if (!Array.isArray(objects) || !objects.includes(`gcode_macro ${MACRO}`)) {
      throw new Error(`Klipper has no [gcode_macro ${MACRO}]; add it (see this script's header) and restart Klipper.`);
    }
    const printer = resultOf(await call("printer.info"), "printer.info");
    const configFile = String(printer.config_file ?? "");
    const system = resultOf(await call("machine.system_info"), "machine.system_info").system_info;
    const states = isObject(system) && isObject(system.service_state) ? system.service_state : {};
    const services = Object.entries(states)
      .map(([name, st]) => `\`${name}\` (${isObject(st) ? `${String(st.active_state)}/${String(st.sub_state)}` : "?"})`)
      .join(", ");
    const home = homeOption ?? /^(.*)\/printer_data\/config\/[^/]+$/.exec(configFile)?.[1] ?? os.homedir();
    return {
      moonrakerVersion: String(server.moonraker_version),
      apiVersion: String(server.api_version_string),
      klipperVersion: String(printer.software_version),
      provider: isObject(system) ? String(system.provider) : "?",
      services,
      host: { home: home.startsWith("~") ? home : path.resolve(home) },
    };
  });
}

async function recordScenario(url: string, scenario: Scenario, host: HostFacts): Promise<Line[]> {
  for (let attempt = 1; ; attempt++) {
    await waitReady(url);
    // Lets Moonraker finish with the previous scenario's sockets before a new one starts.
    await sleep(500);
    const rec = new Recording(url);
    try {
      await scenario.run(rec);
      return normalise(rec.lines, host);
    } catch (err) {
      rec.terminateAll();
      if (!(err instanceof Retry) || attempt >= ATTEMPTS) throw err;
      console.log(`  ${scenario.name}: ${err.message}; recording it again`);
    }
  }
}

function readme(facts: LiveFacts, command: string): string {
  const date = new Date().toISOString().slice(0, 10);
  return `# Moonraker traffic recorded from a real Moonraker + Klipper

Recorded ${date} by \`${command}\` (scripts/record-moonraker.ts) from Moonraker \`${facts.moonrakerVersion}\`
(API \`${facts.apiVersion}\`) and Klipper \`${facts.klipperVersion}\`. test/conformance/fixtures.test.ts replays each
file against the fake Moonraker (test/support/fake-moonraker) and fails where the fake answers differently. When
Moonraker or Klipper ships a new release, record again against it: the test then shows what changed.
test/conformance/recorder.test.ts runs the recorder against the fake and checks that it records the same.

## The printer

Moonraker's \`[machine] provider: ${facts.provider}\` with the services ${facts.services} (the conformance test gives
the fake the same services). No other agent may be connected while recording (the recorder checks; on the rig,
\`supervisorctl -c /work/rig/supervisord.conf stop moonflash\` first). test/conformance/fixtures.test.ts configures the fake
like the printer these came from: Klipper's Linux host MCU as the only MCU and this printer.cfg (record from a printer
configured the same way, or the test will show the differences in config):

\`\`\`ini
[mcu]
serial: /tmp/klipper_host_mcu

[printer]
kinematics: none
max_velocity: 1
max_accel: 1

[respond]

[virtual_sdcard]
path: ~/printer_data/gcodes

[pause_resume]

[display_status]

[include moonflash.cfg]
[include rig_tests.cfg]
\`\`\`

The recording needs the macro that makes the remote-method call it records (here in rig_tests.cfg):

\`\`\`ini
[gcode_macro ${MACRO}]
gcode:
  ${MACRO_GCODE}
\`\`\`

## Format

One JSON object a line: \`{"conn": "web"|"agent"|"agent2"|"agent3", "dir": "send"|"recv", "msg": <JSON-RPC message>}\`.
\`web\` is a browser-like client; the others identify as the agents \`${AGENT}\` / \`${AGENT2}\` (the recorder plays all
of them; each its own websocket). Two markers are not protocol messages: \`{"_close": true}\` (send: the client closed
its socket) and \`{"_closed": true}\` (recv: the socket is closed). Within one connection the order is as received;
between two sends, received lines are grouped by connection.

Normalised, so that a new recording differs only where Moonraker or Klipper behave differently (a \`"<...>"\` string
stands for any string in the conformance test):

- \`notify_proc_stat_update\` (once a second, host load) is left out; no timestamps are kept.
- \`connection_id\` / \`websocket_id\` are 100001, 100002, ... (one number per connection, so a connection's
  \`websocket_id\` equals its \`connection_id\`); the ids of requests Moonraker sends to an agent are 200001, ...
  (one per request; the agent's reply carries the same number).
- \`eventtime\`, \`process_id\`, the mcu's \`last_stats\` and \`total_memory\` are 0.
- The hostname, CPU, compiler (\`mcu_build_versions\`) and the host system's versions (Python, distribution, kernel,
  virtualization) are placeholders; MAC addresses are \`00:00:00:00:00:00\`, IP addresses \`127.0.0.1\` / \`::1\`; the
  home directory (the one holding printer_data) is \`~\`.
- Macros other than \`${MACRO}\` are the printer's own config (moonflash.cfg, rig tests), not Moonraker's or
  Klipper's behaviour: they are left out of \`printer.objects.list\` and \`configfile\`.

## Scenarios

${SCENARIOS.map((s) => `- \`${s.name}.jsonl\`: ${s.about}`).join("\n")}
`;
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      url: { type: "string" },
      out: { type: "string" },
      scenario: { type: "string", multiple: true },
      home: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  const usage = "usage: npm run record:moonraker -- --url ws://HOST:7125/websocket --out DIR [--scenario NAME]... [--home DIR]";
  if (values.help) {
    console.log(`${usage}\nscenarios: ${SCENARIOS.map((s) => s.name).join(", ")}`);
    return 0;
  }
  if (values.url === undefined || values.out === undefined) {
    console.error(usage);
    return 2;
  }
  const unknown = (values.scenario ?? []).filter((name) => !SCENARIOS.some((s) => s.name === name));
  if (unknown.length > 0) {
    console.error(`unknown scenario(s): ${unknown.join(", ")}; known: ${SCENARIOS.map((s) => s.name).join(", ")}`);
    return 2;
  }
  const chosen = values.scenario ? SCENARIOS.filter((s) => values.scenario?.includes(s.name)) : SCENARIOS;
  const facts = await preflight(values.url, values.home);
  console.log(`Moonraker ${facts.moonrakerVersion} (API ${facts.apiVersion}), Klipper ${facts.klipperVersion}`);
  await fs.mkdir(values.out, { recursive: true });
  for (const scenario of chosen) {
    const started = Date.now();
    const lines = await recordScenario(values.url, scenario, facts.host);
    const file = path.join(values.out, `${scenario.name}.jsonl`);
    await fs.writeFile(file, lines.map((line) => JSON.stringify(line)).join("\n") + "\n");
    console.log(`${file}: ${lines.length} lines (${((Date.now() - started) / 1000).toFixed(1)} s)`);
  }
  if (chosen.length === SCENARIOS.length) {
    const command = `npm run record:moonraker -- --url ${values.url} --out ${values.out}`;
    await fs.writeFile(path.join(values.out, "README.md"), readme(facts, command));
  } else {
    console.log("README.md not rewritten: only some scenarios were recorded");
  }
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(`record-moonraker: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
