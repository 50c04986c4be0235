// npm run demo: the real flows against an embedded simulated printer.
// A fake Moonraker with a simulated Klipper, a virtual board running "Klipper" on a pseudo-terminal, and the real
// moonflash agent (the committed bundle, as the printer runs it) as a child process. Then, as a Mainsail user
// would: a macro calls flash.status, a client calls it through server.extensions.request, and FLASH_MCU flashes
// the virtual board (Klipper stopped, Katapult entered, written, verified, Klipper started) with live progress.

import { mkdtemp, mkdir, writeFile, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";
import { deflateSync } from "node:zlib";
import { execa } from "execa";
import { SingleBar, Presets } from "cli-progress";
import { startFakeMoonraker } from "../test/support/fake-moonraker/index.js";
import { startVirtualDevice } from "../src/sim/virtual-device.js";
import { startOutdatedPrinter, versionIn } from "../test/support/outdated-printer.js";
import { md5Of, startOtaPrinter } from "../test/agent/support/ota-printer.js";
import { buildZip } from "../test/ota/support/zip-builder.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const bold = (s: string): string => (process.stdout.isTTY ? `\x1b[1m${s}\x1b[0m` : s);
const say = (s: string): void => void process.stdout.write(`${s}\n`);
const step = (s: string): void => say(`\n${bold(`== ${s}`)}`);

/** A stand-in klipper.bin: random code with Klipper's zlib-compressed data dictionary embedded, as real builds have. */
function demoFirmware(mcu: string): Buffer {
  const dict = deflateSync(Buffer.from(JSON.stringify({ version: "v0.13.0-demo", build_versions: "gcc: (demo)", config: { MCU: mcu, CLOCK_FREQ: 72000000 } })));
  return Buffer.concat([randomBytes(24 * 1024), dict, randomBytes(24 * 1024)]);
}

async function main(): Promise<void> {
  const dataDir = await mkdtemp(join(tmpdir(), "moonflash-demo-"));
  const boardPath = join(dataDir, "dev", "serial", "by-id", "usb-Klipper_stm32f103xe_DEMO0001-if00");
  await mkdir(dirname(boardPath), { recursive: true });
  const firmware = join(dataDir, "klipper", "out", "klipper.bin");
  await mkdir(dirname(firmware), { recursive: true });
  await writeFile(firmware, demoFirmware("stm32f103xe"));
  await mkdir(join(dataDir, "config"), { recursive: true });
  await writeFile(join(dataDir, "config", "moonflash.conf"), `[moonflash]\nklipper_path: ${join(dataDir, "klipper")}\nlog_level: debug\n\n[mcu]\nmethod: katapult\n`);

  step("Simulated printer");
  // Link speed of a real 250000-baud UART board, so progress is visible.
  const board = await startVirtualDevice({ path: boardPath, mcuType: "stm32f103xe", mode: "app", baud: 250000 });
  board.on("bootloader", () => say("   [board] bootloader request received: now in Katapult"));
  board.on("complete", () => say(`   [board] COMPLETE: ${board.model.written} bytes in flash, back to the application`));
  const moonraker = await startFakeMoonraker({
    dataDir,
    timing: { stopOkMs: 200, stopStateMs: 300, startOkMs: 600, startStateMs: 700, readyMs: 900 },
    klipper: {
      softwareVersion: "v0.13.0-730-g84104bbbd",
      mcus: [{ section: "mcu", settings: { serial: boardPath, baud: 250000 }, mcu_version: "v0.12.0-85-gd785b396", mcu_constants: { MCU: "stm32f103xe" } }],
      macros: {
        FLASH_STATUS: { method: "flash.status" },
        FLASH_MCU: { method: "flash.mcu", params: { mcu: "mcu" } },
      },
    },
  });
  say(`   Moonraker (fake): ${moonraker.socketPath} and ${moonraker.wsUrl}`);
  say(`   Board (virtual, running Klipper): ${boardPath}`);
  say(`   Firmware: ${firmware}`);

  step("moonflash agent: node dist/moonflash.mjs serve");
  const agent = execa("node", [join(root, "dist", "moonflash.mjs"), "serve", "--data", dataDir], { reject: false, stdio: ["ignore", "ignore", "pipe"], timeout: 300_000 });
  agent.stderr?.on("data", (chunk: Buffer) => process.stderr.write(chunk));
  const web = await moonraker.connectClient({ transport: "ws", name: "mainsail-demo", type: "web" });
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.mcu"), 15_000);
  say(`   agents: ${JSON.stringify(moonraker.agents())}`);
  say(`   remote methods registered with Klipper: ${moonraker.remoteMethods().join(", ")}`);

  const consoleFrom = (index: number): string[] => moonraker.consoleLines.slice(index);

  step("Path 1 — a Klipper macro: FLASH_STATUS → action_call_remote_method(\"flash.status\")");
  let mark = moonraker.consoleLines.length;
  await web.call("printer.gcode.script", { script: "FLASH_STATUS" });
  await moonraker.waitFor(() => moonraker.consoleLines.length > mark, 10_000);
  for (const line of consoleFrom(mark)) say(`   Mainsail console: ${line}`);

  step("Path 2 — a client: server.extensions.request {agent: moonflash, method: flash.status}");
  const status = await web.call("server.extensions.request", { agent: "moonflash", method: "flash.status" });
  say(`   result: ${JSON.stringify(status)}`);

  step("Bad input — flash.mcu with mcu: 42");
  try {
    await web.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { mcu: 42 } });
  } catch (err) {
    const e = err as { code?: number; message: string; data?: unknown };
    say(`   error ${e.code}: ${e.message} ${JSON.stringify(e.data)}`);
  }

  step("FLASH_MCU — flash the board from the console (Klipper is stopped, flashed, started)");
  mark = moonraker.consoleLines.length;
  // A bar on a terminal; a line per 20 % otherwise (cli-progress draws nothing without a TTY).
  const bar = process.stdout.isTTY ? new SingleBar({ format: "   {phase} [{bar}] {percentage}% {value}/{total} bytes", hideCursor: true }, Presets.shades_classic) : null;
  let barPhase = "";
  let lastFifth = -1;
  const endBar = (): void => {
    if (barPhase) bar?.stop();
    barPhase = "";
  };
  const offEvents = web.onNotification((method, params) => {
    if (method === "notify_service_state_changed") {
      const klipper = (params as Array<Record<string, { active_state: string; sub_state: string }>>)[0]?.klipper;
      if (klipper) {
        endBar();
        say(`   [moonraker] klipper service: ${klipper.active_state} (${klipper.sub_state})`);
      }
    }
    if (method !== "notify_agent_event") return;
    const { event, data } = (params as Array<{ event: string; data: Record<string, unknown> }>)[0]!;
    if (event === "flash.progress") {
      const phase = String(data.phase ?? "");
      const done = Number(data.done);
      const total = Number(data.total);
      if (!bar) {
        const fifth = Math.floor((5 * done) / total);
        if (phase !== barPhase || fifth !== lastFifth) say(`   [agent event] ${phase} ${fifth * 20}% (${done}/${total} bytes)`);
        barPhase = phase;
        lastFifth = fifth;
      } else if (phase !== barPhase) {
        endBar();
        bar.start(total, done, { phase: phase.padEnd(6) });
        barPhase = phase;
      } else bar.update(done);
    } else if (event === "flash.stage") {
      endBar();
      say(`   [agent event] stage: ${String(data.stage)}${data.message ? ` — ${String(data.message)}` : ""}`);
    } else if (event === "flash.log" && data.level !== "debug") {
      endBar();
      say(`   [agent event] ${String(data.level)}: ${String(data.message)}`);
    } else if (event === "flash.result") {
      endBar();
      say(`   [agent event] result: ${data.ok ? "ok" : `failed ${String(data.code)}`}`);
    }
  });
  const resultEvent = web.waitForNotification("notify_agent_event", (p) => (p as Array<{ event: string }>)[0]?.event === "flash.result", 120_000);
  await web.call("printer.gcode.script", { script: "FLASH_MCU" });
  await resultEvent;
  // The macro's own summary line follows the job's result once Klipper is back.
  await moonraker.waitFor(() => moonraker.consoleLines.slice(mark).some((l) => /flashed with|failed/.test(l)), 30_000);
  offEvents();
  say("\n   What the Mainsail console shows:");
  for (const line of consoleFrom(mark)) say(`   ${line}`);
  say(`   Klipper service actions: ${moonraker.serviceActions.map((a) => `${a.action} ${a.service}`).join(", ")}`);
  say(`   Klipper state now: ${moonraker.klipper.state}`);
  const image = await readFile(firmware);
  const same = board.model.flash.subarray(0, image.length).equals(image);
  say(`   Board flash equals klipper.bin (${image.length} bytes): ${same ? "yes" : "NO"}`);

  step("flash.status afterwards");
  say(`   ${JSON.stringify(await web.call("server.extensions.request", { agent: "moonflash", method: "flash.status" }))}`);

  await web.close();
  agent.kill("SIGTERM");
  await agent;
  await moonraker.stop();
  await board.stop();
  await rm(dataDir, { recursive: true, force: true });

  await updateAllScene();
  await otaScene();
  say("\nDemo finished.");
}

/**
 * After a Klipper update: three boards still run the old firmware, so Klipper stops with "MCU Protocol error".
 * UPDATE_MCUS builds the three images (a stand-in Klipper tree that makes images carrying their version), stops
 * Klipper once, flashes the boards (one running its application, asked into Katapult first) and starts Klipper.
 */
async function updateAllScene(): Promise<void> {
  step("A second printer after a Klipper update: three boards on old firmware, Klipper in MCU Protocol error");
  const printer = await startOutdatedPrinter({
    name: "demo-update",
    baud: 250000,
    oldImageBytes: 20_000,
    timing: { stopOkMs: 200, stopStateMs: 300, startOkMs: 600, startStateMs: 700, readyMs: 900 },
    macroFile: join(root, "moonraker", "moonflash.cfg"),
  });
  const { fx, boards, moonraker } = printer;
  boards.toolhead.on("bootloader", () => say("   [toolhead board] bootloader request received: now in Katapult"));
  say(`   Klipper (simulated): ${moonraker.klipper.stateMessage.split("\n").filter(Boolean).join(" | ")}`);
  // The stand-in compilers of the stand-in Klipper tree come first on the agent's PATH.
  const agent = execa("node", [join(root, "dist", "moonflash.mjs"), "serve", "--data", fx.dataDir], {
    reject: false,
    stdio: ["ignore", "ignore", "pipe"],
    timeout: 300_000,
    env: { PATH: printer.agentPath },
  });
  agent.stderr?.on("data", (chunk: Buffer) => process.stderr.write(chunk));
  const web = await moonraker.connectClient({ transport: "ws", name: "mainsail-demo", type: "web" });
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.update_all"), 15_000);

  step("moonflash check (a client call: in MCU Protocol error Klipper runs no macros)");
  const check = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.check" })) as { host: { version: string }; mcus: Array<{ name: string; version: string; outdated: boolean }> };
  say(`   host ${check.host.version}; ${check.mcus.map((m) => `${m.name} ${m.version}${m.outdated ? " (outdated)" : ""}`).join(", ")}`);


  step("flash.update_all {dry_run: true}: the plan");
  const plan = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.update_all", arguments: { dry_run: true } })) as {
    plan: Array<{ name: string; why: string; version_before: string; transport: string; profile: string; backup: { read_back: boolean; estimated_ms?: number; estimate_basis?: string } }>;
  };
  for (const [i, p] of plan.plan.entries()) {
    const backup = p.backup.read_back ? `; backup_before_flash: its current firmware is read back first, ≈ ${((p.backup.estimated_ms ?? 0) / 1000).toFixed(1)} s more downtime (${p.backup.estimate_basis})` : "";
    say(`   ${i + 1}. ${p.name}: ${p.why} (${p.version_before}), ${p.transport}, profile ${p.profile}${backup}`);
  }

  step("flash.update_all: build all while Klipper runs, one stop, flash in order, one start");
  const off = web.onNotification((method, params) => {
    if (method !== "notify_agent_event") return;
    const { event, data } = (params as Array<{ event: string; data: Record<string, unknown> }>)[0]!;
    if (event === "flash.stage" && ["check", "build", "stop-klipper", "flash", "start-klipper"].includes(String(data.stage))) {
      say(`   [agent event] ${String(data.stage)}${data.message ? ` — ${String(data.message)}` : ""}`);
    }
  });
  const result = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.update_all" })) as {
    mcus: Array<{ name: string; build_ms?: number; flash_ms?: number; method?: string; verified?: boolean; backed_up?: boolean; version_now?: string }>;
    downtime_ms: number;
    phases_ms: { check: number; build: number; flash: number; start: number };
    klipper_state: string;
  };
  off();
  for (const m of result.mcus) {
    say(`   ${m.name}: built in ${((m.build_ms ?? 0) / 1000).toFixed(1)} s, flashed with ${m.method} in ${((m.flash_ms ?? 0) / 1000).toFixed(1)} s${m.verified ? " (verified)" : ""}${m.backed_up ? ", old firmware read back and kept for a rollback" : ""}, now reports ${m.version_now}`);
  }
  const p = result.phases_ms;
  say(`   phases: check ${p.check} ms, build ${p.build} ms (Klipper running), flash ${p.flash} ms, start ${p.start} ms`);
  say(`   Klipper downtime (stop to ready): ${(result.downtime_ms / 1000).toFixed(1)} s; Klipper is ${result.klipper_state}`);
  say(`   Klipper service actions: ${moonraker.serviceActions.map((a) => `${a.action} ${a.service}`).join(", ")}`);
  for (const [name, board] of Object.entries(boards)) say(`   ${name} board holds firmware ${versionIn(board)}`);
  await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.includes("moonflash: updated")), 30_000);
  say(`   Mainsail console: ${moonraker.consoleLines.filter((l) => l.includes("moonflash: updated")).at(-1)}`);

  await web.close();
  agent.kill("SIGTERM");
  await agent;
  await printer.close();
}

/**
 * A vendor's update over the air: a package (printer.cfg and a macro file for Klipper's config, a crowsnest config, a
 * toolhead firmware image) served by a local HTTP server that drops the connection half way once. The committed
 * bundle serves ota.*: the download resumes with a Range request, the install backs up, replaces the files, flashes
 * the toolhead with Klipper stopped, and passes probation. Then a package with a path leaving its root is refused.
 */
async function otaScene(): Promise<void> {
  step("OTA: a vendor package from a local HTTP server (the connection drops half way once), with a firmware module");
  const printer = await startOtaPrinter();
  const { moonraker, server } = printer;
  const agent = execa("node", [join(root, "dist", "moonflash.mjs"), "serve", "--data", printer.dir], { reject: false, stdio: ["ignore", "ignore", "pipe"], timeout: 300_000 });
  agent.stderr?.on("data", (chunk: Buffer) => process.stderr.write(chunk));
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("ota.download"), 15_000);
  const web = await moonraker.connectClient({ transport: "unix", name: "mainsail-demo", type: "web" });
  const ota = (method: string, args: Record<string, unknown> = {}) => web.call("server.extensions.request", { agent: "moonflash", method, arguments: args });

  const half = Math.floor(printer.pkg.length / 2);
  server.plan({ cutAfter: half });
  say(`   ota.download ${printer.download.url} (${printer.pkg.length} bytes, md5 ${printer.download.md5})`);
  const summary = (await ota("ota.download", printer.download).catch((err: unknown) => {
    throw new Error(`ota.download failed: ${JSON.stringify((err as { data?: unknown }).data)}`);
  })) as { name: string; version: string; modules: Array<{ id: string; type: string }> };
  for (const r of server.requests) say(`   [server] ${r.range ? `Range ${r.range}` : "GET"} → ${r.status}, ${r.bytesSent} bytes sent`);
  const resent = server.bytesSent() - printer.pkg.length;
  say(`   downloaded and verified ${summary.name} ${summary.version}: modules ${summary.modules.map((m) => `${m.id} (${m.type})`).join(", ")}; bytes sent twice: ${resent}`);

  step("ota.install: backups, files, the toolhead flashed with Klipper stopped, services started, probation");
  const outcome = (await ota("ota.install")) as { files: { written: number; replaced: number; added: number }; firmware: string[]; services: string[] };
  say(`   ${outcome.files.written} files (${outcome.files.replaced} replaced, ${outcome.files.added} new), firmware of ${outcome.firmware.join(", ")} flashed, services ${outcome.services.join(", ")} restarted`);
  say(`   toolhead board holds the package's image: ${printer.board.model.flash.subarray(0, printer.newImage.length).equals(printer.newImage) ? "yes" : "NO"}`);
  say(`   printer.cfg now: ${JSON.stringify(await printer.read("config/printer.cfg"))}`);
  await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.includes("Probation passed")), 15_000);
  for (const line of moonraker.consoleLines.filter((l) => l.includes("moonflash: OTA"))) say(`   Mainsail console: ${line}`);
  const st = (await ota("ota.status")) as { state: string; installed: { name: string; version: string } | null };
  say(`   ota.status: ${st.state}, installed ${st.installed?.name} ${st.installed?.version}`);

  step("A hostile package: an entry named ../../evil.cfg is refused before anything is touched");
  const before = await printer.read("config/printer.cfg");
  const bad = buildZip([{ name: "manifest.json", data: JSON.stringify({ name: "evil", version: "1", modules: [] }) }, { name: "../../evil.cfg", data: "x" }]);
  server.setFile({ body: bad, etag: '"evil"' });
  try {
    await ota("ota.download", { url: server.url("/evil.zip"), md5: md5Of(bad) });
    say("   accepted (unexpected)");
  } catch (err) {
    const data = (err as { data?: { message?: string; data?: { code?: string } } }).data;
    say(`   refused: ${data?.data?.code}: ${data?.message}`);
  }
  say(`   printer.cfg unchanged: ${(await printer.read("config/printer.cfg")) === before ? "yes" : "NO"}`);

  await web.close();
  agent.kill("SIGTERM");
  await agent;
  await printer.close();
}

main().catch((err: unknown) => {
  process.stderr.write(`demo failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
