// Update every MCU in one go, with one short Klipper stop: after a Klipper update every board needs the firmware of
// the new version. Check which MCUs are outdated (or take the ones asked for), build them all while Klipper keeps
// running, then stop Klipper once, flash in an order that never cuts a board off from the host (CAN nodes before
// the USB-to-CAN bridge they hang off, then USB, then UART, the Linux host MCU last), start Klipper once, wait for
// it, and check that every MCU now reports the host's version.

import { stat } from "node:fs/promises";
import { join } from "node:path";
import type { JobBoard, JobContext } from "../core/events.js";
import type { JobRunner } from "../core/jobs.js";
import { MoonflashError, toMoonflashError, type ErrorCode } from "../core/errors.js";
import type { PrinterPort, PrinterState } from "../core/printer.js";
import type { FirmwareBuild, FirmwareBuilder } from "./build/builder.js";
import { MCU_DEFAULTS } from "./config.js";
import { identifyDevice } from "./discovery.js";
import { BACKUP_ERASED_RUN } from "./katapult/flasher.js";
import { mcuSectionName, type FlashEngine, type FlashPlan } from "./engine.js";
import { assertNotPrinting, waitForPrinter } from "./guard.js";
import { mcuUserName } from "./mcu-name.js";
import type { FlashMethodName } from "./types.js";
import type { VersionCheck } from "./versions.js";

export interface UpdateAllParams {
  /** MCU names (as FLASH_MCU takes them); default: the outdated ones. */
  mcus?: string[];
  /** Update the named (or all configured) MCUs even when their version matches. */
  force?: boolean;
  dry_run?: boolean;
}

/** Where an MCU is in the flash order, and why. */
export type Transport = "can" | "usb-can-bridge" | "usb" | "uart" | "linux";
const ORDER: readonly Transport[] = ["can", "usb-can-bridge", "usb", "uart", "linux"];

export interface PlannedMcu {
  mcu: string;
  name: string;
  why: "outdated" | "requested" | "forced";
  version_before: string | null;
  transport: Transport;
  profile: string;
  /**
   * backup_before_flash (on for update-all): moonflash keeps no image of this board yet, so Katapult reads its
   * current application back before writing, and what that adds to Klipper's downtime (estimated).
   */
  backup: { read_back: boolean; estimated_ms?: number; estimate_basis?: string };
}

export interface McuOutcome {
  mcu: string;
  name: string;
  built: boolean;
  build_skipped?: boolean;
  build_ms?: number;
  flashed: boolean;
  method?: FlashMethodName;
  verified?: boolean;
  flash_ms?: number;
  /** The board's previous application was read back and kept (a rollback can flash it). */
  backed_up?: boolean;
  version_before: string | null;
  version_now?: string | null;
  code?: ErrorCode;
  message?: string;
}

export interface UpdateAllResult {
  dry_run?: true;
  host_version: string | null;
  plan: PlannedMcu[];
  mcus: McuOutcome[];
  /** Klipper stopped → Klipper ready (or in error) again; null when Klipper was not stopped. */
  downtime_ms: number | null;
  phases_ms: { check: number; build: number; flash: number; start: number };
  klipper_state: string;
  /** MCUs whose version still differs from the host's after the update. */
  still_outdated: string[];
}

/** backup_before_flash defaults to on for update-all (a flash of one board: off). */
const BACKUP_BY_DEFAULT = true;

export interface UpdateAllDeps {
  engine: FlashEngine;
  builder: FirmwareBuilder;
  printer: PrinterPort;
  runner: JobRunner;
  /** How long to wait for Klipper after the start; the service_timeout. */
  readyTimeoutMs: number;
  discovery?: { devRoot?: string; sysRoot?: string };
}

/** The job target update-all runs under (console: "moonflash: flash all MCUs: …"). */
export const UPDATE_ALL_TARGET = "all MCUs";

export class McuUpdater {
  constructor(private readonly deps: UpdateAllDeps) {}

  run(params: UpdateAllParams): Promise<UpdateAllResult> {
    return this.deps.runner.run({ kind: "flash", target: UPDATE_ALL_TARGET, params }, (ctx) => this.job(params, ctx));
  }

  private async job(params: UpdateAllParams, ctx: JobContext): Promise<UpdateAllResult> {
    const { engine, builder, printer } = this.deps;
    const t0 = performance.now();
    assertNotPrinting(printer);
    ctx.stage("check", "checking which MCUs need new firmware");
    const versions = await engine.checkVersions();
    const plan = await this.plan(params, versions);
    const phases = { check: Math.round(performance.now() - t0), build: 0, flash: 0, start: 0 };
    const result: UpdateAllResult = {
      host_version: versions.host.version,
      plan,
      mcus: plan.map((p) => ({ mcu: p.mcu, name: p.name, built: false, flashed: false, version_before: p.version_before })),
      downtime_ms: null,
      phases_ms: phases,
      klipper_state: printer.state().klippyState,
      still_outdated: [],
    };
    if (params.dry_run) return { dry_run: true, ...result };
    if (plan.length === 0) {
      ctx.log("info", `every MCU already runs ${versions.host.version ?? "the host's version"}: nothing to update`);
      return result;
    }
    const outcome = (mcu: string): McuOutcome => result.mcus.find((m) => m.mcu === mcu)!;

    // Build everything while Klipper keeps running (builds touch no port), then pre-flight each board.
    const tBuild = performance.now();
    const ready: Array<{ planned: PlannedMcu; flash: FlashPlan; image: Buffer; build: FirmwareBuild }> = [];
    for (const [index, planned] of plan.entries()) {
      const o = outcome(planned.mcu);
      const board: JobBoard = { name: planned.name, index: index + 1, count: plan.length };
      try {
        ctx.stage("build", `building the firmware of ${planned.name}`, board);
        const build = await builder.buildWithin(ctx, planned.mcu);
        Object.assign(o, { built: true, build_skipped: build.skipped, build_ms: build.elapsedMs });
        const { plan: flash, image } = await engine.prepare({ mcu: planned.mcu, firmware: build.image }, ctx);
        ready.push({ planned, flash, image, build });
      } catch (err) {
        fail(o, err);
        ctx.log("error", `${planned.name}: ${o.message}`, board);
      }
    }
    phases.build = Math.round(performance.now() - tBuild);
    if (ready.length === 0) return finish(result, ctx);

    // One stop, every board in order, one start. A board's failure is recorded and the next board still goes:
    // the printer cannot run with any of them outdated, and none is left half done (each method finishes or fails).
    assertNotPrinting(printer);
    let stoppedAt: number | null = null;
    const tFlash = performance.now();
    // If stopping or starting Klipper fails, the guard has done all it can and its error says so.
    const guarded = await engine.withKlipperStopped(ctx, UPDATE_ALL_TARGET, async (inner) => {
      stoppedAt = performance.now();
      for (const [index, { planned, flash, image }] of ready.entries()) {
        const o = outcome(planned.mcu);
        const board: JobBoard = { name: planned.name, index: index + 1, count: ready.length };
        const started = performance.now();
        try {
          inner.stage("flash", `flashing ${board.name} (${board.index} of ${board.count})`, board);
          const done = await engine.flashPrepared(flash, image, inner, { backup: planned.backup.read_back });
          Object.assign(o, { flashed: true, method: done.method, verified: done.outcome.verified, ...(done.backed_up ? { backed_up: true } : {}) });
        } catch (err) {
          fail(o, err);
          inner.log("error", `${planned.name}: ${o.message}`, board);
        }
        o.flash_ms = Math.round(performance.now() - started);
      }
      phases.flash = Math.round(performance.now() - tFlash);
    });

    // Klipper runs again (the guard waited for its service); wait for it to leave startup, then check versions.
    const tStart = performance.now();
    // Klipper left startup: ready, or an error it reports itself (e.g. an MCU still outdated).
    await waitForPrinter(printer, klipperSettled, this.deps.readyTimeoutMs);
    phases.start = Math.round(performance.now() - tStart);
    if (stoppedAt !== null && guarded.klipperRestart?.ok !== false) result.downtime_ms = Math.round(performance.now() - stoppedAt);
    const after = await engine.checkVersions();
    result.klipper_state = printer.state().klippyState;
    for (const o of result.mcus) o.version_now = after.mcus.find((m) => m.mcu === o.mcu)?.version ?? null;
    result.still_outdated = after.mcus.filter((m) => m.outdated && result.mcus.some((o) => o.mcu === m.mcu)).map((m) => mcuUserName(m.mcu));
    return finish(result, ctx);
  }

  /** Which MCUs, why, and in which order. */
  private async plan(params: UpdateAllParams, versions: VersionCheck): Promise<PlannedMcu[]> {
    const configured = this.deps.builder.configuredMcus().map(mcuSectionName);
    const requested = params.mcus?.map(mcuSectionName);
    let chosen: Array<{ mcu: string; why: PlannedMcu["why"] }>;
    if (requested && requested.length > 0) {
      chosen = requested.map((mcu) => ({ mcu, why: params.force ? "forced" : "requested" }));
    } else if (params.force) {
      chosen = configured.map((mcu) => ({ mcu, why: "forced" }));
    } else {
      chosen = versions.mcus.filter((m) => m.outdated).map((m) => ({ mcu: m.mcu, why: "outdated" }));
    }
    const planned: PlannedMcu[] = [];
    for (const { mcu, why } of chosen) {
      if (planned.some((p) => p.mcu === mcu)) continue;
      const known = versions.mcus.find((m) => m.mcu === mcu);
      const transport = await this.transport(mcu);
      planned.push({
        mcu,
        name: mcuUserName(mcu),
        why,
        version_before: known?.version ?? null,
        transport,
        profile: this.deps.builder.profile(mcu).path,
        backup: (await this.deps.engine.backupPlanned(mcu, BACKUP_BY_DEFAULT)) ? await this.backupEstimate(mcu, transport) : { read_back: false },
      });
    }
    return planned.sort((a, b) => ORDER.indexOf(a.transport) - ORDER.indexOf(b.transport));
  }

  /**
   * What reading the old application back adds to the downtime: one REQUEST_BLOCK exchange per 64-byte block, about
   * the size of the last build (else a typical 64 KiB Klipper image) plus the erased run that ends the read. A UART
   * carries the 80-byte reply at baud/10 bytes a second (the request overlaps it); USB takes about 1 ms an exchange.
   */
  private async backupEstimate(mcu: string, transport: Transport): Promise<PlannedMcu["backup"]> {
    const lastBuild = await stat(join(this.deps.builder.outDir(mcu), "klipper.bin")).then((s) => s.size, () => null);
    const bytes = (lastBuild ?? 64 * 1024) + BACKUP_ERASED_RUN;
    const blocks = Math.ceil(bytes / 64);
    const baud = (await this.deps.engine.mcuConnection(mcu)).baud ?? MCU_DEFAULTS.baud;
    const perBlockMs = transport === "uart" ? (80 * 10 * 1000) / baud : 1;
    return {
      read_back: true,
      estimated_ms: Math.round(blocks * perBlockMs),
      estimate_basis: `${lastBuild === null ? "a typical 64 KiB application" : `the last build's ${lastBuild} bytes`}${transport === "uart" ? ` at ${baud} baud` : " over USB"}`,
    };
  }

  private async transport(mcu: string): Promise<Transport> {
    const connection = await this.deps.engine.mcuConnection(mcu);
    if (connection.mcuType?.toLowerCase() === "linux") return "linux";
    if (connection.canbusUuid) return "can";
    if (!connection.serial) return "uart";
    const device = await identifyDevice(connection.serial, this.deps.discovery ?? {});
    if (device?.kind === "usb-can-bridge") return "usb-can-bridge";
    return device?.vendorId ? "usb" : "uart";
  }
}

function fail(o: McuOutcome, err: unknown): void {
  const e = toMoonflashError(err);
  o.code = e.code;
  o.message = e.message;
}

/** The job's outcome: ok when every planned MCU was flashed and reports the host's version; else the first failure. */
function finish(result: UpdateAllResult, ctx: JobContext): UpdateAllResult {
  const failed = result.mcus.find((m) => m.code);
  if (failed) {
    const others = result.mcus.filter((m) => m !== failed && m.code).length;
    throw new MoonflashError(
      failed.code!,
      `${failed.name}: ${failed.message}${others ? ` (and ${others} more MCU${others > 1 ? "s" : ""} failed; see the result)` : ""}`,
      { result },
    );
  }
  if (result.still_outdated.length > 0) {
    throw new MoonflashError(
      "VERSION_MISMATCH",
      `Flashed, but ${result.still_outdated.join(", ")} still report${result.still_outdated.length > 1 ? "" : "s"} another version than Klipper (${result.host_version}). ` +
        "Rebuild with the Klipper tree Klipper runs from (a dirty or moved tree gives another version) and update again.",
      { result },
    );
  }
  ctx.log("info", `updated ${result.mcus.map((m) => m.name).join(", ")}`);
  return result;
}

function klipperSettled(state: PrinterState): boolean {
  return state.klippyConnected && ["ready", "error", "shutdown"].includes(state.klippyState);
}
