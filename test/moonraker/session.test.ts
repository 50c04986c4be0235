// The agent session against the fake Moonraker (real unix socket and websocket, recorded behaviour).

import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { pino, type Logger } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MoonflashError, isMoonflashError } from "../../src/core/errors.js";
import type { PrinterState } from "../../src/core/printer.js";
import { AgentSession, type AgentSessionOptions, type MoonrakerEndpoint } from "../../src/moonraker/index.js";
import {
  startFakeMoonraker,
  type FakeMoonraker,
  type FakeMoonrakerOptions,
  type TestClient,
} from "../support/fake-moonraker/index.js";

const METHODS = ["moonflash_flash", "moonflash.status"];

interface LogLine {
  level: number;
  msg: string;
}

/** A debug-level pino logger that keeps every line, so tests can count attempts and warnings. */
function capturingLogger(): { logger: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => void lines.push(JSON.parse(line) as LogLine) });
  return { logger, lines };
}

const WARN = 40;
const ERROR = 50;

interface Call {
  method: string;
  params: Record<string, unknown>;
  viaMacro: boolean;
}

let dir: string;
let fake: FakeMoonraker | undefined;
let session: AgentSession | undefined;
const clients: TestClient[] = [];

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), "moonflash-session-"));
});

afterEach(async () => {
  await session?.stop();
  session = undefined;
  for (const client of clients.splice(0)) await client.close();
  await fake?.stop();
  fake = undefined;
  await fs.rm(dir, { recursive: true, force: true });
});

async function startFake(options: Partial<FakeMoonrakerOptions> = {}): Promise<FakeMoonraker> {
  fake = await startFakeMoonraker({ dataDir: dir, ...options });
  return fake;
}

function unixEndpoint(): MoonrakerEndpoint {
  return { kind: "unix", path: path.join(dir, "comms", "moonraker.sock") };
}

function createSession(
  endpoint: MoonrakerEndpoint,
  overrides: Partial<AgentSessionOptions> = {},
): { session: AgentSession; calls: Call[]; lines: LogLine[] } {
  const calls: Call[] = [];
  const { logger, lines } = capturingLogger();
  session = new AgentSession({
    endpoint,
    clientName: "moonflash",
    version: "0.1.0",
    url: "https://github.com/moonflash/moonflash",
    methods: METHODS,
    onCall: async (method, params, info) => {
      calls.push({ method, params, viaMacro: info.viaMacro });
      if (method === "moonflash.status") return { state: "idle", echo: params };
      return undefined;
    },
    logger,
    backoff: { initialMs: 20, maxMs: 200 },
    requestTimeoutMs: 2_000,
    ...overrides,
  });
  return { session, calls, lines };
}

function nextEvent(target: AgentSession, event: "identified" | "disconnected"): Promise<void> {
  return new Promise((resolve) => {
    const listener = (): void => {
      target.off(event, listener);
      resolve();
    };
    target.on(event, listener);
  });
}

async function startIdentified(
  endpoint: MoonrakerEndpoint = unixEndpoint(),
  overrides: Partial<AgentSessionOptions> = {},
): Promise<{ session: AgentSession; calls: Call[]; lines: LogLine[] }> {
  const created = createSession(endpoint, overrides);
  const identified = nextEvent(created.session, "identified");
  created.session.start();
  await identified;
  return created;
}

function stateReached(target: AgentSession, predicate: (state: PrinterState) => boolean): Promise<PrinterState> {
  return new Promise((resolve, reject) => {
    if (predicate(target.state())) {
      resolve(target.state());
      return;
    }
    const timer = setTimeout(() => {
      unsubscribe();
      reject(new Error(`state not reached; last: ${JSON.stringify(target.state())}`));
    }, 3_000);
    const unsubscribe = target.onStateChange((state) => {
      if (!predicate(state)) return;
      clearTimeout(timer);
      unsubscribe();
      resolve(state);
    });
  });
}

async function webClient(server: FakeMoonraker): Promise<TestClient> {
  const client = await server.connectClient({ transport: "unix", name: "web" });
  clients.push(client);
  return client;
}

async function errorOf(promise: Promise<unknown>): Promise<MoonflashError> {
  const err = await promise.then(
    () => new Error("expected a rejection"),
    (e: unknown) => e,
  );
  if (!isMoonflashError(err)) throw new Error(`expected a MoonflashError, got ${String(err)}`);
  return err;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

describe("handshake", () => {
  it("identifies as an agent and registers every remote method over the unix socket", async () => {
    const server = await startFake();

    const { session: agent } = await startIdentified();

    expect(server.agents()).toEqual([
      { name: "moonflash", version: "0.1.0", type: "agent", url: "https://github.com/moonflash/moonflash" },
    ]);
    expect(server.remoteMethods().sort()).toEqual([...METHODS].sort());
    expect(agent.identified).toBe(true);
    expect(typeof agent.connectionId).toBe("number");
    expect(agent.state()).toMatchObject({
      moonrakerConnected: true,
      klippyConnected: true,
      klippyState: "ready",
      printState: "standby",
      idleState: "Idle",
      klipperService: "klipper",
      moonrakerVersion: "v0.10.0-31-gd5ee171",
      services: { klipper: { active_state: "active", sub_state: "running" } },
    });
  });

  it("identifies over the websocket, sending the api key Moonraker asks for", async () => {
    const server = await startFake({ apiKey: "0123456789abcdef" });

    await startIdentified({ kind: "ws", url: server.wsUrl, apiKey: "0123456789abcdef" });

    expect(server.agents().map((a) => a.name)).toEqual(["moonflash"]);
    expect(server.remoteMethods().sort()).toEqual([...METHODS].sort());
  });

  it("takes the Klipper unit name from machine.system_info instance_ids", async () => {
    await startFake({ klipper: { serviceName: "klipper-1" } });

    const { session: agent } = await startIdentified();

    expect(agent.state().klipperService).toBe("klipper-1");
  });
});

describe("calls from Moonraker", () => {
  it("answers server.extensions.request with the handler's result, or \"ok\" when it returns nothing", async () => {
    const server = await startFake();
    const { calls } = await startIdentified();
    const web = await webClient(server);

    const status = await web.call("server.extensions.request", {
      agent: "moonflash",
      method: "moonflash.status",
      arguments: { mcu: "toolhead" },
    });
    const flash = await web.call("server.extensions.request", { agent: "moonflash", method: "moonflash_flash" });

    expect(status).toEqual({ state: "idle", echo: { mcu: "toolhead" } });
    expect(flash).toBe("ok");
    expect(calls).toEqual([
      { method: "moonflash.status", params: { mcu: "toolhead" }, viaMacro: false },
      { method: "moonflash_flash", params: {}, viaMacro: false },
    ]);
  });

  it("relays a thrown MoonflashError as Moonraker's 424 with our code in data, and unknown methods as -32601", async () => {
    const server = await startFake();
    await startIdentified(unixEndpoint(), {
      onCall: async () => {
        throw new MoonflashError("BUSY", "A flash job is running. Wait for it to finish.", { jobId: "j1" });
      },
    });
    const web = await webClient(server);

    const busy = web.call("server.extensions.request", { agent: "moonflash", method: "moonflash_flash" });
    const unknown = web.call("server.extensions.request", { agent: "moonflash", method: "moonflash.nope" });

    await expect(busy).rejects.toMatchObject({
      code: 424,
      message: "Agent moonflash RPC error",
      data: {
        code: 409,
        message: "A flash job is running. Wait for it to finish.",
        data: { code: "BUSY", details: { jobId: "j1" } },
      },
    });
    await expect(unknown).rejects.toMatchObject({
      code: 424,
      data: { code: -32601, message: "Method not found" },
    });
  });

  it("hands a macro's action_call_remote_method to onCall with viaMacro", async () => {
    const server = await startFake({
      klipper: { macros: { FLASH_ALL: { method: "moonflash_flash", params: { mcu: "all", force: 1 } } } },
    });
    const { calls } = await startIdentified();
    const web = await webClient(server);

    await web.call("printer.gcode.script", { script: "FLASH_ALL" });
    await server.waitFor(() => calls.length > 0);

    expect(calls).toEqual([{ method: "moonflash_flash", params: { mcu: "all", force: 1 }, viaMacro: true }]);
  });
});

describe("connection lifecycle", () => {
  it("re-identifies and re-registers after Moonraker restarts", async () => {
    const server = await startFake();
    const { session: agent } = await startIdentified();
    const firstId = agent.connectionId;
    const disconnected = nextEvent(agent, "disconnected");
    const identifiedAgain = nextEvent(agent, "identified");

    await server.restart(100);
    await disconnected;
    await identifiedAgain;

    expect(agent.connectionId).not.toBe(firstId);
    expect(server.agents().map((a) => a.name)).toEqual(["moonflash"]);
    expect(server.remoteMethods().sort()).toEqual([...METHODS].sort());
    expect(agent.state().klippyState).toBe("ready");
  });

  it("backs off while another agent holds the name, logs one error, and takes over once it leaves", async () => {
    const server = await startFake();
    const other = await server.connectClient({ transport: "unix", name: "moonflash", type: "agent" });
    const { session: agent, lines } = createSession(unixEndpoint());

    agent.start();
    await sleep(1_000);

    const attempts = lines.filter((l) => l.msg === "connecting to Moonraker").length;
    // 20 ms doubling to 200 ms (±20 % jitter) fits about 8 attempts into a second; a spin would make hundreds.
    expect(attempts).toBeGreaterThanOrEqual(3);
    expect(attempts).toBeLessThanOrEqual(12);
    const errors = lines.filter((l) => l.level >= ERROR);
    expect(errors).toHaveLength(1);
    expect(errors[0]?.msg).toMatch(/another moonflash agent is connected/);
    expect(agent.identified).toBe(false);

    const identified = nextEvent(agent, "identified");
    await other.close();
    await identified;
    expect(server.agents().map((a) => a.name)).toEqual(["moonflash"]);
  });

  it("keeps retrying without crashing while the socket is missing, warning once", async () => {
    const { session: agent, lines } = createSession(unixEndpoint());

    agent.start();
    await sleep(400);

    expect(lines.filter((l) => l.msg === "connecting to Moonraker").length).toBeGreaterThanOrEqual(2);
    expect(lines.filter((l) => l.level === WARN)).toHaveLength(1);
    expect((await errorOf(agent.gcode("M117 hi"))).code).toBe("MOONRAKER_UNAVAILABLE");
    expect((await errorOf(agent.mcuReport())).code).toBe("MOONRAKER_UNAVAILABLE");
    expect(agent.state().moonrakerConnected).toBe(false);

    const identified = nextEvent(agent, "identified");
    await startFake();
    await identified;
    expect(agent.state().moonrakerConnected).toBe(true);
  });
});

describe("services", () => {
  it("stopService resolves on the inactive notification and startService once Klipper is ready again", async () => {
    // Long gaps after each "ok", so that resolving on the "ok" alone would show the old state.
    const server = await startFake({ timing: { stopOkMs: 20, stopStateMs: 150, startOkMs: 20, readyMs: 150 } });
    const { session: agent } = await startIdentified();

    await agent.stopService();

    expect(agent.state().services.klipper?.active_state).toBe("inactive");
    expect(agent.state().klippyConnected).toBe(false);
    expect(server.serviceActions.map((a) => `${a.action} ${a.service}`)).toEqual(["stop klipper"]);

    await agent.stopService();
    expect(server.serviceActions).toHaveLength(1);

    await agent.startService();

    expect(agent.state()).toMatchObject({
      klippyConnected: true,
      klippyState: "ready",
      services: { klipper: { active_state: "active", sub_state: "running" } },
    });
    expect(server.serviceActions.map((a) => `${a.action} ${a.service}`)).toEqual(["stop klipper", "start klipper"]);
    await agent.startService();
    expect(server.serviceActions).toHaveLength(2);
  });

  it("startService resolves when Klipper comes back in error, which only polling server.info can see", async () => {
    const server = await startFake();
    const { session: agent } = await startIdentified();
    await agent.stopService();
    server.klipper.setState("error", "MCU Protocol error");

    await agent.startService();

    expect(agent.state()).toMatchObject({ klippyConnected: true, klippyState: "error" });
  });

  it("fails with SERVICE_TIMEOUT naming the service when Moonraker never reports the change", async () => {
    await startFake({ timing: { stopOkMs: 10, stopStateMs: 60_000 } });
    const { session: agent } = await startIdentified();

    const err = await errorOf(agent.stopService(undefined, 300));

    expect(err.code).toBe("SERVICE_TIMEOUT");
    expect(err.message).toContain("'klipper'");
    expect(err.message).toContain("0.3 s");
    expect(err.details).toMatchObject({ service: "klipper", action: "stop" });
  });

  it("fails with SERVICE_FAILED carrying Moonraker's message when it refuses the action", async () => {
    await startFake();
    const { session: agent } = await startIdentified();

    const err = await errorOf(agent.stopService("nope"));

    expect(err.code).toBe("SERVICE_FAILED");
    expect(err.message).toContain("Service 'nope' not allowed");
  });
});

describe("printer state", () => {
  it("isPrinting follows print_stats and idle_timeout", async () => {
    const server = await startFake();
    const { session: agent } = await startIdentified();
    expect(agent.isPrinting()).toBe(false);

    server.klipper.setPrintState("printing");
    await stateReached(agent, (s) => s.printState === "printing");
    expect(agent.isPrinting()).toBe(true);

    server.klipper.setPrintState("paused");
    await stateReached(agent, (s) => s.printState === "paused");
    expect(agent.isPrinting()).toBe(true);

    server.klipper.setPrintState("complete");
    await stateReached(agent, (s) => s.printState === "complete");
    expect(agent.isPrinting()).toBe(false);

    server.klipper.setIdleState("Printing");
    await stateReached(agent, (s) => s.idleState === "Printing");
    expect(agent.isPrinting()).toBe(true);
  });

  it("notices Klipper entering error (no notification exists) by polling server.info", async () => {
    const server = await startFake({ klipper: { state: "startup" } });
    const { session: agent } = await startIdentified();
    expect(agent.state().klippyState).toBe("startup");

    server.klipper.setState("error", "MCU Protocol error");

    await stateReached(agent, (s) => s.klippyState === "error");
    expect(agent.state().klippyConnected).toBe(true);
    // The message comes from printer.info: server.info has none, and there is no subscription while not ready.
    await stateReached(agent, (s) => s.stateMessage === "MCU Protocol error");
  });

  it("subscribes again after notify_klippy_ready so print state keeps flowing", async () => {
    const server = await startFake();
    const { session: agent } = await startIdentified();
    await agent.stopService();
    await agent.startService();

    server.klipper.setPrintState("printing");

    await stateReached(agent, (s) => s.printState === "printing");
    expect(agent.isPrinting()).toBe(true);
  });
});

describe("printer requests", () => {
  it("mcuReport maps every [mcu*] section with the versions Klipper reports", async () => {
    await startFake({
      klipper: {
        softwareVersion: "v0.13.0-730-g84104bbbd",
        mcus: [
          {
            section: "mcu",
            settings: { serial: "/dev/serial/by-id/usb-Klipper_stm32f446xx_123-if00", baud: 250000, restart_method: "command" },
            mcu_version: "v0.12.0-85-gd785b396",
            mcu_build_versions: "gcc: 12.2.0 binutils: 2.40",
            mcu_constants: { MCU: "stm32f446xx", CLOCK_FREQ: 180000000 },
          },
          {
            section: "mcu toolhead",
            settings: { canbus_uuid: "0e0d81e4210c", canbus_interface: "can0" },
            mcu_version: "v0.13.0-730-g84104bbbd",
            mcu_build_versions: "gcc: 12.2.0 binutils: 2.40",
            mcu_constants: { MCU: "stm32g0b1xx" },
          },
        ],
      },
    });
    const { session: agent } = await startIdentified();

    const report = await agent.mcuReport();

    expect(report).toEqual({
      hostVersion: "v0.13.0-730-g84104bbbd",
      mcus: [
        {
          section: "mcu",
          name: "mcu",
          serial: "/dev/serial/by-id/usb-Klipper_stm32f446xx_123-if00",
          baud: 250000,
          restartMethod: "command",
          mcuVersion: "v0.12.0-85-gd785b396",
          mcuBuildVersions: "gcc: 12.2.0 binutils: 2.40",
          mcuType: "stm32f446xx",
        },
        {
          section: "mcu toolhead",
          name: "toolhead",
          canbusUuid: "0e0d81e4210c",
          canbusInterface: "can0",
          mcuVersion: "v0.13.0-730-g84104bbbd",
          mcuBuildVersions: "gcc: 12.2.0 binutils: 2.40",
          mcuType: "stm32g0b1xx",
        },
      ],
    });

    await agent.stopService();
    await expect(agent.mcuReport()).resolves.toEqual({ hostVersion: null, mcus: [] });
  });

  it("gcode reaches Klipper's console, and fails with KLIPPER_NOT_CONNECTED while Klipper is stopped", async () => {
    const server = await startFake();
    const { session: agent } = await startIdentified();

    await agent.gcode('RESPOND TYPE=command MSG="moonflash: hello"');
    expect(server.consoleLines).toContain("// moonflash: hello");

    await agent.stopService();
    expect((await errorOf(agent.gcode("RESPOND MSG=late"))).code).toBe("KLIPPER_NOT_CONNECTED");
  });

  it("sendEvent broadcasts notify_agent_event, leaving data out when there is none", async () => {
    const server = await startFake();
    const { session: agent } = await startIdentified();
    const web = await webClient(server);

    await agent.sendEvent("progress", { mcu: "toolhead", pct: 42 });
    await agent.sendEvent("done");

    const progress = await web.waitForNotification("notify_agent_event", (p) => JSON.stringify(p).includes("progress"));
    const done = await web.waitForNotification("notify_agent_event", (p) => JSON.stringify(p).includes("done"));
    expect(progress).toEqual([{ agent: "moonflash", event: "progress", data: { mcu: "toolhead", pct: 42 } }]);
    expect(done).toEqual([{ agent: "moonflash", event: "done" }]);
  });

  it("lists serial devices and CAN nodes from machine.peripherals", async () => {
    const device = {
      device_type: "usb",
      device_path: "/dev/ttyACM0",
      device_name: "ttyACM0",
      path_by_id: "/dev/serial/by-id/usb-katapult_stm32f446xx_123-if00",
      path_by_hardware: "/dev/serial/by-path/platform-xhci-hcd.0-usb-0:1:1.0",
      usb_location: "1:2",
      driver_name: "cdc_acm",
    };
    await startFake({
      serialDevices: [device],
      canbus: { can0: [{ uuid: "0e0d81e4210c", application: "Katapult" }] },
    });
    const { session: agent } = await startIdentified();

    await expect(agent.serialPeripherals()).resolves.toEqual([device]);
    await expect(agent.canbusNodes("can0")).resolves.toEqual([{ uuid: "0e0d81e4210c", application: "Katapult" }]);
    // A missing interface is Moonraker's 500 "Unable to bind socket…", passed on with its message.
    await expect(agent.canbusNodes("can1")).rejects.toMatchObject({ code: "MOONRAKER_REQUEST_FAILED", message: expect.stringContaining("Unable to bind socket to interface 'can1'") });
  });
});
