// The flash engine: resolves an MCU to a device, an image and a chain of methods, checks everything while
// Klipper still runs, then flashes with Klipper stopped (guard.ts) and falls back along the chain.
// `flash.mcu` (agent) and `moonflash flash` (CLI) both call it; it knows the printer only as a PrinterPort.

import { existsSync } from "node:fs";
import type { Stats } from "node:fs";
import { readFile, readlink, realpath, stat } from "node:fs/promises";
import { join, resolve } from "node:path";
import type { Logger } from "pino";
import { MCU_DEFAULTS, parseFlashMethods, resolveKconfig, type FlashSettings, type McuConfig } from "./config.js";
import { MoonflashError, toMoonflashError, type ErrorCode } from "../core/errors.js";
import type { JobContext, LogLevel } from "../core/events.js";
import type { JobRunner } from "../core/jobs.js";
import { dataPaths } from "../core/paths.js";
import type { CanbusNode, McuInfo, PrinterPort } from "../core/printer.js";
import { discoverCanNodes, discoverDevices, mapDevicesToMcus, type DiscoveredDevice, type DiscoverOptions } from "./discovery.js";
import { FirmwareStore, IMAGES_KEPT, sha256Of, type ImageMeta, type StoredImage } from "./firmware-store.js";
import { assertNotPrinting, withKlipperStopped, type GuardOutcome } from "./guard.js";
import { KatapultFlasher } from "./katapult/flasher.js";
import { mcuFlash } from "./mcu-flash.js";
import { mcuUserName } from "./mcu-name.js";
import { FlashtoolFlasher } from "./methods/flashtool.js";
import { LinuxHostFlasher } from "./methods/linux-host.js";
import { MakeFlasher } from "./methods/make.js";
import { WchispFlasher } from "./methods/wchisp.js";
import { type FlashMethodName, type Flasher, type FlashJobTarget, type FlashOutcome, type FlashTarget } from "./types.js";
import { checkVersions, type VersionCheck } from "./versions.js";

/** Methods tried when neither the request nor moonflash.conf names one. */
const AUTO_CHAIN = { serial: ["katapult", "make"], canbus: ["flashtool"], linux: ["linux"] } as const satisfies Record<string, readonly FlashMethodName[]>;

/**
 * Failures after which another method must not run: the user stopped it, or the image is wrong for the board (built
 * for another MCU, or larger than its flash: another method would write it just as truncated).
 */
const FINAL_CODES: ReadonlySet<ErrorCode> = new Set(["CANCELLED", "PRINTER_BUSY", "MCU_MISMATCH", "FIRMWARE_TOO_LARGE"]);

/** How a macro user and a CLI user give the image, for messages both may read. */
const FIRMWARE_PARAM_HINT = "give its path with FIRMWARE= (macro) or --firmware (CLI)";

export interface FlashParams {
  /** "mcu", "toolhead" or "mcu toolhead". */
  mcu: string;
  firmware?: string;
  /** One method, a comma list, or a list; overrides moonflash.conf's `method:`. */
  method?: string | string[];
  dry_run?: boolean;
}

export interface FlashPlan {
  /** Config section, e.g. "mcu toolhead". */
  mcu: string;
  /** Serial path as configured, or "<interface>:<uuid>" for CAN. */
  device: string;
  /** Where the serial path points now (/dev/ttyACM0, /dev/pts/3); null for CAN. */
  device_real_path: string | null;
  firmware: string;
  firmware_bytes: number;
  /** Methods that passed pre-flight, in the order they will be tried. */
  methods: FlashMethodName[];
  /** Methods dropped by pre-flight, with why. */
  skipped: Array<{ method: FlashMethodName; code: ErrorCode; message: string }>;
  expected_mcu_type: string | null;
  target: FlashTarget;
}

export interface FlashAttempt {
  method: FlashMethodName;
  ok: boolean;
  elapsed_ms: number;
  code?: ErrorCode;
  message?: string;
}

export interface FlashResult {
  mcu: string;
  device: string;
  /** The method that succeeded. */
  method: FlashMethodName;
  attempts: FlashAttempt[];
  bytes: number;
  verified: boolean;
  elapsed_ms: number;
  klipper_restarted: boolean;
}

export interface FlashDryRunResult {
  dry_run: true;
  mcu: string;
  device: string;
  firmware: string;
  methods: FlashMethodName[];
  plan: FlashPlan;
}

export interface RollbackParams {
  /** "mcu", "toolhead" or "mcu toolhead". */
  mcu: string;
  dry_run?: boolean;
}

/** The stored image a rollback flashes (firmware-store.ts). */
export interface RollbackImage {
  version: string | null;
  sha256: string;
  size: number;
  /** When it was on the board before. */
  date: string;
  source: StoredImage["source"];
  source_path: string | null;
}

export type RollbackResult = (FlashResult | FlashDryRunResult) & { rollback_to: RollbackImage };

/** One MCU section as moonflash knows it: from Klipper's config, moonflash.conf, or both. */
export interface KnownMcu {
  section: string;
  serial?: string;
  canbusUuid?: string;
  canbusInterface?: string;
  sources: Array<"klipper" | "moonflash">;
}

export interface CanbusReport {
  interface: string;
  /** Unassigned nodes that answered the query, with the MCU section whose canbus_uuid matches. */
  nodes: Array<CanbusNode & { mcu?: string }>;
  error?: { code: ErrorCode; message: string };
}

export interface DevicesReport {
  devices: DiscoveredDevice[];
  mcus: KnownMcu[];
  canbus: CanbusReport[];
}

export interface FlashEngineOptions {
  config: FlashSettings;
  printer: PrinterPort;
  runner: JobRunner;
  logger: Logger;
  /** Replaces the default flasher of a method (tests, or a board-specific variant). */
  flashers?: Partial<Record<FlashMethodName, Flasher>>;
  /** Roots for device discovery (tests point them at a fake tree). */
  discovery?: DiscoverOptions;
  /** The install's bin/ directory, searched for wchisp before PATH. */
  installBin?: string;
}

/** The flashers moonflash.conf asks for: our own Katapult host, flashtool.py, make flash, wchisp, the Linux host MCU. */
export function defaultFlashers(
  config: FlashSettings,
  opts: { logger: Logger; printer: PrinterPort; installBin?: string; discovery?: DiscoverOptions },
): Record<FlashMethodName, Flasher> {
  const m = config.moonflash;
  const logger = (method: FlashMethodName) => opts.logger.child({ method });
  return {
    katapult: new KatapultFlasher({ logger: logger("katapult") }),
    flashtool: new FlashtoolFlasher({ python: m.python, katapultPath: m.katapult_path, logger: logger("flashtool") }),
    make: new MakeFlasher({ logger: logger("make") }),
    wchisp: new WchispFlasher({
      ...(m.wchisp_path ? { wchispPath: m.wchisp_path } : {}),
      ...(opts.installBin ? { installBin: opts.installBin } : {}),
      discover: () => discoverDevices(opts.discovery),
      logger: logger("wchisp"),
    }),
    linux: new LinuxHostFlasher({ printer: opts.printer, logger: logger("linux") }),
  };
}

/** "toolhead" and "mcu toolhead" name the same section; whitespace is not significant. */
export function mcuSectionName(name: string): string {
  const words = name.trim().split(/\s+/).filter(Boolean);
  if (words[0] === "mcu") words.shift();
  return words.length === 0 ? "mcu" : `mcu ${words.join(" ")}`;
}

/**
 * Reads and checks the image, once per job, before anything is touched. Its size is compared with `flash_size:`
 * when moonflash.conf gives one, else with the flash Klipper's Kconfig gives the expected MCU type (mcu-flash.ts).
 * The methods get these bytes; none reads or checks the file again.
 */
async function readFirmware(path: string, flashSize: number | null, expectedMcuType: string | null, section: string): Promise<Buffer> {
  let image: Buffer;
  try {
    image = await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EISDIR") {
      throw new MoonflashError("FIRMWARE_NOT_FOUND", `The firmware ${path} is not a file. Give the path of the built image (e.g. out/klipper.bin): ${FIRMWARE_PARAM_HINT}.`, { firmware: path });
    }
    if ((err as NodeJS.ErrnoException).code === "ENOENT") {
      throw new MoonflashError(
        "FIRMWARE_NOT_FOUND",
        `The firmware ${path} does not exist. Build it first (make in the Klipper tree) or ${FIRMWARE_PARAM_HINT}.`,
        { firmware: path },
      );
    }
    throw toMoonflashError(err);
  }
  const size = image.length;
  if (size === 0) {
    throw new MoonflashError("FIRMWARE_EMPTY", `The firmware ${path} is empty. Rebuild it; an interrupted build leaves an empty file.`, { firmware: path });
  }
  if (flashSize !== null) {
    if (size > flashSize) {
      throw new MoonflashError(
        "FIRMWARE_TOO_LARGE",
        `The firmware ${path} is ${size} bytes but the MCU has ${flashSize} bytes for the application. Check the build's MCU and bootloader offset, or flash_size in moonflash.conf.`,
        { firmware: path, bytes: size, flashSize, source: "moonflash.conf flash_size" },
      );
    }
    return image;
  }
  const chip = expectedMcuType ? mcuFlash(expectedMcuType) : undefined;
  if (chip && size > chip.flashSize) {
    // The bootloader's offset is known only once it answers (Katapult CONNECT), after Klipper is stopped: here the
    // image can only be compared with the whole flash; the Katapult flasher checks the room after the bootloader.
    const limit = chip.wholeFlash
      ? `${expectedMcuType} has only ${chip.flashSize} bytes of flash in all`
      : `a Klipper build for ${expectedMcuType} holds at most ${chip.flashSize} bytes`;
    throw new MoonflashError(
      "FIRMWARE_TOO_LARGE",
      `The firmware ${path} is ${size} bytes but ${limit} (FLASH_SIZE in ${chip.source}), before counting the bootloader, ` +
        `whose size is known only once it answers. Nothing was stopped or written. Build the firmware for this board ` +
        `(make menuconfig: processor model), or, if the chip really has room for this image, set flash_size: in [${section}] of moonflash.conf.`,
      { firmware: path, bytes: size, flashSize: chip.flashSize, mcuType: expectedMcuType, source: chip.source },
    );
  }
  return image;
}

/**
 * A serial path is accepted only when what it really points to is a character device under /dev: a pty
 * symlink anywhere is fine (it resolves to /dev/pts/N), a link to /etc/passwd or a plain file is not. A path that
 * resolves to nothing (missing, or a link whose target is gone, as a /dev/serial/by-id link is while its board is
 * unplugged) is a missing device wherever it is: DEVICE_NOT_FOUND, not PATH_REJECTED.
 */
async function checkDevicePath(path: string): Promise<string> {
  const absolute = resolve(path);
  const missing = (extra: { linkTarget?: string; realPath?: string }, cause: unknown): MoonflashError =>
    new MoonflashError(
      "DEVICE_NOT_FOUND",
      `The serial device ${path} is not present${extra.linkTarget ? ` (it is a link to ${extra.linkTarget}, which does not exist)` : ""}. ` +
        `Check the USB cable, that the board is powered and the serial: path; flash.devices (FLASH_DEVICES) lists what is connected.`,
      { device: path, ...extra },
      { cause },
    );
  let real: string;
  try {
    real = await realpath(absolute);
  } catch (err) {
    const errno = (err as NodeJS.ErrnoException).code;
    if (errno === "ENOENT" || errno === "ENOTDIR") {
      const linkTarget = await readlink(absolute).catch(() => null);
      throw missing(linkTarget ? { linkTarget } : {}, err);
    }
    // ELOOP (a link cycle), EACCES: something is there, but not a device moonflash can use.
    throw new MoonflashError(
      "PATH_REJECTED",
      `The serial device ${path} cannot be resolved (${errno ?? (err as Error).message}). Use the board's /dev/serial/by-id or /dev/serial/by-path link.`,
      { device: path, errno },
      { cause: err },
    );
  }
  let s: Stats;
  try {
    s = await stat(real);
  } catch (err) {
    // Unplugged between realpath and stat.
    if ((err as NodeJS.ErrnoException).code === "ENOENT") throw missing({ realPath: real }, err);
    throw toMoonflashError(err);
  }
  if (!real.startsWith("/dev/") || !s.isCharacterDevice()) {
    throw new MoonflashError(
      "PATH_REJECTED",
      `The serial device ${path} resolves to ${real}, which is not a character device under /dev. Use the board's /dev/serial/by-id or /dev/serial/by-path link.`,
      { device: path, realPath: real },
    );
  }
  return real;
}

function unknownMcu(typed: string, section: string, klipperMcus: McuInfo[], own: Record<string, McuConfig>): MoonflashError {
  const known = [...new Set([...klipperMcus.map((m) => m.section), ...Object.keys(own)])].sort();
  // Listed as typed: section "mcu toolhead" is FLASH_MCU MCU=toolhead / moonflash flash toolhead.
  const names = known.map(mcuUserName);
  const example = names.find((n) => n !== "mcu") ?? names[0] ?? "NAME";
  return new MoonflashError(
    "UNKNOWN_MCU",
    `Unknown MCU '${typed}'. Known MCUs: ${names.join(", ") || "none"}. ` +
      `Use one of these names (e.g. FLASH_MCU MCU=${example} in a macro, moonflash flash ${example} on the command line), ` +
      `or add an [${section}] section with serial: or canbus_uuid: to moonflash.conf.`,
    { mcu: typed, known, names },
  );
}

/** A stored image for people: "v0.12.0-85-g1234 (flashed 2025-01-02 10:11 UTC, from /home/pi/klipper/out/klipper.bin)". */
function describeImage(entry: StoredImage): string {
  const when = `${entry.date.slice(0, 16).replace("T", " ")} UTC`;
  const from = entry.source === "read-back" ? "read back from the board" : entry.source_path ? `from ${entry.source_path}` : `by ${entry.source}`;
  return `${entry.version ?? "an image without a Klipper version"} (flashed ${when}, ${from})`;
}

/** The runner's context with a second abort source: a shutdown signal, honoured only while the job is cancellable. */
function contextWithShutdown(ctx: JobContext, shutdown: AbortSignal): JobContext {
  const controller = new AbortController();
  let cancellable = true;
  const abort = (reason: unknown) => {
    if (!controller.signal.aborted) controller.abort(reason);
  };
  if (ctx.signal.aborted) abort(ctx.signal.reason);
  ctx.signal.addEventListener("abort", () => abort(ctx.signal.reason), { once: true });
  shutdown.addEventListener(
    "abort",
    () => {
      if (cancellable) abort(shutdown.reason);
      else ctx.log("warn", "shutdown requested while writing flash: finishing the write first");
    },
    { once: true },
  );
  return {
    jobId: ctx.jobId,
    kind: ctx.kind,
    target: ctx.target,
    signal: controller.signal,
    stage: (stage, message, board) => ctx.stage(stage, message, board),
    progress: (done, total, unit, phase) => ctx.progress(done, total, unit, phase),
    log: (level, message, board) => ctx.log(level, message, board),
    setCancellable(value, reason) {
      cancellable = value;
      ctx.setCancellable(value, reason);
      if (value && shutdown.aborted) abort(shutdown.reason);
    },
  };
}

export class FlashEngine {
  private readonly config: FlashSettings;
  private readonly printer: PrinterPort;
  private readonly runner: JobRunner;
  private readonly logger: Logger;
  private readonly flashers: Record<FlashMethodName, Flasher>;
  private readonly discovery: DiscoverOptions;
  /** The last images flashed to each MCU: what rollback flashes, and an MCU's version while Klipper is down. */
  readonly store: FirmwareStore;

  constructor(opts: FlashEngineOptions) {
    this.config = opts.config;
    this.printer = opts.printer;
    this.runner = opts.runner;
    this.logger = opts.logger;
    this.store = new FirmwareStore(dataPaths(opts.config.dataDir).firmware, opts.logger.child({ ns: "firmware-store" }));
    this.discovery = { logger: opts.logger, ...opts.discovery };
    this.flashers = {
      ...defaultFlashers(opts.config, { logger: opts.logger, printer: opts.printer, discovery: this.discovery, ...(opts.installBin ? { installBin: opts.installBin } : {}) }),
      ...opts.flashers,
    };
  }

  /** Serial devices found on this host, each mapped to the MCU section that uses it, plus the known sections. */
  async devices(): Promise<DevicesReport> {
    const [found, mcus] = await Promise.all([discoverDevices(this.discovery), this.knownMcus()]);
    const devices = await mapDevicesToMcus(found, mcus);
    return { devices, mcus, canbus: await this.canbusNodes(mcus) };
  }

  /**
   * CAN nodes on every interface a known MCU uses, through Moonraker (or flashtool.py -q when it is installed).
   * Nodes a running Klipper has claimed do not answer; an interface that fails is reported, not fatal.
   */
  private async canbusNodes(mcus: KnownMcu[]): Promise<CanbusReport[]> {
    const interfaces = [...new Set(mcus.flatMap((m) => (m.canbusUuid ? [m.canbusInterface ?? MCU_DEFAULTS.canbus_interface] : [])))].sort();
    const script = join(this.config.moonflash.katapult_path, "scripts", "flashtool.py");
    const flashtool = existsSync(script) ? { python: this.config.moonflash.python, script } : undefined;
    return Promise.all(
      interfaces.map(async (iface): Promise<CanbusReport> => {
        try {
          const nodes = await discoverCanNodes({ iface, printer: this.printer, ...(flashtool ? { flashtool } : {}) });
          return {
            interface: iface,
            nodes: nodes.map((n) => {
              const mcu = mcus.find((m) => m.canbusUuid === n.uuid.toLowerCase())?.section;
              return { ...n, ...(mcu ? { mcu } : {}) };
            }),
          };
        } catch (err) {
          const e = toMoonflashError(err);
          return { interface: iface, nodes: [], error: { code: e.code, message: e.message } };
        }
      }),
    );
  }

  /** Resolves and pre-flights a flash without stopping or writing anything. */
  async plan(params: FlashParams): Promise<FlashPlan> {
    return (await this.buildPlan(params, (level, message) => this.logger[level](message))).plan;
  }

  /** Runs one flash job: plan, keep the image, stop Klipper, try each method, start Klipper. */
  async flash(params: FlashParams): Promise<FlashResult | FlashDryRunResult> {
    const section = mcuSectionName(params.mcu);
    return this.runner.run({ kind: "flash", target: section, params }, (ctx) => this.flashJob(params, ctx));
  }

  /**
   * Flashes the image the MCU had before its current one (firmware-store.ts), as a normal flash job: the same
   * pre-flight, guard, methods and console lines. NO_ROLLBACK_IMAGE, before any job, when there is none.
   */
  async rollback(params: RollbackParams): Promise<RollbackResult> {
    const section = mcuSectionName(params.mcu);
    await this.rollbackImage(params.mcu);
    return this.runner.run({ kind: "flash", target: section, params: { ...params, rollback: true } }, async (ctx) => {
      // Picked again under the job lock: another flash may have changed the store since.
      const entry = await this.rollbackImage(params.mcu);
      ctx.stage("rollback", `rolling back to ${describeImage(entry)}`);
      const result = await this.flashJob({ mcu: params.mcu, firmware: entry.file, ...(params.dry_run ? { dry_run: true } : {}) }, ctx, entry);
      const { version, sha256, size, date, source, source_path } = entry;
      return { ...result, rollback_to: { version, sha256, size, date, source, source_path } };
    });
  }

  /** Per MCU: its firmware version, Klipper's, and whether Klipper would call it outdated (versions.ts). */
  async checkVersions(): Promise<VersionCheck> {
    return checkVersions(this.printer, this.config, { store: this.store, logger: this.logger });
  }

  /** The entry a rollback of `mcu` flashes; UNKNOWN_MCU or NO_ROLLBACK_IMAGE when there is none to flash. */
  private async rollbackImage(mcu: string): Promise<StoredImage> {
    const section = mcuSectionName(mcu);
    const name = mcuUserName(section);
    const [current, previous] = await this.store.list(section);
    const instead = `Flash a firmware file instead: FLASH_MCU MCU=${name} FIRMWARE=/path/to/klipper.bin (moonflash flash ${name} --firmware FILE).`;
    if (previous && !previous.damaged) return previous;
    if (previous) {
      throw new MoonflashError(
        "NO_ROLLBACK_IMAGE",
        `The image a rollback of ${name} would flash, ${describeImage(previous)}, is damaged: ${previous.damaged}. Nothing was stopped or written. ${instead}`,
        { mcu: section, image: previous },
      );
    }
    const klipperMcus = await this.klipperMcus();
    if (!current && !klipperMcus.some((m) => m.section === section) && !this.config.mcus[section]) throw unknownMcu(mcu, section, klipperMcus, this.config.mcus);
    const held = current ? `only the one on it now, ${describeImage(current)}` : "none yet";
    throw new MoonflashError(
      "NO_ROLLBACK_IMAGE",
      `There is no earlier image of ${name} to roll back to: moonflash keeps the last ${IMAGES_KEPT} images it flashed to each MCU and has ${held}. Nothing was stopped or written. ${instead}`,
      { mcu: section, images: current ? 1 : 0 },
    );
  }

  /** One flash job's work; `rollback` is the stored image being flashed again, checked against its SHA-256. */
  private async flashJob(params: FlashParams, ctx: JobContext, rollback?: StoredImage): Promise<FlashResult | FlashDryRunResult> {
    const started = performance.now();
    ctx.stage("plan");
    const { plan, image } = await this.buildPlan(params, (level, message) => ctx.log(level, message));
    if (rollback && sha256Of(image) !== rollback.sha256) {
      const name = mcuUserName(plan.mcu);
      throw new MoonflashError(
        "NO_ROLLBACK_IMAGE",
        `The stored image ${plan.firmware} no longer matches its SHA-256: it is damaged, so there is no image to roll ${name} back to. Nothing was stopped or written. ` +
          `Flash a firmware file instead: FLASH_MCU MCU=${name} FIRMWARE=/path/to/klipper.bin (moonflash flash ${name} --firmware FILE).`,
        { mcu: plan.mcu, image: rollback },
      );
    }
    if (params.dry_run) {
      return { dry_run: true, mcu: plan.mcu, device: plan.device, firmware: plan.firmware, methods: plan.methods, plan };
    }
    assertNotPrinting(this.printer);
    ctx.stage("keep-image");
    await this.keepImage(plan, image);

    const attempts: FlashAttempt[] = [];
    const backup = !rollback && (await this.backupPlanned(plan.mcu, false)) ? this.backupHook(plan.mcu) : undefined;
    const guarded = await this.withKlipperStopped(ctx, plan.mcu, async (inner) => {
      const done = await this.runChain(plan, { ...plan.target, image, ...(backup ? { backupApplication: backup } : {}) }, inner, attempts);
      // Recorded as soon as the board holds it, before Klipper starts: a failed restart does not undo the flash.
      await this.recordImage(plan, image, ctx, rollback);
      return done;
    });
    const { method, outcome } = guarded.value;
    return {
      mcu: plan.mcu,
      device: outcome.device,
      method,
      attempts,
      bytes: outcome.bytes,
      verified: outcome.verified,
      elapsed_ms: Math.round(performance.now() - started),
      klipper_restarted: guarded.klipperRestart?.ok === true,
    };
  }

  /**
   * For a job that flashes several MCUs under one Klipper stop (update-all): pre-flight one MCU and read its
   * image once, while Klipper runs, and keep a copy of it. Throws what a single flash's pre-flight throws.
   */
  async prepare(params: FlashParams, ctx: JobContext): Promise<{ plan: FlashPlan; image: Buffer }> {
    const prepared = await this.buildPlan(params, (level, message) => ctx.log(level, message));
    await this.keepImage(prepared.plan, prepared.image);
    return prepared;
  }

  /**
   * For update-all, inside its guard: flash a prepared MCU with its method chain and record the image. With
   * `backup` (backupPlanned, asked while Klipper ran and its config was readable) the board's current application is
   * read back into the store first. `record` says where the image came from (default: a flash of plan.firmware);
   * the OTA pipeline records "ota", since its staging path is gone after the update.
   */
  async flashPrepared(
    plan: FlashPlan,
    image: Buffer,
    ctx: JobContext,
    opts: { backup?: boolean; record?: Pick<ImageMeta, "source" | "sourcePath"> } = {},
  ): Promise<{ method: FlashMethodName; outcome: FlashOutcome; attempts: FlashAttempt[]; backed_up: boolean }> {
    const attempts: FlashAttempt[] = [];
    let backedUp = false;
    const backup = opts.backup ? this.backupHook(plan.mcu, () => (backedUp = true)) : undefined;
    try {
      const done = await this.runChain(plan, { ...plan.target, image, ...(backup ? { backupApplication: backup } : {}) }, ctx, attempts);
      await this.recordImage(plan, image, ctx, undefined, opts.record);
      return { ...done, attempts, backed_up: backedUp };
    } catch (err) {
      const e = toMoonflashError(err, "FLASH_FAILED");
      throw new MoonflashError(e.code, e.message, { ...e.details, attempts }, { cause: e });
    }
  }

  /**
   * Whether a flash of `mcu` reads the board's application back first (backup_before_flash, else `byDefault`): only
   * while the store keeps no image of it, since otherwise a rollback has one. Asked while Klipper runs: it reads
   * Klipper's config.
   */
  async backupPlanned(mcu: string, byDefault: boolean): Promise<boolean> {
    const section = mcuSectionName(mcu);
    const own = this.config.mcus[section];
    if (!(own?.backup_before_flash ?? byDefault)) return false;
    // Only our Katapult host reads a board back; it talks to serial boards (CAN goes through flashtool.py).
    const connection = await this.mcuConnection(section);
    if (connection.mcuType?.toLowerCase() === "linux" || !connection.serial) return false;
    if (!(own?.method ?? AUTO_CHAIN.serial).includes("katapult")) return false;
    return (await this.store.list(section)).length === 0;
  }

  /** Keeps what the flasher read back as the MCU's image before the one about to be written. */
  private backupHook(mcu: string, onStored?: () => void): NonNullable<FlashJobTarget["backupApplication"]> {
    return async (application) => {
      await this.store.add(mcu, application, { source: "read-back" });
      onStored?.();
    };
  }

  /** Runs `work` with Klipper stopped once for it (the guard of a single flash, for a job of several). */
  withKlipperStopped<T>(ctx: JobContext, target: string, work: (ctx: JobContext) => Promise<T>): Promise<GuardOutcome<T>> {
    return withKlipperStopped(
      this.printer,
      dataPaths(this.config.dataDir).journal,
      {
        jobId: ctx.jobId,
        kind: "flash",
        target,
        serviceTimeoutMs: this.config.moonflash.service_timeout * 1000,
        logger: this.logger,
        onStage: (stage, message) => ctx.stage(stage, message),
      },
      (shutdown) => work(contextWithShutdown(ctx, shutdown)),
    );
  }

  /** Cancels the running flash job; the runner refuses once writing has started. */
  cancel(): { id: string } {
    return this.runner.cancel("flash");
  }

  private async runChain(
    plan: FlashPlan,
    target: FlashJobTarget,
    ctx: JobContext,
    attempts: FlashAttempt[],
  ): Promise<{ method: FlashMethodName; outcome: FlashOutcome }> {
    let lastError: MoonflashError | null = null;
    for (const [index, method] of plan.methods.entries()) {
      if (ctx.signal.aborted) throw toMoonflashError(ctx.signal.reason ?? new MoonflashError("CANCELLED", "The flash job was cancelled."), "CANCELLED");
      ctx.stage(method, `flashing ${plan.mcu} with ${method}`);
      const started = performance.now();
      try {
        const outcome = await this.flashers[method].flash(target, ctx);
        attempts.push({ method, ok: true, elapsed_ms: Math.round(performance.now() - started) });
        return { method, outcome };
      } catch (err) {
        const error = toMoonflashError(err, "FLASH_FAILED");
        attempts.push({ method, ok: false, elapsed_ms: Math.round(performance.now() - started), code: error.code, message: error.message });
        lastError = error;
        const next = plan.methods[index + 1];
        if (FINAL_CODES.has(error.code) || ctx.signal.aborted || !next) break;
        ctx.log("warn", `${method} failed: ${error.message}; trying ${next}`);
      }
    }
    const last = lastError ?? new MoonflashError("FLASH_FAILED", "No flash method was tried.");
    throw new MoonflashError(last.code, last.message, { ...last.details, attempts }, { cause: last });
  }

  /** How an MCU is reached (serial path or CAN uuid) and its type, as Klipper's config and moonflash.conf say. */
  async mcuConnection(mcu: string): Promise<KnownMcu & { mcuType?: string; baud?: number }> {
    const section = mcuSectionName(mcu);
    const known = (await this.knownMcus()).find((m) => m.section === section) ?? { section, sources: [] };
    const klipper = (await this.klipperMcus()).find((m) => m.section === section);
    const own = this.config.mcus[section];
    const mcuType = own?.mcu_type ?? klipper?.mcuType;
    // The baud goes with the device: moonflash.conf's when it names the device, else Klipper's (as buildPlan).
    const baud = own?.serial ? own.baud : (klipper?.baud ?? own?.baud);
    return { ...known, ...(mcuType ? { mcuType } : {}), ...(baud ? { baud } : {}) };
  }

  private async knownMcus(): Promise<KnownMcu[]> {
    const known = new Map<string, KnownMcu>();
    for (const info of await this.klipperMcus()) {
      known.set(info.section, {
        section: info.section,
        ...(info.serial ? { serial: info.serial } : {}),
        ...(info.canbusUuid ? { canbusUuid: info.canbusUuid, canbusInterface: info.canbusInterface ?? MCU_DEFAULTS.canbus_interface } : {}),
        sources: ["klipper"],
      });
    }
    for (const mc of Object.values(this.config.mcus)) {
      const entry = known.get(mc.section) ?? { section: mc.section, sources: [] };
      // moonflash.conf's device wins: it is how a user points at a board Klipper's config lists differently or not yet.
      if (mc.serial) {
        entry.serial = mc.serial;
        delete entry.canbusUuid;
        delete entry.canbusInterface;
      } else if (mc.canbus_uuid) {
        entry.canbusUuid = mc.canbus_uuid;
        entry.canbusInterface = mc.canbus_interface;
        delete entry.serial;
      }
      entry.sources.push("moonflash");
      known.set(mc.section, entry);
    }
    return [...known.values()].sort((a, b) => a.section.localeCompare(b.section));
  }

  /** Klipper's [mcu*] sections, or none while Klipper (or Moonraker) is down: moonflash.conf still works then. */
  private async klipperMcus(): Promise<McuInfo[]> {
    if (!this.printer.state().klippyConnected) return [];
    try {
      return (await this.printer.mcuReport()).mcus;
    } catch (err) {
      this.logger.warn({ err }, "could not read Klipper's MCU sections; using moonflash.conf only");
      return [];
    }
  }

  private async buildPlan(params: FlashParams, log: (level: LogLevel, message: string) => void): Promise<{ plan: FlashPlan; image: Buffer }> {
    const section = mcuSectionName(params.mcu);
    const klipperMcus = await this.klipperMcus();
    const klipper = klipperMcus.find((m) => m.section === section);
    const own: McuConfig | undefined = this.config.mcus[section];
    if (!klipper && !own) throw unknownMcu(params.mcu, section, klipperMcus, this.config.mcus);

    // The device comes from one place, and baud/interface with it: moonflash.conf when it names a device, else Klipper.
    const fromOwn = !!(own?.serial || own?.canbus_uuid);
    const serial = fromOwn ? (own?.serial ?? undefined) : klipper?.serial;
    const canbusUuid = fromOwn ? (own?.canbus_uuid ?? undefined) : klipper?.canbusUuid;
    const canbusInterface = fromOwn ? own!.canbus_interface : (klipper?.canbusInterface ?? own?.canbus_interface ?? MCU_DEFAULTS.canbus_interface);
    const baud = fromOwn ? own!.baud : (klipper?.baud ?? own?.baud ?? MCU_DEFAULTS.baud);
    if (!serial && !canbusUuid) {
      throw new MoonflashError(
        "DEVICE_NOT_FOUND",
        `[${section}] has no serial: or canbus_uuid: in Klipper's config or moonflash.conf. Add serial: (or canbus_uuid:) to [${section}] in moonflash.conf.`,
        { mcu: section },
      );
    }

    const expectedMcuType = own?.mcu_type ?? klipper?.mcuType ?? null;
    const linuxHost = expectedMcuType?.toLowerCase() === "linux";
    const methods =
      params.method !== undefined
        ? parseFlashMethods(params.method)
        : (own?.method ?? [...(linuxHost ? AUTO_CHAIN.linux : serial ? AUTO_CHAIN.serial : AUTO_CHAIN.canbus)]);
    const firmware = resolve(params.firmware ?? own?.firmware ?? join(this.config.moonflash.klipper_path, "out", linuxHost ? "klipper.elf" : "klipper.bin"));
    const image = await readFirmware(firmware, own?.flash_size ?? null, expectedMcuType, section);
    // The host MCU program makes its own pty (/tmp/klipper_host_mcu) while it runs; moonflash never opens it.
    const deviceRealPath = serial && !linuxHost ? await checkDevicePath(serial) : null;

    const target: FlashTarget = {
      mcu: section,
      ...(serial ? { device: serial } : {}),
      ...(canbusUuid && !serial ? { canbusUuid } : {}),
      canbusInterface,
      baud,
      firmwarePath: firmware,
      ...(expectedMcuType ? { expectedMcuType } : {}),
      bootloader: own?.bootloader ?? MCU_DEFAULTS.bootloader,
      klipperPath: this.config.moonflash.klipper_path,
      ...(own?.kconfig ? { kconfig: resolveKconfig(own.kconfig, this.config.dataDir) } : {}),
      ...(own?.out_dir ? { outDir: own.out_dir } : {}),
      wchispTransport: own?.wchisp_transport ?? MCU_DEFAULTS.wchisp_transport,
      ...(own?.linux_mcu_path ? { linuxMcuPath: own.linux_mcu_path } : {}),
      ...(own?.linux_mcu_service ? { linuxMcuService: own.linux_mcu_service } : {}),
      timeoutMs: (own?.timeout ?? MCU_DEFAULTS.timeout) * 1000,
      flashSize: own?.flash_size ?? null,
    };

    const usable: FlashMethodName[] = [];
    const skipped: FlashPlan["skipped"] = [];
    let reportedError: MoonflashError | null = null;
    for (const method of methods) {
      try {
        // Klipper's Linux host MCU is a process on this machine: its program is installed (method linux, or `make
        // flash`, which runs scripts/flash-linux.sh with sudo); there is no serial bootloader to talk to.
        if (linuxHost && method !== "linux" && method !== "make") {
          throw new MoonflashError(
            "METHOD_NOT_APPLICABLE",
            `[${section}] is Klipper's Linux host MCU: ${method} cannot flash it. Use method: linux (or make, which runs scripts/flash-linux.sh with sudo).`,
            { mcu: section, method, mcuType: expectedMcuType },
          );
        }
        await this.flashers[method].preflight(target);
        usable.push(method);
      } catch (err) {
        const error = toMoonflashError(err);
        // "Not applicable" only says why a method was dropped; another method's own failure says what to fix.
        if (!reportedError || (reportedError.code === "METHOD_NOT_APPLICABLE" && error.code !== "METHOD_NOT_APPLICABLE")) reportedError = error;
        skipped.push({ method, code: error.code, message: error.message });
        log("warn", `${method} skipped: ${error.message}`);
      }
    }
    if (usable.length === 0 && reportedError) {
      throw new MoonflashError(reportedError.code, reportedError.message, { ...reportedError.details, skipped }, { cause: reportedError });
    }

    const plan: FlashPlan = {
      mcu: section,
      device: serial ?? `${canbusInterface}:${canbusUuid}`,
      device_real_path: deviceRealPath,
      firmware,
      firmware_bytes: image.length,
      methods: usable,
      skipped,
      expected_mcu_type: expectedMcuType,
      target,
    };
    // The bytes stay beside the plan, not in it: a plan is JSON (dry run, logs).
    return { plan, image };
  }

  /**
   * A durable copy of what is about to be flashed, written while Klipper still runs (a full disk stops the job
   * here). It becomes an entry of the firmware store only once the board holds it (recordImage).
   */
  private async keepImage(plan: FlashPlan, image: Buffer): Promise<void> {
    await this.store.stage(plan.mcu, image);
  }

  /** The board holds `image` now: the newest store entry. Never fails the flash; a failure is a warning. */
  private async recordImage(plan: FlashPlan, image: Buffer, ctx: JobContext, rollback?: StoredImage, record?: Pick<ImageMeta, "source" | "sourcePath">): Promise<void> {
    try {
      await this.store.add(plan.mcu, image, rollback ? { source: "rollback", sourcePath: rollback.source_path } : (record ?? { source: "flash", sourcePath: plan.firmware }));
    } catch (err) {
      ctx.log("warn", `the board was flashed, but moonflash could not record the image for a later rollback: ${toMoonflashError(err).message}`);
    }
  }
}
