// npm run bench: measurements written to docs/BENCHMARKS.md with the machine and date.
// 1. Idle RSS of `moonflash serve` (the committed bundle, started as `npm start` starts it) connected to a fake
//    Moonraker, beside an empty node process.
// 2. Peak RSS of that `serve` while it flashes 256 KiB in service mode (flash.mcu through the fake Moonraker).
// 3. 256 KiB Katapult flash + verify into the virtual board (its own process, on a pty): unthrottled and at
//    250000 baud, beside the link limit (bytes on the wire / (baud / 10)), and the flashing process's peak RSS.
// 4. Update-all of three boards at 250000 baud: Klipper's downtime (stop → ready) beside the sum of the flash times.
// 5. OTA (bench/ota.ts): loopback throughput beside curl, 100 MB at 10 Mbit/s, peak RSS over a 500 MB download and
//    install, ota.status latency during a download, callback_url latency, bytes sent twice after a cut at 60 %.
//    `npm run bench -- --ota-only` runs this part alone and replaces only its section of docs/BENCHMARKS.md.

import { mkdtemp, mkdir, rm, writeFile, readFile } from "node:fs/promises";
import { existsSync, readFileSync } from "node:fs";
import { tmpdir, cpus, totalmem, hostname, release, arch } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { execa, type ResultPromise } from "execa";
import { startFakeMoonraker, type FakeMoonraker } from "../test/support/fake-moonraker/index.js";
import { openSerialLink } from "../src/flash/link.js";
import { startOutdatedPrinter } from "../test/support/outdated-printer.js";
import { otaSection, runOtaBench } from "./ota.js";
import { bundle, IDLE_TARGET_KIB, memoryKiB, root, SERVICE_ENV, sleep, type Memory } from "./support.js";
import { FrameDecoder, encodeComplete, encodeConnect, encodeRequestBlock, encodeSendBlock, encodeSendEof } from "../src/flash/katapult/codec.js";

const IDLE_SETTLE_MS = 30_000;

/** Targets over an empty node process on the same machine, in the same run. */
const FLASH_PEAK_TARGET_KIB = 24 * 1024;
const range = (values: number[]): string => `${Math.min(...values).toFixed(2)}–${Math.max(...values).toFixed(2)}`;
const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;


/**
 * Samples an idle process 10 times over 10 s after a 30 s settle; returns the median sample by RSS. The agent runs
 * for days: what counts is its steady state, after V8's memory reducer has returned start-up garbage (about 9 s
 * after start). VmHWM keeps the start-up peak.
 */
async function sampleIdle(pid: number): Promise<Memory> {
  await sleep(IDLE_SETTLE_MS);
  const samples: Memory[] = [];
  for (let i = 0; i < 10; i++) {
    samples.push(memoryKiB(pid));
    await sleep(1000);
  }
  samples.sort((a, b) => a.rss - b.rss);
  return { ...samples[Math.floor(samples.length / 2)]!, hwm: memoryKiB(pid).hwm };
}

/** Fresh serves measured at idle; the median is reported. */
const IDLE_SERVES = 3;

/** The floor: an empty node process that only waits, on this machine. */
async function bareNode(): Promise<Memory> {
  const node = execa("node", ["-e", "setInterval(() => {}, 1 << 30)"], { ...SERVICE_ENV, reject: false, timeout: 60_000 });
  try {
    return await sampleIdle(node.pid!);
  } finally {
    node.kill("SIGTERM");
    await node;
  }
}

/**
 * The node options of the service, from package.json's `start` script (`node <options> dist/moonflash.mjs serve`):
 * the systemd unit runs the same command, so the figures are those of what runs on the printer.
 */
function serviceNodeOptions(): string[] {
  const start = (JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as { scripts: { start: string } }).scripts.start.split(/\s+/);
  const at = start.indexOf("dist/moonflash.mjs");
  if (start[0] !== "node" || at < 0) throw new Error(`package.json's start script is not "node … dist/moonflash.mjs serve": ${start.join(" ")}`);
  return start.slice(1, at);
}

function startServe(nodeOptions: string[], dir: string, moonraker: FakeMoonraker): { serve: ResultPromise; registered: Promise<void> } {
  const serve = execa("node", [...nodeOptions, bundle, "serve", "--data", dir], { ...SERVICE_ENV, reject: false, timeout: 300_000 });
  return { serve, registered: moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.mcu"), 20_000) };
}

async function idleServe(nodeOptions: string[]): Promise<Memory> {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-bench-idle-"));
  const moonraker = await startFakeMoonraker({ dataDir: dir });
  const { serve, registered } = startServe(nodeOptions, dir, moonraker);
  try {
    await registered;
    return await sampleIdle(serve.pid!);
  } finally {
    serve.kill("SIGTERM");
    await serve;
    await moonraker.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

interface ServiceFlash {
  /** VmHWM of serve at the end of the flash: the highest RSS of its whole life, start-up included. */
  peakKiB: number;
  /** RSS 10 s after the job ended. */
  afterKiB: number;
  /** The whole job, as the client waited for it. */
  seconds: number;
  /** The katapult attempt alone (elapsed_ms). */
  katapultSeconds: number;
  baud: number | null;
  /** CPU time the hypervisor took from this VM during the job, seconds over all CPUs. */
  stealSeconds: number;
}

/**
 * `serve` flashes 256 KiB at 250000 baud through the fake Moonraker (server.extensions.request → flash.mcu, Klipper
 * stopped and started through machine.services.*) into `moonflash virtual-device`, as on a printer.
 */
async function serviceFlash(image: Buffer, nodeOptions: string[], baud: number | null): Promise<ServiceFlash> {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-bench-service-"));
  const link = join(dir, "board");
  const firmware = join(dir, "fw.bin");
  await writeFile(firmware, image);
  await mkdir(join(dir, "config"), { recursive: true });
  await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${firmware}\nbootloader: none\nbaud: 250000\nflash_size: 1M\n`);
  const device: ResultPromise = execa("node", [bundle, "virtual-device", "--path", link, "--flash-size", String(1024 * 1024), ...(baud ? ["--baud", String(baud)] : [])], { reject: false, timeout: 300_000 });
  const moonraker = await startFakeMoonraker({ dataDir: dir, klipper: { mcus: [{ section: "mcu", settings: { serial: link }, mcu_constants: { MCU: "stm32f103xe" } }] } });
  const { serve, registered } = startServe(nodeOptions, dir, moonraker);
  try {
    for (let i = 0; i < 100 && !existsSync(link); i++) await sleep(100);
    await registered;
    const client = await moonraker.connectClient({ transport: "unix" });
    const started = Date.now();
    const stealBefore = stealSeconds();
    const result = (await client.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { mcu: "mcu" } })) as {
      verified?: boolean;
      attempts?: Array<{ method: string; elapsed_ms: number }>;
    };
    const seconds = (Date.now() - started) / 1000;
    const steal = stealSeconds() - stealBefore;
    const katapultSeconds = (result.attempts?.find((a) => a.method === "katapult")?.elapsed_ms ?? NaN) / 1000;
    await client.close();
    if (result.verified !== true) throw new Error(`service-mode flash did not verify: ${JSON.stringify(result)}`);
    const peakKiB = memoryKiB(serve.pid!).hwm;
    await sleep(10_000);
    return { peakKiB, afterKiB: memoryKiB(serve.pid!).rss, seconds, katapultSeconds, baud, stealSeconds: steal };
  } finally {
    serve.kill("SIGTERM");
    await serve;
    device.kill("SIGTERM");
    await device;
    await moonraker.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

const BLOCK = 64;
/** Katapult frame bytes per block: SEND_BLOCK 8+4+64, its ACK 8+4+4, REQUEST_BLOCK 8+4, its ACK 8+4+4+64. */
const WIRE_BYTES_PER_BLOCK = 8 + 4 + BLOCK + (8 + 8) + (8 + 4) + (8 + 8 + BLOCK);
/** CONNECT + ACK (~48 bytes of payload), EOF + ACK, COMPLETE + ACK. */
const WIRE_BYTES_FIXED = 8 + (8 + 48) + 8 + 16 + 8 + 12;

/** Polls a process's VmHWM until it exits; the last reading is its peak RSS (VmHWM only grows). */
function trackPeak(pid: number): { stop(): number } {
  let peak = 0;
  const timer = setInterval(() => {
    try {
      // An exiting process's status may lack the field (NaN): keep the last real reading.
      const hwm = memoryKiB(pid).hwm;
      if (Number.isFinite(hwm)) peak = Math.max(peak, hwm);
    } catch {
      // exited between polls
    }
  }, 50);
  return {
    stop() {
      clearInterval(timer);
      return peak;
    },
  };
}

interface FlashRun {
  seconds: number;
  linkLimit: number | null;
  ratio: number | null;
  verified: boolean;
  peakKiB: number;
  /** CPU time the hypervisor took from this VM during the flash, seconds over all CPUs. */
  stealSeconds: number;
}

/** Cumulative steal time of all CPUs (/proc/stat, USER_HZ = 100): a shared VM's noise shows here. */
function stealSeconds(): number {
  const fields = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/);
  return Number(fields[8] ?? 0) / 100;
}

/**
 * One `moonflash flash mcu --json` (the committed bundle, its own process) against a fake Moonraker and
 * `moonflash virtual-device` (another process, as hardware would be). Time is the katapult attempt's elapsed_ms.
 */
async function flashRun(image: Buffer, baud: number | null): Promise<FlashRun> {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-bench-flash-"));
  const link = join(dir, "board");
  const firmware = join(dir, "fw.bin");
  await writeFile(firmware, image);
  await mkdir(join(dir, "config"), { recursive: true });
  await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${firmware}\nbootloader: none\nbaud: ${baud ?? 250000}\n# the virtual board has 1 MiB (--flash-size below); Klipper's table for its MCU type would say less\nflash_size: 1M\n`);
  const args = [bundle, "virtual-device", "--path", link, "--flash-size", String(1024 * 1024)];
  if (baud) args.push("--baud", String(baud));
  const device: ResultPromise = execa("node", args, { reject: false, timeout: 300_000 });
  const moonraker = await startFakeMoonraker({ dataDir: dir, klipper: { mcus: [{ section: "mcu", settings: { serial: link }, mcu_constants: { MCU: "stm32f103xe" } }] } });
  try {
    for (let i = 0; i < 100 && !existsSync(link); i++) await sleep(100);
    const stealBefore = stealSeconds();
    const flash = execa("node", [bundle, "flash", "mcu", "--data", dir, "--json"], { ...SERVICE_ENV, reject: false, timeout: 300_000 });
    const peak = trackPeak(flash.pid!);
    const result = await flash;
    const peakKiB = peak.stop();
    const steal = stealSeconds() - stealBefore;
    const last = JSON.parse(String(result.stdout).trim().split("\n").at(-1) ?? "{}") as { ok?: boolean; result?: { verified: boolean; attempts: Array<{ method: string; elapsed_ms: number }> } };
    if (result.exitCode !== 0 || !last.ok || !last.result) throw new Error(`flash failed: ${String(result.stderr)} ${String(result.stdout).slice(-500)}`);
    const seconds = last.result.attempts.find((a) => a.method === "katapult")!.elapsed_ms / 1000;
    const blocks = Math.ceil(image.length / BLOCK);
    const linkLimit = baud ? (blocks * WIRE_BYTES_PER_BLOCK + WIRE_BYTES_FIXED) / (baud / 10) : null;
    return { seconds, linkLimit, ratio: linkLimit ? seconds / linkLimit : null, verified: last.result.verified, peakKiB, stealSeconds: steal };
  } finally {
    device.kill("SIGTERM");
    await device;
    await moonraker.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * The same exchanges as a flash (CONNECT, every SEND_BLOCK, every REQUEST_BLOCK, COMPLETE), each written as soon as
 * the previous reply arrived, with no session logic: the floor set by the link, the pty and the device emulator.
 * The flash time over this floor is what our Katapult session itself costs.
 */
async function exchangeFloor(image: Buffer, baud: number | null): Promise<number> {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-bench-floor-"));
  const link = join(dir, "board");
  const args = [bundle, "virtual-device", "--path", link, "--flash-size", String(1024 * 1024)];
  if (baud) args.push("--baud", String(baud));
  const device: ResultPromise = execa("node", args, { reject: false, timeout: 300_000 });
  try {
    for (let i = 0; i < 100 && !existsSync(link); i++) await sleep(100);
    const port = await openSerialLink(link, baud ?? 250000);
    const decoder = new FrameDecoder();
    let waiting: (() => void) | null = null;
    port.onData((chunk) => {
      if (decoder.push(chunk).some((item) => "frame" in item)) waiting?.();
    });
    const exchange = (frame: Buffer): Promise<void> =>
      new Promise((resolve) => {
        waiting = resolve;
        void port.write(frame);
      });
    const started = process.hrtime.bigint();
    await exchange(encodeConnect());
    const start = 0x8002000;
    for (let off = 0; off < image.length; off += BLOCK) {
      const block = Buffer.alloc(BLOCK, 0xff);
      image.copy(block, 0, off, off + BLOCK);
      await exchange(encodeSendBlock(start + off, block));
    }
    await exchange(encodeSendEof());
    for (let off = 0; off < image.length; off += BLOCK) await exchange(encodeRequestBlock(start + off));
    await exchange(encodeComplete());
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    await port.close();
    return seconds;
  } finally {
    device.kill("SIGTERM");
    await device;
    await rm(dir, { recursive: true, force: true });
  }
}

interface UpdateAllRun {
  downtimeMs: number;
  flashMs: number[];
  /** Klipper's own stop and start as the fake Moonraker simulates them (service states, Klippy ready). */
  serviceMs: number;
  backedUp: number;
  imageBytes: number;
}

/** The fake Moonraker's Klipper service: stop and start reported after these delays, Klippy ready after that. */
const SERVICE_TIMING = { stopOkMs: 50, stopStateMs: 100, startOkMs: 100, startStateMs: 200, readyMs: 500 };

/**
 * `serve` (as the service runs it) updates three boards after a Klipper update: builds while Klipper runs, one stop,
 * three Katapult flashes at 250000 baud (the first one of each board reads its old firmware back first), one start.
 */
async function updateAllRun(nodeOptions: string[]): Promise<UpdateAllRun> {
  const printer = await startOutdatedPrinter({ name: "bench-update", baud: 250000, oldImageBytes: 40 * 1024, timing: SERVICE_TIMING });
  const serve = execa("node", [...nodeOptions, bundle, "serve", "--data", printer.fx.dataDir], {
    reject: false,
    timeout: 300_000,
    // Stand-in images as large as a real STM32 Klipper build (about 40 KiB).
    extendEnv: false,
    env: { ...SERVICE_ENV.env, PATH: printer.agentPath, FAKE_IMAGE_BYTES: String(40 * 1024) },
  });
  try {
    await printer.moonraker.waitFor(() => printer.moonraker.remoteMethods().includes("flash.update_all"), 20_000);
    const client = await printer.moonraker.connectClient({ transport: "unix" });
    const result = (await client.call("server.extensions.request", { agent: "moonflash", method: "flash.update_all" })) as {
      downtime_ms: number;
      klipper_state: string;
      mcus: Array<{ flash_ms?: number; verified?: boolean; backed_up?: boolean; version_now?: string }>;
    };
    await client.close();
    if (result.klipper_state !== "ready" || result.mcus.some((m) => !m.verified || m.version_now !== printer.host)) {
      throw new Error(`update-all did not bring every board to ${printer.host}: ${JSON.stringify(result)}`);
    }
    const imageBytes = (await readFile(join(printer.fx.dataDir, "moonflash", "build", "mcu", "klipper.bin"))).length;
    return {
      downtimeMs: result.downtime_ms,
      flashMs: result.mcus.map((m) => m.flash_ms ?? 0),
      serviceMs: SERVICE_TIMING.stopOkMs + SERVICE_TIMING.stopStateMs + SERVICE_TIMING.startOkMs + SERVICE_TIMING.startStateMs + SERVICE_TIMING.readyMs,
      backedUp: result.mcus.filter((m) => m.backed_up).length,
      imageBytes,
    };
  } finally {
    serve.kill("SIGTERM");
    await serve;
    await printer.close();
  }
}

/** `npm run bench -- --flash-only --runs 1` measures the flash alone, prints it and leaves docs/BENCHMARKS.md alone. */
function parseArgs(argv: string[]): { flashOnly: boolean; otaOnly: boolean; runs: number } {
  const runsAt = argv.indexOf("--runs");
  const runs = runsAt >= 0 ? Number(argv[runsAt + 1]) : 5;
  if (!Number.isInteger(runs) || runs < 1) throw new Error("--runs takes a whole number >= 1");
  return { flashOnly: argv.includes("--flash-only"), otaOnly: argv.includes("--ota-only"), runs };
}

const OTA_HEADING = "\n## OTA\n";

/** `--ota-only`: the OTA section of docs/BENCHMARKS.md replaced, the rest kept (with a line saying when each ran). */
async function otaOnly(serviceLabel: string, service: string[], runs: number): Promise<void> {
  const file = join(root, "docs", "BENCHMARKS.md");
  const current = existsSync(file) ? await readFile(file, "utf8") : "# Benchmarks\n";
  const at = current.indexOf(OTA_HEADING);
  const before = (at >= 0 ? current.slice(0, at) : current).trimEnd();
  const ota = await runOtaBench(service, Math.min(runs, 3));
  const stamp = `The OTA section below was written by \`npm run bench -- --ota-only\` on ${new Date().toISOString()}, same machine.`;
  const text = [before.replace(/\nThe OTA section below was written by[^\n]*\n/, "\n"), "", stamp, "", ...otaSection(ota, serviceLabel)].join("\n");
  await writeFile(file, text);
  process.stdout.write(`wrote the OTA section of docs/BENCHMARKS.md\n${otaSection(ota, serviceLabel).join("\n")}\n`);
}

async function main(): Promise<void> {
  if (!existsSync(bundle)) throw new Error("dist/moonflash.mjs is missing: run npm run build");
  const { flashOnly, otaOnly: otaOnlyRun, runs: runCount } = parseArgs(process.argv.slice(2));
  const mib = (kib: number): string => `${(kib / 1024).toFixed(1)} MiB`;
  const delta = (kib: number): string => `${kib >= 0 ? "+" : "−"}${(Math.abs(kib) / 1024).toFixed(1)} MiB`;
  const service = serviceNodeOptions();
  const serviceLabel = `node ${[...service, "dist/moonflash.mjs serve"].join(" ")}`;
  if (otaOnlyRun) return otaOnly(serviceLabel, service, runCount);
  let idle: Memory | undefined;
  /** Each fresh serve at idle: one V8 heap page more or less moves a single run by 0.25 MiB. */
  let idleRuns: Memory[] = [];
  let idlePlain: Memory | undefined;
  let bare: Memory | undefined;
  const serviceRuns: Array<ServiceFlash & { label: string; run: number }> = [];
  const updateRuns: UpdateAllRun[] = [];
  if (!flashOnly) {
    process.stdout.write("idle RSS of serve…\n");
    for (let i = 0; i < IDLE_SERVES; i++) idleRuns.push(await idleServe(service));
    idleRuns = idleRuns.sort((a, b) => a.rss - b.rss);
    idle = idleRuns[Math.floor(idleRuns.length / 2)]!;
    idlePlain = service.length ? await idleServe([]) : idle;
    bare = await bareNode();
    process.stdout.write(`  serve ${mib(idle.rss)} (anon ${mib(idle.anon)}), without node options ${mib(idlePlain.rss)}, bare node ${mib(bare.rss)} (anon ${mib(bare.anon)})\n`);
    const image = randomBytes(256 * 1024);
    const variants: Array<[string, string[]]> = [[serviceLabel, service], ...(service.length ? [["node dist/moonflash.mjs serve (no node options)", []] as [string, string[]]] : [])];
    for (const [label, options] of variants) {
      // Three runs at UART speed, one unthrottled (where the missing JIT would show).
      for (const [i, baud] of [250000, 250000, 250000, null].slice(0, Math.min(runCount, 3)).concat([null]).entries()) {
        process.stdout.write(`service-mode flash, ${label}, run ${i + 1} (${baud ?? "unthrottled"})…\n`);
        const r = await serviceFlash(image, options, baud);
        serviceRuns.push({ label, run: i + 1, ...r });
        process.stdout.write(`  peak ${mib(r.peakKiB)} (${delta(r.peakKiB - bare.rss)} over empty node), 10 s later ${mib(r.afterKiB)}, katapult ${r.katapultSeconds.toFixed(2)} s\n`);
      }
    }
    for (let i = 1; i <= Math.min(runCount, 3); i++) {
      process.stdout.write(`update-all of three boards, run ${i}…\n`);
      const r = await updateAllRun(service);
      updateRuns.push(r);
      const sum = r.flashMs.reduce((a, b) => a + b, 0);
      process.stdout.write(`  downtime ${(r.downtimeMs / 1000).toFixed(2)} s, flashes ${r.flashMs.map((ms) => (ms / 1000).toFixed(2)).join(" + ")} = ${(sum / 1000).toFixed(2)} s\n`);
    }
  }

  const image = randomBytes(256 * 1024);
  const runs: Array<FlashRun & { label: string; run: number; baud: number | null; floor: number }> = [];
  for (const [label, baud] of [["unthrottled", null], ["250000 baud", 250000]] as const) {
    for (let i = 1; i <= runCount; i++) {
      process.stdout.write(`exchange floor ${label}, run ${i}…\n`);
      const floor = await exchangeFloor(image, baud);
      process.stdout.write(`flash 256 KiB ${label}, run ${i}…\n`);
      const r = await flashRun(image, baud);
      runs.push({ label, run: i, baud, floor, ...r });
      process.stdout.write(`  floor ${floor.toFixed(2)} s; flash ${r.seconds.toFixed(2)} s${r.linkLimit ? ` (link limit ${r.linkLimit.toFixed(2)} s, ${r.ratio!.toFixed(3)}x)` : ""}, verified ${r.verified}, peak RSS ${mib(r.peakKiB)}, CPU steal ${r.stealSeconds.toFixed(1)} s\n`);
    }
  }

  if (!idle || !idlePlain || !bare) return;
  const ota = await runOtaBench(service, Math.min(runCount, 3));
  const serviceOwn = serviceRuns.filter((r) => r.label === serviceLabel);
  const plainRuns = serviceRuns.filter((r) => r.label !== serviceLabel);
  const worstPeak = Math.max(...serviceOwn.map((r) => r.peakKiB));
  const unthrottled = (runs: ServiceFlash[]): number | null => runs.find((r) => r.baud === null)?.katapultSeconds ?? null;
  const average = (list: ServiceFlash[]): number => list.reduce((sum, r) => sum + r.peakKiB, 0) / list.length;
  const cpu = cpus()[0]?.model ?? "unknown CPU";
  const throttled = runs.filter((r) => r.linkLimit !== null);
  const date = new Date().toISOString();
  const lines = [
    "# Benchmarks",
    "",
    `Written by \`npm run bench\` (bench/run.ts) on ${date}.`,
    `Machine: ${hostname()}, ${cpus().length} × ${cpu}, ${(totalmem() / 2 ** 30).toFixed(1)} GiB RAM, Linux ${release()} ${arch()}, Node ${process.version}.`,
    "",
    "## Memory of `moonflash serve`",
    "",
    `The committed bundle as the service runs it (\`${serviceLabel}\`, package.json's \`start\`), beside an empty`,
    "`node` process on this machine, whose RSS is mostly the node binary's own mapped pages (RssFile). Every process",
    "starts with the environment of a systemd service (PATH and HOME only).",
    `Targets: idle ≤ empty node + ${mib(IDLE_TARGET_KIB)}; peak while flashing ≤ empty node + ${mib(FLASH_PEAK_TARGET_KIB)}.`,
    "",
    "### Idle",
    "",
    "Connected and registered to a fake Moonraker over the unix socket, idle for 30 s (its steady state), then sampled",
    `10 times over 10 s (median shown). The service's row is the median of ${idleRuns.length} fresh serves (${idleRuns.map((m) => mib(m.rss)).join(", ")}).`,
    "",
    "| process | RSS | over empty node | anonymous (heap, stacks) | file-backed (node binary, libs) | peak (VmHWM) |",
    "|---|---|---|---|---|---|",
    `| \`${serviceLabel}\` | ${mib(idle.rss)} | ${delta(idle.rss - bare.rss)} | ${mib(idle.anon)} | ${mib(idle.file)} | ${mib(idle.hwm)} |`,
    ...(service.length ? [`| without node options | ${mib(idlePlain.rss)} | ${delta(idlePlain.rss - bare.rss)} | ${mib(idlePlain.anon)} | ${mib(idlePlain.file)} | ${mib(idlePlain.hwm)} |`] : []),
    `| empty \`node -e\` | ${mib(bare.rss)} | – | ${mib(bare.anon)} | ${mib(bare.file)} | ${mib(bare.hwm)} |`,
    "",
    "### While flashing 256 KiB in service mode",
    "",
    "A client calls `flash.mcu` through the fake Moonraker (`server.extensions.request`); `serve` stops Klipper through",
    "`machine.services.stop`, flashes and verifies 256 KiB with Katapult at 250000 baud into `moonflash virtual-device`",
    "(its own process, on a pty), starts Klipper and answers. Peak = VmHWM of `serve` when the answer arrives (its",
    "highest RSS over its whole life, start-up included); after = its RSS 10 s later. A fresh `serve` per run.",
    "",
    "| command | run | link | peak RSS | peak over empty node | RSS 10 s after | katapult time | job time | CPU steal |",
    "|---|---|---|---|---|---|---|---|---|",
    ...serviceRuns.map(
      (r) =>
        `| \`${r.label}\` | ${r.run} | ${r.baud ? `${r.baud} baud` : "unthrottled"} | ${mib(r.peakKiB)} | ${delta(r.peakKiB - bare.rss)} | ${mib(r.afterKiB)} | ${r.katapultSeconds.toFixed(2)} s | ${r.seconds.toFixed(1)} s | ${r.stealSeconds.toFixed(1)} s |`,
    ),
    "",
    "## Update-all: one Klipper stop for three boards",
    "",
    "`flash.update_all` through the fake Moonraker, served by the committed bundle as the service runs it: a stand-in",
    `Klipper tree builds three images of ${updateRuns[0] ? `${updateRuns[0].imageBytes} bytes` : "about 40 KiB"} (about a real STM32 build) while Klipper runs, then one stop, three Katapult`,
    "flashes at 250000 baud into three `moonflash virtual-device` boards (the toolhead in its application, asked into",
    "Katapult first; every board's old 40 KiB firmware read back first, backup_before_flash being on for update-all),",
    "one start, and Klipper ready with every MCU on the host's version. Flash time = each board's `flash_ms` (bootloader",
    "entry, backup read-back, write, verify, COMPLETE); downtime = the result's `downtime_ms` (Klipper stopped → ready).",
    `The fake Moonraker takes ${SERVICE_TIMING.stopOkMs + SERVICE_TIMING.stopStateMs} ms to stop Klipper and ${SERVICE_TIMING.startOkMs + SERVICE_TIMING.startStateMs + SERVICE_TIMING.readyMs} ms to start it and report it ready (a real Klipper takes`,
    "seconds more to start, and that is Klipper's own time). Goal: downtime ≤ sum of the flash times + 2 s.",
    "",
    "| run | flash times | sum | downtime | downtime − sum | of which simulated stop/start | boards backed up |",
    "|---|---|---|---|---|---|---|",
    ...updateRuns.map((r, i) => {
      const sum = r.flashMs.reduce((a, b) => a + b, 0);
      return `| ${i + 1} | ${r.flashMs.map((ms) => `${(ms / 1000).toFixed(2)} s`).join(" + ")} | ${(sum / 1000).toFixed(2)} s | ${(r.downtimeMs / 1000).toFixed(2)} s | ${((r.downtimeMs - sum) / 1000).toFixed(2)} s | ${(r.serviceMs / 1000).toFixed(2)} s | ${r.backedUp} of 3 |`;
    }),
    "",
    "## Katapult flash + verify of 256 KiB",
    "",
    "`moonflash flash mcu --json` (the CLI from the committed bundle, in its own process, no node options) with our Katapult flasher",
    "(board already in Katapult: CONNECT, 4096 SEND_BLOCKs of 64 bytes, EOF, 4096 REQUEST_BLOCK read-backs, COMPLETE)",
    "into `moonflash virtual-device` (another process, on a pty), Klipper stopped/started through a fake Moonraker.",
    "Time is the katapult attempt's `elapsed_ms` from the result; peak RSS is the flashing process's VmHWM.",
    "At 250000 baud the virtual device's pty relay is the wire of a UART: every byte takes its wire time each way, a",
    "reply leaves only once its request has fully crossed, bytes reach the host in ~0.5 ms slices, and a reply that does",
    "not fit beside the unsent rest of Katapult's 96-byte transmit buffer is lost. The device itself answers at once",
    "(a real board adds its flash programming time).",
    `Link limit = bytes on the wire (${WIRE_BYTES_PER_BLOCK} per block + ${WIRE_BYTES_FIXED} fixed) / (baud/10): what strictly`,
    "request/response exchanges need at that speed with zero latency. Goal: within 1.1× of it. Our session sends the",
    "next block as soon as the current block's ACK begins (never while the board programs flash), and asks for the next",
    "read-back once 52 bytes of the current reply are in (the most Katapult's 96-byte transmit buffer allows), so the",
    "turnaround overlaps the reply and the verify half can finish under its share.",
    "Exchange floor = the same exchanges one at a time by a bare loop over the same serial link (no retries, progress",
    "or overlap): what the link and the emulator cost a strictly sequential host such as flashtool.py.",
    "",
    "| link | run | flash time | link limit | flash / link limit | exchange floor | flash / floor | verified | peak RSS | CPU steal |",
    "|---|---|---|---|---|---|---|---|---|---|",
    ...runs.map(
      (r) =>
        `| ${r.label} | ${r.run} | ${r.seconds.toFixed(2)} s | ${r.linkLimit ? `${r.linkLimit.toFixed(2)} s` : "–"} | ${r.ratio ? `${r.ratio.toFixed(3)}×` : "–"} | ${r.floor.toFixed(2)} s | ${(r.seconds / r.floor).toFixed(3)}× | ${r.verified} | ${mib(r.peakKiB)} | ${r.stealSeconds.toFixed(1)} s |`,
    ),
    "",
    "## Reading these figures",
    "",
    `- Idle: \`serve\` takes ${delta(idle.rss - bare.rss)} over an empty Node process: ${idle.rss - bare.rss <= IDLE_TARGET_KIB ? "the target is met" : "**the target is missed**"}. The agent's`,
    "  share is its heap and code, the node built-ins it needs (net, streams, fs) and the ESM loader. Runtime libraries",
    "  are bundled, zod as zod/mini; code behind a dynamic import (execa, ws, the CLI's other verbs) sits in chunks",
    "  `serve` never loads, and serialport, pino-pretty and cli-progress load only when used.",
    `- Peak while flashing: at most ${delta(worstPeak - bare.rss)} over an empty Node process: ${worstPeak - bare.rss <= FLASH_PEAK_TARGET_KIB ? "the target is met" : "**the target is missed**"}.`,
    "  Where a flash's memory went, and what was done (measured with /proc/<pid>/smaps by kind of mapping):",
    "  - V8's optimizing compiler: TurboFan compiles the hot per-block functions on V8's worker threads; its zones come",
    "    from each thread's glibc arena, which keeps the pages (4–6 MiB that stayed), and its own code in the node",
    "    binary is mapped in (about 4 MiB). The service runs with `--lite-mode` (no JIT: the agent waits on serial",
    "    links and Moonraker, and a UART flash takes the same time, see the job times above) and `--v8-pool-size=1`",
    `    (one worker thread)${plainRuns.length ? `; here the runs without node options peaked ${delta(average(plainRuns) - average(serviceOwn))} higher on average` : ""}.`,
    ...(unthrottled(serviceOwn) !== null && unthrottled(plainRuns) !== null
      ? [`    Unthrottled (pty speed, no UART limit), the flash took ${unthrottled(serviceOwn)!.toFixed(2)} s without the JIT and ${unthrottled(plainRuns)!.toFixed(2)} s with it.`]
      : []),
    "  - One progress event per 64-byte block (4096 per phase, each with a timestamp string) built before the throttle",
    "    dropped most of them: the job runner now builds an event only when the throttle lets one out.",
    "  - Finding the image's MCU tried zlib at ~130 offsets of a 256 KiB image (any two bytes that look like a zlib",
    "    header), each leaving ~20 KiB of native inflate state until the next full GC (+2.9 MiB): a cheap check of the",
    "    first deflate block header now rules out nearly all of them.",
    "  - A read(2) into EAGAIN after every short read threw an Error with a stack trace per reply: the link stops",
    "    reading at a short read and waits for the poller.",
    "  - What remains is the node binary's code a flash runs for the first time (clean, shared pages) and a V8 heap",
    "    grown by the flash's code and data.",
    "  - At idle, a timer that built paths every 10 s made node's path code hot after ~50 s, and TurboFan then mapped",
    "    ~4 MiB of its code into the idle agent: the path is now computed once. The fake Moonraker sends",
    "    notify_proc_stat_update once a second, as Moonraker does, so the idle figures include that traffic.",
    `- Flash time: at 250000 baud the flash took ${range(throttled.map((r) => r.ratio!))}× the link limit (median ${median(throttled.map((r) => r.ratio!)).toFixed(2)}×), the`,
    `  strictly sequential floor ${range(throttled.map((r) => r.floor / r.linkLimit!))}×. What is left over the limit is per-exchange latency: the`,
    "  host's turnaround (about 0.14 ms measured in-process) and the wake-ups of four processes on this 2-CPU VM, whose",
    "  hypervisor takes CPU time away at moments (CPU steal column: the slow runs are the ones with steal). On hardware",
    "  the USB-serial adapter's latency and the board's flash programming time take their place.",
    "- Unthrottled runs are bound by the same per-exchange hops between three processes and vary with machine load.",
    ...(updateRuns.length
      ? [
          `- Update-all: Klipper was down at most ${(Math.max(...updateRuns.map((r) => r.downtimeMs - r.flashMs.reduce((a, b) => a + b, 0))) / 1000).toFixed(2)} s longer than the three flashes took, ${
            updateRuns.every((r) => r.downtimeMs <= r.flashMs.reduce((a, b) => a + b, 0) + 2000) ? "within the 2 s goal" : "**over the 2 s goal**"
          }; most of`,
          "  that is the simulated service stop and start; builds and pre-flight happen before the stop.",
        ]
      : []),
    "",
    ...otaSection(ota, serviceLabel),
  ];
  await mkdir(join(root, "docs"), { recursive: true });
  await writeFile(join(root, "docs", "BENCHMARKS.md"), lines.join("\n"));
  process.stdout.write(`wrote docs/BENCHMARKS.md\n${(await readFile(join(root, "docs", "BENCHMARKS.md"), "utf8"))}`);
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
