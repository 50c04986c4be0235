// The one table of remote methods. Each is declared once — name, params schema, handler, description — and
// serves both paths: Klipper macros (action_call_remote_method, fire-and-forget) and clients
// (server.extensions.request, request/response). The agent derives registration, dispatch and help from it.

import * as z from "zod/mini";
import "../core/zod.js";
import { MoonflashError } from "../core/errors.js";
import type { JobRunner } from "../core/jobs.js";
import type { JobKind } from "../core/events.js";
import type { JobRecord } from "../core/history.js";
import type { FlashEngine } from "../flash/engine.js";
import type { FirmwareBuilder } from "../flash/build/builder.js";
import type { McuUpdater } from "../flash/update-all.js";
import type { DownloadParams, OtaEngine, OtaStatus, PackageSummary } from "../ota/engine.js";
import { otaDownloadParams } from "../ota/download-params.js";
import { FLASH_METHODS } from "../flash/types.js";
import { mcuUserName } from "../flash/mcu-name.js";
import { versionSummary } from "../flash/versions.js";
import { clientDialect, flag, type ParamDialect } from "./params.js";
import { updatePlanDialog, type PromptDialog } from "./progress.js";

export interface RemoteMethod {
  name: string;
  description: string;
  params: z.ZodMiniType;
  handler(params: never): Promise<unknown>;
  /** One console line for a macro caller, from the handler's result. */
  summary?(result: never): string;
  /** A dialog for a macro caller (Mainsail and Fluidd open it), from the handler's result; null for none. */
  dialog?(result: never): PromptDialog | null;
  /** The shipped macro that calls it (moonraker/moonflash.cfg) and what its parameters are called there. */
  macro?: { command: string; params?: Record<string, string> };
}

/** Errors for a macro caller name the macro and its parameters as typed (FLASH_MCU, DRY_RUN=). */
export function macroDialect(method: RemoteMethod): ParamDialect {
  if (!method.macro) return clientDialect(method.name);
  const { command, params = {} } = method.macro;
  return { method: command, param: (key) => params[key] ?? key.toUpperCase() };
}

export interface MethodDeps {
  runner: JobRunner;
  /** A getter, because the engine is built after the table (it needs the session, which needs the names). */
  flash: () => FlashEngine;
  /** The firmware builder (flash.build); absent where nothing builds. */
  build?: () => FirmwareBuilder;
  /** Update-all (flash.update_all); absent where nothing builds. */
  update?: () => McuUpdater;
  /** The OTA engine (ota.*), loaded on the first call. */
  ota?: () => Promise<OtaEngine>;
  /** agent.info's content; built by the agent, which knows the session and config. */
  info(): Record<string, unknown>;
  /** A job that ended without confirming Klipper runs again: the agent keeps starting it (the journal says so). */
  pendingKlipperStart?(): Promise<{ jobId: string; service: string } | null>;
}

const noParams = z.strictObject({});

function define<S extends z.ZodMiniType, R>(m: {
  name: string;
  description: string;
  params: S;
  handler: (params: z.infer<S>) => Promise<R>;
  summary?: (result: R) => string;
  dialog?: (result: R) => PromptDialog | null;
  macro?: RemoteMethod["macro"];
}): RemoteMethod {
  return m as unknown as RemoteMethod;
}

async function jobStatus(deps: MethodDeps, kind: JobKind) {
  const current = deps.runner.current();
  return {
    current: current && current.kind === kind ? current : null,
    // A job of the other kind also blocks this one (one job at a time); say so instead of hiding it.
    other: current && current.kind !== kind ? { id: current.id, kind: current.kind, target: current.target } : null,
    last: deps.runner.history(kind, 10),
    klipper_start_pending: current ? null : ((await deps.pendingKlipperStart?.()) ?? null),
  };
}

function jobTarget(kind: JobKind, target: string): string {
  return kind === "flash" ? mcuUserName(target) : target;
}

function ago(iso: string, now = Date.now()): string {
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 48 * 3600) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} days ago`;
}

// Console lines name the MCU and the outcome; job ids stay in the JSON result and the logs, where they are useful.
function describeStatus(kind: JobKind, status: Awaited<ReturnType<typeof jobStatus>>): string {
  const c = status.current;
  if (c) {
    const pct = c.progress && c.progress.total > 0 ? ` ${Math.floor((100 * c.progress.done) / c.progress.total)}%` : "";
    return `moonflash: ${kind} of ${jobTarget(kind, c.target)} running: ${c.stage}${pct}`;
  }
  const last: JobRecord | undefined = status.last[0];
  if (!last) return `moonflash: no ${kind} job has run yet`;
  const dryRun = (last.params as { dry_run?: unknown } | undefined)?.dry_run === true ? " (dry run)" : "";
  const outcome = last.ok ? "ok" : `failed [${last.code}] ${last.message}`;
  const pending = status.klipper_start_pending
    ? ` ${status.klipper_start_pending.service} is still to be started: moonflash keeps trying.`
    : "";
  return `moonflash: idle. Last ${kind} of ${jobTarget(kind, last.target)}${dryRun}: ${outcome} (${ago(last.finishedAt)}).${pending}`;
}

/** INVALID_PARAMS for flash.mcu without mcu, naming the MCUs as FLASH_MCU's MCU= takes them. */
async function mcuMissing(flash: FlashEngine): Promise<MoonflashError> {
  const known = (await flash.devices()).mcus.map((m) => mcuUserName(m.section));
  const example = known.find((name) => name !== "mcu") ?? known[0];
  const list = example === undefined
    ? "No MCU is known: start Klipper, or add an [mcu NAME] section to moonflash.conf."
    : `Known MCUs: ${known.join(", ")} (e.g. FLASH_MCU MCU=${example})`;
  return new MoonflashError("INVALID_PARAMS", `FLASH_MCU needs MCU=<name>. ${list}`, { method: "flash.mcu", missing: "mcu", known });
}

/** INVALID_PARAMS for flash.rollback without mcu, naming the MCUs moonflash has an earlier image of. */
async function rollbackMcuMissing(flash: FlashEngine): Promise<MoonflashError> {
  const candidates: string[] = [];
  for (const section of await flash.store.mcus()) {
    if ((await flash.store.list(section)).length > 1) candidates.push(mcuUserName(section));
  }
  const list = candidates.length
    ? `MCUs with an earlier image: ${candidates.join(", ")} (e.g. FLASH_ROLLBACK MCU=${candidates[0]})`
    : "moonflash has no earlier image of any MCU yet: it keeps the last 3 images it flashes to each.";
  return new MoonflashError("INVALID_PARAMS", `FLASH_ROLLBACK needs MCU=<name>. ${list}`, { method: "flash.rollback", missing: "mcu", candidates });
}

/** The OTA engine, or INTERNAL where this process runs none (a table built for docs or tests). */
async function otaEngine(deps: MethodDeps): Promise<OtaEngine> {
  if (!deps.ota) throw new MoonflashError("INTERNAL", "This moonflash process runs no OTA engine.");
  return deps.ota();
}

export type OtaStatusResult = OtaStatus & {
  /** A running job of another kind (a flash), which an OTA job would wait for: one job at a time. */
  other: { id: string; kind: JobKind; target: string } | null;
  /** The last 10 OTA jobs, newest first. */
  last: JobRecord[];
};

async function otaStatus(deps: MethodDeps): Promise<OtaStatusResult> {
  const engine = await otaEngine(deps);
  // From memory; the first call reads state.json once, in case no job and no recovery has run yet.
  await engine.load();
  const current = deps.runner.current();
  return {
    ...engine.status(),
    other: current && current.kind !== "ota" ? { id: current.id, kind: current.kind, target: current.target } : null,
    last: deps.runner.history("ota", 10),
  };
}

const packageName = (s: Pick<OtaStatus, "package" | "url">): string =>
  s.package?.name ? `${s.package.name}${s.package.version ? ` ${s.package.version}` : ""}` : (s.url ?? "the update");

/** Ends a sentence once: engine messages mostly end with their own period. */
const sentence = (text: string): string => (/[.!?]$/.test(text) ? text : `${text}.`);

/** OTA_STATUS's console line: what OTA is doing, or where the last update stands and what to do next. */
export function describeOta(s: OtaStatusResult): string {
  if (s.job) {
    const pct = s.percent === null ? "" : ` ${s.percent}%`;
    const eta = s.eta === null ? "" : `, ${s.eta} s left`;
    const module = s.module ? `, module ${s.module.id} (${s.module.index}/${s.module.count})` : "";
    return `moonflash: OTA ${s.state.replace("_", " ")} ${packageName(s)}: ${s.job.stage}${pct}${eta}${module}`;
  }
  const error = s.lastError ? ` [${s.lastError.code}] ${s.lastError.message}` : "";
  let line: string;
  switch (s.state) {
    case "idle":
      line = "moonflash: no OTA update has been downloaded yet. Download one with OTA_DOWNLOAD URL=<package url> MD5=<md5>.";
      break;
    case "downloading":
      line = `moonflash: the download of ${s.url ?? "the package"} stopped before it finished. OTA_DOWNLOAD with the same URL resumes it.`;
      break;
    case "downloaded":
      line = "moonflash: the OTA package is downloaded but not verified yet. OTA_INSTALL verifies it first.";
      break;
    case "verified":
      line = `moonflash: OTA package ${packageName(s)} is downloaded and verified. Install it with OTA_INSTALL.${error ? sentence(` The last try failed:${error}`) : ""}`;
      break;
    case "committed":
      line = `moonflash: ${packageName(s)} is installed. OTA_ROLLBACK restores what was there before it.`;
      break;
    case "rolled_back":
      line = `moonflash: ${packageName(s)} was rolled back${error ? sentence(` after${error}`) : " on request."} The previous version is in place.`;
      break;
    case "failed":
      line = sentence(`moonflash: the last OTA update failed${error}`);
      break;
    default:
      line = `moonflash: the update ${packageName(s)} was interrupted (${s.state.replace("_", " ")}). It is rolled back when the agent starts, or now with OTA_ROLLBACK.`;
  }
  const installed = s.installed && s.state !== "committed" ? ` Installed: ${s.installed.name} ${s.installed.version}.` : "";
  const other = s.other ? ` A ${s.other.kind} job on ${jobTarget(s.other.kind, s.other.target)} is running.` : "";
  return `${line}${installed}${other}`;
}

// ota.download's params live beside the OTA engine (the vendor HTTP API checks them too); re-exported for the CLI.
export { otaDownloadParams };

export function buildMethodTable(deps: MethodDeps): RemoteMethod[] {
  const { runner } = deps;
  // ota.download of the URL being downloaded joins that download instead of answering BUSY: a client that lost
  // its answer (or a second click on the macro) asks again, and an interrupted one resumes where it stopped.
  let download: { key: string; result: Promise<PackageSummary> } | null = null;
  const downloadKey = (p: DownloadParams) => JSON.stringify([p.url, p.md5.toLowerCase(), p.sha256?.toLowerCase() ?? null, p.size ?? null]);
  return [
    define({
      name: "agent.info",
      description: "Version, configuration summary and the Moonraker/Klipper state the agent sees.",
      params: noParams,
      handler: async () => deps.info(),
      summary: (info) => `moonflash ${String(info.version)}: Klipper ${String((info.klipper as Record<string, unknown>)?.state)}`,
    }),
    define({
      name: "flash.status",
      description: "The running flash job with its progress, and the last flash results.",
      params: noParams,
      handler: () => jobStatus(deps, "flash"),
      summary: (s) => describeStatus("flash", s),
      macro: { command: "FLASH_STATUS" },
    }),
    define({
      name: "flash.devices",
      description: "Serial devices and CAN nodes found, classified and mapped to Klipper's [mcu] sections.",
      params: noParams,
      handler: async () => deps.flash().devices(),
      macro: { command: "FLASH_DEVICES" },
      summary: (r) => {
        const serial = r.devices.map((d) => `${d.byId ?? d.path}${d.mcu ? ` → [${d.mcu}]` : ""}`).join(", ") || "none";
        const can = r.canbus.map((c) => (c.error ? `${c.interface}: ${c.error.message}` : `${c.interface}: ${c.nodes.map((n) => `${n.uuid} ${n.application}${n.mcu ? ` → [${n.mcu}]` : ""}`).join(", ") || "no unassigned nodes"}`));
        return `moonflash: ${r.devices.length} serial device(s): ${serial}${can.length ? `; CAN ${can.join("; ")}` : ""}`;
      },
    }),
    define({
      name: "flash.build",
      description: "Build firmware from each MCU's profile (make olddefconfig, make) at low priority, without stopping Klipper; a build with unchanged inputs is skipped.",
      params: z.strictObject({
        // Without it: every MCU of moonflash.conf that has a profile.
        mcu: z.optional(z.string({ error: "expected the MCU section name, e.g. \"mcu\" or \"toolhead\"" })),
        force: z.optional(flag),
      }),
      handler: async ({ mcu, force }) => {
        if (!deps.build) throw new MoonflashError("INTERNAL", "This moonflash process cannot build firmware.");
        const builder = deps.build();
        const opts = force === undefined ? {} : { force };
        if (mcu !== undefined && mcu.trim() !== "") return { builds: [await builder.build(mcu, opts)], failed: [], without_profile: [] };
        const { builds, failed, withoutProfile } = await builder.buildMany(undefined, opts);
        const first = failed[0];
        if (first) {
          throw new MoonflashError(first.code, `${failed.length} of ${failed.length + builds.length} builds failed; [${first.mcu}]: ${first.message}`, {
            ...first.details,
            builds,
            failed,
          });
        }
        return { builds, failed, without_profile: withoutProfile };
      },
    }),
    define({
      name: "flash.update_all",
      description: "Update MCUs to the host's Klipper version: build all while Klipper runs, then one Klipper stop, flash in order (CAN, bridge, USB, UART, Linux), one start, versions checked.",
      params: z.strictObject({
        // Without it: the MCUs whose firmware version differs from Klipper's.
        mcus: z.optional(z.pipe(
          z.union([z.string(), z.array(z.string())]),
          z.transform((v: string | string[]) => (Array.isArray(v) ? v : v.split(",")).map((s) => s.trim()).filter(Boolean)),
        )),
        force: z.optional(flag),
        dry_run: z.optional(flag),
      }),
      handler: async ({ mcus, force, dry_run }) => {
        if (!deps.update) throw new MoonflashError("INTERNAL", "This moonflash process cannot update MCUs.");
        return deps.update().run({ ...(mcus ? { mcus } : {}), ...(force === undefined ? {} : { force }), ...(dry_run === undefined ? {} : { dry_run }) });
      },
      // No summary: the job's result line tells the console (the plan, for a dry run); a dry run's plan also opens
      // a dialog whose Start button runs it.
      dialog: (r) => updatePlanDialog(r),
      macro: { command: "UPDATE_MCUS", params: { mcus: "MCU", force: "FORCE", dry_run: "DRY_RUN" } },
    }),
    define({
      name: "flash.mcu",
      description: "Flash one MCU: pre-flight, stop Klipper, flash with fallback, verify, start Klipper.",
      params: z.strictObject({
        // Optional so that a bare FLASH_MCU (a click on Mainsail's macro button) gets the list of MCUs, not a flash.
        mcu: z.optional(z.string({ error: "expected the MCU section name, e.g. \"mcu\" or \"toolhead\"" })),
        firmware: z.optional(z.string().check(z.minLength(1))),
        // Not `method`: Klipper's action_call_remote_method(method, **kwargs) (klippy/extras/gcode_macro.py) takes
        // that name itself, so a macro could never pass it.
        flash_method: z.optional(z.enum(FLASH_METHODS, { error: `expected one of ${FLASH_METHODS.join(", ")}` })),
        dry_run: z.optional(flag),
      }),
      handler: async ({ mcu, firmware, flash_method, dry_run }) => {
        if (mcu === undefined || mcu.trim() === "") throw await mcuMissing(deps.flash());
        return deps.flash().flash({
          mcu,
          ...(firmware === undefined ? {} : { firmware }),
          ...(flash_method === undefined ? {} : { method: flash_method }),
          ...(dry_run === undefined ? {} : { dry_run }),
        });
      },
      // No summary: the job's own result line tells the console.
      macro: { command: "FLASH_MCU", params: { mcu: "MCU", flash_method: "METHOD", firmware: "FIRMWARE", dry_run: "DRY_RUN" } },
    }),
    define({
      name: "flash.check",
      description: "Klipper's version and each MCU's firmware version: which MCUs Klipper would call outdated, and why.",
      params: noParams,
      handler: async () => deps.flash().checkVersions(),
      summary: (check) => versionSummary(check),
      macro: { command: "FLASH_CHECK" },
    }),
    define({
      name: "flash.rollback",
      description: "Flash the image an MCU had before its current one (moonflash keeps the last 3), as a normal flash.",
      params: z.strictObject({
        // Optional for the same reason as flash.mcu's: a bare FLASH_ROLLBACK names the MCUs instead of failing on a type.
        mcu: z.optional(z.string({ error: "expected the MCU section name, e.g. \"mcu\" or \"toolhead\"" })),
        dry_run: z.optional(flag),
      }),
      handler: async ({ mcu, dry_run }) => {
        if (mcu === undefined || mcu.trim() === "") throw await rollbackMcuMissing(deps.flash());
        return deps.flash().rollback({ mcu, ...(dry_run === undefined ? {} : { dry_run }) });
      },
      // No summary: the job's own result line tells the console.
      macro: { command: "FLASH_ROLLBACK", params: { mcu: "MCU", dry_run: "DRY_RUN" } },
    }),
    define({
      name: "flash.cancel",
      description: "Cancel the running flash job; allowed until writing starts.",
      params: noParams,
      handler: async () => ({ cancelled: deps.flash().cancel().id }),
      macro: { command: "FLASH_CANCEL" },
      summary: (r) => {
        const job = runner.current();
        const target = job?.id === r.cancelled ? job.target : runner.history("flash", 10).find((j) => j.id === r.cancelled)?.target;
        return `moonflash: cancelling the flash${target === undefined ? "" : ` of ${mcuUserName(target)}`}`;
      },
    }),
    define({
      name: "ota.status",
      description: "What OTA is doing (state, stage, download bytes/speed/ETA, module k/n), the installed update, and the last OTA results.",
      params: noParams,
      handler: () => otaStatus(deps),
      summary: (s) => describeOta(s),
      macro: { command: "OTA_STATUS" },
    }),
    define({
      name: "ota.download",
      description: "Download an OTA package and verify it (MD5, SHA-256, signature, manifest, every file); the same URL again resumes or joins it.",
      params: otaDownloadParams,
      handler: async ({ url, md5, sha256, size }) => {
        const params: DownloadParams = { url, md5, ...(sha256 === undefined ? {} : { sha256 }), ...(size === undefined ? {} : { size }) };
        const key = downloadKey(params);
        if (download?.key === key) return download.result;
        // Kept before the first await: the same call arriving meanwhile joins this one.
        const result = otaEngine(deps).then((engine) => engine.download(params));
        const mine = { key, result };
        download = mine;
        try {
          return await result;
        } finally {
          if (download === mine) download = null;
        }
      },
      // No summary: the job's result line tells the console.
      macro: { command: "OTA_DOWNLOAD", params: { url: "URL", md5: "MD5", sha256: "SHA256", size: "SIZE" } },
    }),
    define({
      name: "ota.install",
      description: "Install the downloaded package: back up, stop the updated services (and Klipper for firmware), replace files, flash, start, probation; rolls back by itself on failure.",
      params: noParams,
      handler: async () => (await otaEngine(deps)).install(),
      macro: { command: "OTA_INSTALL" },
    }),
    define({
      name: "ota.cancel",
      description: "Cancel the running OTA job; allowed while it downloads, verifies and checks, not once files are replaced.",
      params: noParams,
      handler: async () => ({ cancelled: (await otaEngine(deps)).cancel().id }),
      summary: (r) => {
        const job = runner.current();
        const target = job?.id === r.cancelled ? job.target : runner.history("ota", 10).find((j) => j.id === r.cancelled)?.target;
        return `moonflash: cancelling the OTA job${target === undefined ? "" : ` ${target}`}`;
      },
      macro: { command: "OTA_CANCEL" },
    }),
    define({
      name: "ota.rollback",
      description: "Restore what was installed before the last OTA update (files, firmware, services), or finish an interrupted update's rollback.",
      params: noParams,
      handler: async () => (await otaEngine(deps)).rollback(),
      macro: { command: "OTA_ROLLBACK" },
    }),
  ];
}
