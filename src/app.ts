// The composition root: `serve` and every CLI verb build their runtime here, and only here. Config, logger,
// job runner, the Moonraker endpoint and session, the engines; and how errors become exit codes. Everything
// else receives what it needs (ports and engines) and builds nothing of its own.

import { readFile } from "node:fs/promises";
import type { Logger } from "pino";
import { loadConfig, type MoonflashConfig } from "./moonflash-conf.js";
import { MoonflashError, toMoonflashError } from "./core/errors.js";
import { writeFileDurable } from "./core/durable.js";
import type { JobContext } from "./core/events.js";
import { JobRunner } from "./core/jobs.js";
import { createLogger } from "./core/log.js";
import type { PrinterPort } from "./core/printer.js";
import { MCU_DEFAULTS, type FlashSettings, type McuConfig } from "./flash/config.js";
import { FlashEngine, mcuSectionName } from "./flash/engine.js";
import type { ImageMeta } from "./flash/firmware-store.js";
import { mcuUserName } from "./flash/mcu-name.js";
import type { OtaEngine, FirmwarePort } from "./ota/engine.js";
import { otaPaths } from "./ota/paths.js";
import { FirmwareBuilder } from "./flash/build/builder.js";
import { McuUpdater } from "./flash/update-all.js";
import { AgentSession, type AgentSessionOptions } from "./moonraker/session.js";
import { describeEndpoint, type MoonrakerEndpoint } from "./moonraker/transport.js";
import { Agent } from "./agent/agent.js";
import { AGENT_NAME, PROJECT_URL, VERSION } from "./version.js";

export interface RuntimeOptions {
  dataDir: string;
  configFile?: string;
  /** Pretty log lines on stdout as well as the log file (the service on a terminal). */
  pretty?: boolean;
  /** A logger to use instead of the configured one (tests). */
  logger?: Logger;
}

/** What every moonflash process has: its configuration, logger, job runner, and where Moonraker is. */
export interface Runtime {
  config: MoonflashConfig;
  logger: Logger;
  runner: JobRunner;
  endpoint: MoonrakerEndpoint;
  /** The endpoint for people: "unix:/home/pi/printer_data/comms/moonraker.sock" or the websocket URL. */
  endpointName: string;
  /** Adapters that report outside the process ([ota] callback_url): each waits up to timeoutMs for its queue. */
  drains: Array<(timeoutMs: number) => Promise<void>>;
}

/** How long a process that ends waits for its reports to be delivered. */
export const REPORT_DRAIN_MS = 5000;

export async function createRuntime(opts: RuntimeOptions): Promise<Runtime> {
  const config = await loadConfig(opts.dataDir, opts.configFile);
  const logger = opts.logger ?? createLogger({ dataDir: config.dataDir, level: config.moonflash.log_level, pretty: opts.pretty ?? false });
  const m = config.moonflash;
  const endpoint: MoonrakerEndpoint = m.moonraker_url
    ? { kind: "ws", url: m.moonraker_url, ...(m.api_key ? { apiKey: m.api_key } : {}) }
    : { kind: "unix", path: m.moonraker_socket };
  return { config, logger, runner: new JobRunner({ dataDir: config.dataDir, logger }), endpoint, endpointName: describeEndpoint(endpoint), drains: [] };
}

type SessionRole = Pick<AgentSessionOptions, "clientName" | "methods" | "onCall" | "backoff">;

export function createSession(rt: Runtime, role: SessionRole): AgentSession {
  return new AgentSession({ ...role, endpoint: rt.endpoint, version: VERSION, url: PROJECT_URL, logger: rt.logger.child({ ns: "moonraker" }) });
}

export function createFlashEngine(rt: Runtime, printer: PrinterPort, config: FlashSettings = rt.config): FlashEngine {
  return new FlashEngine({ config, printer, runner: rt.runner, logger: rt.logger.child({ ns: "flash" }) });
}

/**
 * The OTA engine, flashing firmware modules through `flash` (flashFirmwarePort). Its code is loaded here, on first
 * use: an agent on a printer where OTA never ran does not carry it (docs/BENCHMARKS.md).
 */
export async function createOtaEngine(rt: Runtime, printer: PrinterPort, flash: FlashEngine): Promise<OtaEngine> {
  const [{ OtaEngine }, { CallbackReporter }] = await Promise.all([import("./ota/engine.js"), import("./ota/callback-report.js")]);
  const engine = new OtaEngine({
    dataDir: rt.config.dataDir,
    config: rt.config.ota,
    printer,
    runner: rt.runner,
    logger: rt.logger,
    firmware: flashFirmwarePort(rt, printer, flash),
    serviceTimeoutMs: rt.config.moonflash.service_timeout * 1000,
  });
  rt.logger.info("OTA engine loaded");
  const url = rt.config.ota.callback_url;
  if (url) {
    const reporter = new CallbackReporter({ url, logger: rt.logger.child({ ns: "ota-report" }), status: () => engine.status(), userAgent: `moonflash/${VERSION}` });
    rt.runner.on(reporter.onJobEvent);
    // A process that ends gives its reports a last chance, then stops retrying so that it can exit.
    rt.drains.push(async (timeoutMs) => {
      await reporter.flush(timeoutMs);
      reporter.close();
    });
  }
  return engine;
}

/** An MCU's device as Klipper's config gave it, remembered for a flash while Klipper is stopped. */
interface RememberedDevice {
  serial?: string;
  canbusUuid?: string;
  canbusInterface?: string;
  baud?: number;
  mcuType?: string;
  /** When Klipper's config said so. */
  at: string;
}

/**
 * How OTA flashes a firmware module: the flash engine's pre-flight and method chain (prepare, then flashPrepared)
 * run inside the OTA job. The OTA engine holds the job lock and has stopped Klipper itself before it calls this
 * port, so engine.flash (which takes the lock, and stops Klipper in its guard) is not used: it would answer BUSY.
 *
 * With Klipper stopped, Klipper's config cannot be read, so an MCU that only printer.cfg places (no serial: or
 * canbus_uuid: in moonflash.conf) would have no device. Its device is remembered while Klipper runs: currentImage is
 * asked while taking the backup, before the deploy stops anything, and the devices are kept in
 * <data>/moonflash/ota/mcu-devices.json for a rollback after a restart (recovery, a later ota.rollback).
 *
 * currentImage is the firmware store's newest entry (what the board holds, as far as moonflash knows). A board the
 * store has no image of is read back first, as update-all does (backup_before_flash, on by default here), so the
 * update can be rolled back.
 */
export function flashFirmwarePort(rt: Runtime, printer: PrinterPort, flash: FlashEngine): FirmwarePort {
  const file = otaPaths(rt.config.dataDir).mcuDevices;
  const logger = rt.logger.child({ ns: "ota-firmware" });
  let devices: Record<string, RememberedDevice> | null = null;

  const known = async (): Promise<Record<string, RememberedDevice>> => {
    if (devices) return devices;
    try {
      const parsed: unknown = JSON.parse(await readFile(file, "utf8"));
      devices = parsed !== null && typeof parsed === "object" && !Array.isArray(parsed) ? (parsed as Record<string, RememberedDevice>) : {};
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") logger.warn({ err, file }, "the remembered MCU devices are unreadable; starting afresh");
      devices = {};
    }
    return devices;
  };

  /** Keeps the section's device as Klipper's config gives it now (only while Klipper runs). */
  const remember = async (section: string): Promise<void> => {
    if (!printer.state().klippyConnected) return;
    try {
      const c = await flash.mcuConnection(section);
      if (!c.sources.includes("klipper") || (!c.serial && !c.canbusUuid)) return;
      const device: RememberedDevice = {
        ...(c.serial ? { serial: c.serial } : { canbusUuid: c.canbusUuid!, canbusInterface: c.canbusInterface ?? MCU_DEFAULTS.canbus_interface }),
        ...(c.baud ? { baud: c.baud } : {}),
        ...(c.mcuType ? { mcuType: c.mcuType } : {}),
        at: new Date().toISOString(),
      };
      const all = await known();
      const { at: _before, ...was } = all[section] ?? { at: "" };
      const { at: _now, ...now } = device;
      if (JSON.stringify(was) === JSON.stringify(now)) return;
      all[section] = device;
      await writeFileDurable(file, `${JSON.stringify(all, null, 2)}\n`);
    } catch (err) {
      logger.warn({ err, mcu: section }, "could not remember the MCU's device from Klipper's config");
    }
  };

  /** The flash engine to flash `section` with: the agent's, or one that knows the remembered device. */
  const engineFor = async (section: string, job: JobContext): Promise<FlashEngine> => {
    const own = rt.config.mcus[section];
    if (own?.serial || own?.canbus_uuid) return flash;
    if (printer.state().klippyConnected) {
      await remember(section);
      return flash;
    }
    const device = (await known())[section];
    // Without one the engine's own pre-flight says what is missing.
    if (!device?.serial && !device?.canbusUuid) return flash;
    job.log("info", `Klipper is stopped: ${mcuUserName(section)} is flashed on ${device.serial ?? `${device.canbusInterface}:${device.canbusUuid}`}, as Klipper's config gave it (${device.at})`);
    const mcu: McuConfig = {
      ...MCU_DEFAULTS,
      ...own,
      section,
      serial: device.serial ?? null,
      canbus_uuid: device.serial ? null : (device.canbusUuid ?? null),
      canbus_interface: device.canbusInterface ?? own?.canbus_interface ?? MCU_DEFAULTS.canbus_interface,
      baud: device.baud ?? own?.baud ?? MCU_DEFAULTS.baud,
      mcu_type: own?.mcu_type ?? device.mcuType ?? null,
    };
    return createFlashEngine(rt, printer, { ...rt.config, mcus: { ...rt.config.mcus, [section]: mcu } });
  };

  /** `record`: how the store lists the image afterwards (the staging path is gone once the update is done). */
  const flashImage = async (mcu: string, imagePath: string, job: JobContext | undefined, record: Pick<ImageMeta, "source" | "sourcePath">) => {
    if (!job) throw new MoonflashError("INTERNAL", "an OTA firmware flash runs inside the OTA job");
    const engine = await engineFor(mcuSectionName(mcu), job);
    const { plan, image } = await engine.prepare({ mcu, firmware: imagePath }, job);
    const backup = await engine.backupPlanned(plan.mcu, true);
    const done = await engine.flashPrepared(plan, image, job, { backup, record });
    return { mcu: plan.mcu, device: done.outcome.device, method: done.method, bytes: done.outcome.bytes, verified: done.outcome.verified, attempts: done.attempts, backed_up: done.backed_up };
  };

  return {
    async currentImage(mcu) {
      const section = mcuSectionName(mcu);
      await remember(section);
      const [newest] = await flash.store.list(section);
      return newest && !newest.damaged ? { path: newest.file, sha256: newest.sha256 } : null;
    },
    flash: (mcu, imagePath, job, purpose) => flashImage(mcu, imagePath, job, { source: purpose === "rollback" ? "rollback" : "ota", sourcePath: null }),
    async rollback(mcu, job) {
      const section = mcuSectionName(mcu);
      const [, previous] = await flash.store.list(section);
      if (!previous || previous.damaged) {
        throw new MoonflashError(
          "NO_ROLLBACK_IMAGE",
          `moonflash keeps no ${previous ? "undamaged " : ""}image ${mcuUserName(section)} ran before the update, so its firmware cannot be put back. Flash a firmware file: FLASH_MCU MCU=${mcuUserName(section)} FIRMWARE=…`,
          { mcu: section },
        );
      }
      return flashImage(mcu, previous.file, job, { source: "rollback", sourcePath: previous.source_path });
    },
  };
}

/** Builds firmware per MCU from its profile; needs no printer: a build never stops Klipper. */
export function createFirmwareBuilder(rt: Runtime): FirmwareBuilder {
  return new FirmwareBuilder({ settings: rt.config, runner: rt.runner, logger: rt.logger.child({ ns: "build" }) });
}

/** Update-all over an engine, a builder and the printer they share. */
export function createMcuUpdater(rt: Runtime, engine: FlashEngine, builder: FirmwareBuilder, printer: PrinterPort): McuUpdater {
  return new McuUpdater({ engine, builder, printer, runner: rt.runner, readyTimeoutMs: rt.config.moonflash.service_timeout * 1000 });
}

/** The service: the agent with its session and engines. */
export async function createAgent(opts: RuntimeOptions): Promise<Agent> {
  const rt = await createRuntime(opts);
  const builder = createFirmwareBuilder(rt);
  return new Agent(rt, {
    session: (methods, onCall) => createSession(rt, { clientName: AGENT_NAME, methods, onCall }),
    flash: (printer) => createFlashEngine(rt, printer),
    build: () => builder,
    update: (engine, printer) => createMcuUpdater(rt, engine, builder, printer),
    ota: (printer, flash) => createOtaEngine(rt, printer, flash),
  });
}

/** A short-lived session for one CLI run (no remote methods); resolves once identified, else MOONRAKER_UNAVAILABLE. */
export async function connectPrinter(rt: Runtime, timeoutMs: number): Promise<AgentSession> {
  const session = createSession(rt, {
    clientName: `${AGENT_NAME}-cli-${process.pid}`,
    methods: [],
    onCall: async () => {
      throw new MoonflashError("INVALID_PARAMS", "the moonflash CLI serves no remote methods");
    },
    backoff: { initialMs: 200, maxMs: 1000 },
  });
  session.start();
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(
          new MoonflashError(
            "MOONRAKER_UNAVAILABLE",
            `Could not reach Moonraker at ${rt.endpointName} within ${timeoutMs / 1000} s. Is Moonraker running? Check moonraker_socket / moonraker_url in moonflash.conf.`,
          ),
        );
      }, timeoutMs);
      session.on("identified", () => {
        clearTimeout(timer);
        resolve();
      });
    });
  } catch (err) {
    await session.stop();
    throw err;
  }
  return session;
}

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/** The one mapping of errors to exit codes: 2 for what the user typed or configured, 1 for everything else. */
export function exitCodeFor(err: unknown): number {
  const code = toMoonflashError(err).code;
  return code === "INVALID_PARAMS" || code === "CONFIG_INVALID" ? EXIT_USAGE : EXIT_FAILURE;
}
