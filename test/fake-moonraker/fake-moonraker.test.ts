// Tests of the fake Moonraker itself: transports, auth, service notifications, printer state, restart.
import fs from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  EtxDecoder, RpcCallError, connectTestClient, mcuProtocolErrorMessage, startFakeMoonraker,
  type FakeMoonraker, type FakeMoonrakerOptions, type TestClient,
} from "../support/fake-moonraker/index.js";

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function start(opts: Omit<FakeMoonrakerOptions, "dataDir"> = {}): Promise<FakeMoonraker> {
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), "moonflash-fake-mr-"));
  cleanups.push(() => fs.rm(dataDir, { recursive: true, force: true }));
  const fake = await startFakeMoonraker({ dataDir, ...opts });
  cleanups.push(() => fake.stop());
  return fake;
}

async function client(fake: FakeMoonraker, opts: Parameters<FakeMoonraker["connectClient"]>[0] = {}): Promise<TestClient> {
  const c = await fake.connectClient(opts);
  cleanups.push(() => c.close());
  return c;
}

async function rpcError(promise: Promise<unknown>): Promise<{ code: number; message: string; data?: unknown }> {
  const err = await promise.then(
    () => { throw new Error("expected the call to fail"); },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(RpcCallError);
  const { code, message, data } = err as RpcCallError;
  return data === undefined ? { code, message } : { code, message, data };
}

/** Methods and reply ids in the order this client received them. */
function trace(c: TestClient): string[] {
  return c.received.map((m) => {
    const msg = m as Record<string, unknown>;
    if (typeof msg.method === "string") {
      const state = (msg.params as Array<Record<string, { sub_state?: string }>> | undefined)?.[0]?.klipper?.sub_state;
      return state === undefined ? msg.method : `${msg.method}:${state}`;
    }
    return `reply:${String(msg.id)}`;
  });
}

describe("fake Moonraker", () => {
  it("frames unix socket messages with ETX, across merged and split chunks", async () => {
    const fake = await start({ websocket: false });
    const socket = net.connect(fake.socketPath);
    cleanups.push(async () => void socket.destroy());
    await new Promise((resolve) => socket.once("connect", resolve));
    const decoder = new EtxDecoder();
    const replies: Array<Record<string, unknown>> = [];
    socket.on("data", (chunk: Buffer) => {
      for (const frame of decoder.push(chunk)) replies.push(JSON.parse(frame) as Record<string, unknown>);
    });
    const frame = (msg: unknown): Buffer => Buffer.from(`${JSON.stringify(msg)}\x03`, "utf8");
    // Two messages in one chunk, then a third (with a multi-byte character) split inside that character.
    socket.write(Buffer.concat([
      frame({ jsonrpc: "2.0", method: "server.websocket.id", id: 1 }),
      frame({ jsonrpc: "2.0", method: "printer.objects.list", id: 2 }),
    ]));
    const third = frame({ jsonrpc: "2.0", method: "printer.gcode.script", id: 3, params: { script: "RESPOND MSG=\"µ-split\"" } });
    const cut = third.indexOf(Buffer.from("µ", "utf8")) + 1;
    socket.write(third.subarray(0, cut));
    await new Promise((resolve) => setTimeout(resolve, 20));
    socket.write(third.subarray(cut));
    await fake.waitFor(() => replies.filter((r) => "id" in r).length === 3);

    const byId = new Map(replies.filter((r) => "id" in r).map((r) => [r.id, r]));
    expect(byId.get(1)?.result).toEqual({ websocket_id: expect.any(Number) });
    expect((byId.get(2)?.result as { objects: string[] }).objects).toContain("mcu");
    expect(byId.get(3)?.result).toBe("ok");
    expect(fake.consoleLines).toEqual(["echo: µ-split"]);
  });

  it("requires the api key on the websocket (header or identify), never on the unix socket", async () => {
    const fake = await start({ apiKey: "s3cret" });
    const anonymous = await client(fake, { transport: "ws", identify: false, apiKey: "" });
    expect(await rpcError(anonymous.call("server.info"))).toEqual({ code: -32602, message: "Unauthorized" });
    const identity = { client_name: "anon", version: "1", type: "web", url: "https://example.invalid/anon" };
    expect(await rpcError(anonymous.call("server.connection.identify", identity))).toEqual({ code: -32602, message: "Unauthorized" });
    expect(await rpcError(anonymous.call("server.connection.identify", { ...identity, api_key: "wrong" })))
      .toEqual({ code: -32602, message: "Unauthorized" });
    await anonymous.call("server.connection.identify", { ...identity, api_key: "s3cret" });
    expect(await anonymous.call("server.info")).toMatchObject({ klippy_connected: true });

    const withHeader = await client(fake, { transport: "ws", identify: false, apiKey: "s3cret" });
    expect(await withHeader.call("server.info")).toMatchObject({ klippy_state: "ready" });
    const unix = await client(fake, { transport: "unix", identify: false });
    expect(await unix.call("server.info")).toMatchObject({ klippy_state: "ready" });

    // An unauthenticated socket gets no notifications: only the authenticated ones see the agent arrive.
    const unauthenticated = await client(fake, { transport: "ws", identify: false, apiKey: "" });
    await client(fake, { transport: "unix", name: "agent-a", type: "agent" });
    await withHeader.waitForNotification("notify_agent_event");
    await unix.waitForNotification("notify_agent_event");
    expect(unauthenticated.notifications).toEqual([]);
  });

  it("stops and starts klipper with Moonraker's notification order", async () => {
    const fake = await start();
    const agent = await client(fake, { transport: "unix", name: "rigagent", type: "agent" });
    const web = await client(fake, { transport: "ws" });
    const before = agent.received.length;

    expect(await agent.call("machine.services.stop", { service: "klipper" })).toBe("ok");
    await agent.waitForNotification("notify_service_state_changed");
    expect(fake.klipper.serviceActive).toBe(false);
    expect(await rpcError(web.call("printer.info"))).toEqual({ code: 503, message: "Klippy Host not connected" });
    expect(await rpcError(web.call("printer.gcode.script", { script: "RESPOND MSG=hi" })))
      .toEqual({ code: 503, message: "Klippy Host not connected" });
    expect(await web.call("server.info")).toMatchObject({ klippy_connected: false, klippy_state: "disconnected" });

    expect(await agent.call("machine.services.start", { service: "klipper" })).toBe("ok");
    await agent.waitForNotification("notify_klippy_ready");
    expect(trace(agent).slice(before)).toEqual([
      "notify_klippy_disconnected", "reply:2", "notify_service_state_changed:stopped",
      "notify_service_state_changed:starting", "reply:3", "notify_service_state_changed:running", "notify_klippy_ready",
    ]);
    await web.waitForNotification("notify_klippy_ready");
    expect(await web.call("printer.info")).toMatchObject({ state: "ready" });
    expect(fake.serviceActions.map((a) => `${a.action} ${a.service}`)).toEqual(["stop klipper", "start klipper"]);
  });

  it("shows the print state through printer.objects.query and pushes it to subscribers", async () => {
    const fake = await start({
      klipper: { mcus: [
        { section: "mcu", settings: { serial: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1" }, mcu_constants: { MCU: "stm32f446xx" } },
        { section: "mcu toolhead", settings: { canbus_uuid: "aabbccddeeff", canbus_interface: "can0" }, mcu_version: "v0.12.0-1" },
      ] },
    });
    const web = await client(fake);
    await web.call("printer.objects.subscribe", { objects: { print_stats: ["state"], idle_timeout: ["state"] } });
    fake.klipper.setPrintState("printing");
    fake.klipper.setIdleState("Printing");

    const query = (await web.call("printer.objects.query", {
      objects: { print_stats: ["state", "filename"], idle_timeout: ["state"], "mcu toolhead": ["mcu_version"], nope: null },
    })) as { status: Record<string, unknown> };
    expect(query.status).toEqual({
      print_stats: { state: "printing", filename: "" },
      idle_timeout: { state: "Printing" },
      "mcu toolhead": { mcu_version: "v0.12.0-1" },
      // Klipper answers an unknown object with an empty one (recorded, test/fixtures/moonraker/objects_query.jsonl).
      nope: {},
    });
    const pushed = await web.waitForNotification("notify_status_update");
    expect(pushed).toEqual([{ print_stats: { state: "printing" } }, expect.any(Number)]);
    expect(await web.waitForNotification("notify_status_update")).toEqual([{ idle_timeout: { state: "Printing" } }, expect.any(Number)]);

    const settings = (await web.call("printer.objects.query", { objects: { configfile: ["settings"], mcu: ["mcu_constants"] } })) as {
      status: { configfile: { settings: Record<string, unknown> }; mcu: unknown };
    };
    expect(settings.status.configfile.settings["mcu toolhead"]).toEqual({ canbus_uuid: "aabbccddeeff", canbus_interface: "can0" });
    expect(settings.status.mcu).toEqual({ mcu_constants: { MCU: "stm32f446xx" } });
  });

  it("runs RESPOND in any connected state, macros only when ready", async () => {
    const fake = await start({ klipper: { macros: { FLASH_MCU: { method: "moonflash_flash", params: { force: 1 } } } } });
    const agent = await client(fake, { transport: "unix", name: "moonflash", type: "agent" });
    await agent.call("connection.register_remote_method", { method_name: "moonflash_flash" });
    const web = await client(fake);

    await web.call("printer.gcode.script", { script: "RESPOND TYPE=command MSG=\"action:prompt_begin Flash\"\nRESPOND TYPE=error MSG=bad\nM117 Flashing mcu" });
    // As in Klipper, the line's parameters reach the remote method only if the template passes them on.
    await web.call("printer.gcode.script", { script: "FLASH_MCU MCU=toolhead" });
    expect(await agent.waitForNotification("moonflash_flash")).toEqual({ force: 1 });
    const display = (await web.call("printer.objects.query", { objects: { display_status: ["message"] } })) as { status: unknown };
    expect(display.status).toEqual({ display_status: { message: "Flashing mcu" } });

    const message = mcuProtocolErrorMessage("v0.13.0", [{ name: "mcu", version: "v0.12.0" }], []);
    fake.klipper.setState("error", message);
    await web.call("printer.gcode.script", { script: "RESPOND MSG=still-here" });
    expect(await rpcError(web.call("printer.gcode.script", { script: "FLASH_MCU" }))).toEqual({ code: 400, message });
    expect(fake.consoleLines).toEqual([
      "// action:prompt_begin Flash", "!! bad", "echo: still-here",
      `// ${message.split("\n").map((l) => l.trim()).join("\n// ")}`, "!! MCU Protocol error",
    ]);
    expect(agent.notifications.filter((n) => n.method === "moonflash_flash")).toHaveLength(1);
  });

  it("calls remote methods from macros with Klipper's signature: a method= keyword is Klipper's TypeError", async () => {
    const fake = await start({ klipper: { macros: {
      OLD_FLASH: { method: "moonflash_flash", params: { mcu: "toolhead", method: "katapult" } },
      NEW_FLASH: { method: "moonflash_flash", params: { mcu: "toolhead", flash_method: "katapult", dry_run: true } },
    } } });
    const agent = await client(fake, { transport: "unix", name: "moonflash", type: "agent" });
    await agent.call("connection.register_remote_method", { method_name: "moonflash_flash" });
    const web = await client(fake);

    const error = "Error evaluating 'gcode_macro OLD_FLASH:gcode': TypeError: PrinterGCodeMacro._action_call_remote_method() got multiple values for argument 'method'";
    expect(await rpcError(web.call("printer.gcode.script", { script: "OLD_FLASH" }))).toEqual({ code: 400, message: `${error}\n` });
    await web.call("printer.gcode.script", { script: "NEW_FLASH" });
    expect(await agent.waitForNotification("moonflash_flash")).toEqual({ mcu: "toolhead", flash_method: "katapult", dry_run: true });
    expect(fake.consoleLines).toEqual([`!! ${error}`]);
    expect(agent.notifications.filter((n) => n.method === "moonflash_flash")).toHaveLength(1);
  });

  it("renders a macro file's templates as Klipper does: params, rawparams, printer, action_* helpers, errors", async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), "moonflash-macros-"));
    cleanups.push(() => fs.rm(dir, { recursive: true, force: true }));
    const cfg = path.join(dir, "macros.cfg");
    await fs.writeFile(cfg, [
      "[gcode_macro SHOW]",
      "description: shows what a template sees",
      "variable_count: 3",
      "gcode:",
      "  {action_respond_info(\"mcu=%s raw=%s state=%s count=%d\" % (params.MCU, rawparams, printer.print_stats.state, count))}",
      "  {action_call_remote_method(\"agent_echo\", **params)}",
      "  {action_call_remote_method(\"not_registered\", x=1)}",
      "  RESPOND MSG=\"after the template\"",
      "[gcode_macro REFUSE]",
      "gcode:",
      "  {action_raise_error(\"REFUSE needs X=\")}",
      "[gcode_macro OUTER]",
      "gcode:",
      "  REFUSE",
      "[gcode_macro SELF]",
      "gcode:",
      "  SELF",
      "[gcode_macro UNDEFINED_ARG]",
      "gcode:",
      "  {action_call_remote_method(\"agent_echo\", mcu=params.MCU)}",
      "",
    ].join("\n"));
    const fake = await start({ klipper: { macroFile: cfg } });
    const agent = await client(fake, { transport: "unix", name: "echo", type: "agent" });
    await agent.call("connection.register_remote_method", { method_name: "agent_echo" });
    const web = await client(fake);

    await web.call("printer.gcode.script", { script: "show mcu=toolhead  Extra='a b' ; comment" });
    expect(await agent.waitForNotification("agent_echo")).toEqual({ MCU: "toolhead", EXTRA: "a b" });
    expect(fake.consoleLines.splice(0)).toEqual([
      "// mcu=toolhead raw=mcu=toolhead  Extra='a b' ; comment state=standby count=3", "echo: after the template",
    ]);
    const objects = (await web.call("printer.objects.query", { objects: { "gcode_macro SHOW": null, configfile: ["settings"] } })) as {
      status: { "gcode_macro SHOW": unknown; configfile: { settings: Record<string, unknown> } };
    };
    expect(objects.status["gcode_macro SHOW"]).toEqual({ count: 3 });
    expect(objects.status.configfile.settings["gcode_macro show"]).toMatchObject({ description: "shows what a template sees" });

    // An error raised in a nested macro shows at each level, as gcode.py reports it while unwinding.
    const refused = "Error evaluating 'gcode_macro REFUSE:gcode': gcode.CommandError: REFUSE needs X=";
    expect(await rpcError(web.call("printer.gcode.script", { script: "OUTER" }))).toEqual({ code: 400, message: `${refused}\n` });
    expect(await rpcError(web.call("printer.gcode.script", { script: "SELF" }))).toMatchObject({ message: "Macro SELF called recursively" });
    expect(await rpcError(web.call("printer.gcode.script", { script: "SHOW toolhead" }))).toMatchObject({ message: "Malformed command 'SHOW toolhead'" });
    expect(fake.consoleLines.splice(0)).toEqual([
      `!! ${refused}`, `!! ${refused}`, "!! Macro SELF called recursively", "!! Macro SELF called recursively",
      "!! Malformed command 'SHOW toolhead'",
    ]);

    // A value JSON cannot encode (Jinja's Undefined for a missing parameter) shuts Klipper down (webhooks.py).
    await web.call("printer.gcode.script", { script: "UNDEFINED_ARG" });
    expect(fake.klipper.state).toBe("shutdown");
    // json's or msgspec's wording, whichever Klipper would use here.
    expect(fake.klipper.stateMessage).toMatch(/^json encoding error: .*\bUndefined\b/);
    expect(fake.consoleLines).toEqual(["// Klipper state: Shutdown"]);
    expect(agent.notifications.filter((n) => n.method === "agent_echo")).toHaveLength(1);
  });

  it("fails pending extension requests with 500 when the agent disconnects", async () => {
    const fake = await start();
    const agent = await connectTestClient({ socketPath: fake.socketPath });
    await agent.call("server.connection.identify", { client_name: "slow", version: "1", type: "agent", url: "x" });
    const web = await client(fake);
    const pending = web.call("server.extensions.request", { agent: "slow", method: "status" });
    await fake.waitFor(() => agent.received.some((m) => (m as { method?: string }).method === "status"));
    const failure = rpcError(pending);
    await agent.close();
    expect(await failure).toEqual({ code: 500, message: "Client Socket Disconnected" });
    expect(await web.waitForNotification("notify_agent_event")).toEqual([{ agent: "slow", event: "disconnected" }]);
  });

  it("restart() drops every connection and accepts new ones at the same address", async () => {
    const fake = await start();
    const wsUrl = fake.wsUrl;
    const agent = await client(fake, { transport: "unix", name: "moonflash", type: "agent" });
    await agent.call("connection.register_remote_method", { method_name: "moonflash_flash" });
    const web = await client(fake, { transport: "ws" });
    expect(fake.remoteMethods()).toEqual(["moonflash_flash"]);

    await fake.restart(20);
    await agent.closed;
    await web.closed;
    expect(fake.agents()).toEqual([]);
    expect(fake.remoteMethods()).toEqual([]);
    expect(fake.wsUrl).toBe(wsUrl);

    // Like the real Moonraker, the new socket drops connections for a moment before it accepts them.
    await new Promise((resolve) => setTimeout(resolve, 200));
    const again = await client(fake, { transport: "unix", name: "moonflash", type: "agent" });
    expect(await again.call("connection.register_remote_method", { method_name: "moonflash_flash" })).toBe("ok");
    const webAgain = await client(fake, { transport: "ws" });
    expect(await webAgain.call("server.extensions.list")).toEqual({
      agents: [{ name: "moonflash", version: "0.1.0", type: "agent", url: "https://example.invalid/moonflash" }],
    });
  });
});
