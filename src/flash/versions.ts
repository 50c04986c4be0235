// Which MCUs run another firmware version than the Klipper host, by Klipper's own rule: klippy/extras/error_mcu.py
// (_check_protocol_error) lists an MCU as "should be updated" when its mcu_version differs from the host's
// software_version in any way (plain string inequality, newer counts too), and as up to date otherwise.
//
// Where the versions come from, by Klipper's state:
// - ready (or any state where Klipper reports its MCU objects): printer.info's software_version and each mcu
//   object's mcu_version.
// - "MCU Protocol error": that state message (webhooks.state_message) is the source; error_mcu.py wrote it from the
//   versions Klipper saw, and the mcu objects may not report them then.
// - stopped or unreachable: the host version is what the Klipper tree will run, `git describe` of klipper_path
//   exactly as klippy/util.py get_git_version asks it (else klippy/.version, its fallback); an MCU cannot be asked,
//   so its version is the one moonflash last flashed to it (firmware store), else unknown.

import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { Logger } from "pino";
import { toMoonflashError } from "../core/errors.js";
import { dataPaths } from "../core/paths.js";
import type { KlippyState, McuReport, PrinterPort, PrinterState } from "../core/printer.js";
import { runTool } from "../core/tool.js";
import type { FlashSettings } from "./config.js";
import { FirmwareStore, type StoredImage } from "./firmware-store.js";
import { mcuUserName } from "./mcu-name.js";

export type HostVersionSource = "klipper" | "protocol-error" | "git-describe" | "version-file" | "unknown";
export type McuVersionSource = "klipper" | "protocol-error" | "firmware-store" | "unknown";

export interface McuVersion {
  /** Section: "mcu", "mcu toolhead". */
  mcu: string;
  /** As typed in FLASH_MCU MCU= / moonflash flash: "mcu", "toolhead". */
  name: string;
  version: string | null;
  source: McuVersionSource;
  /** Klipper's rule: the MCU's version differs from the host's. null when either is unknown. */
  outdated: boolean | null;
  reason: string;
  /** The image FLASH_ROLLBACK would flash, if moonflash keeps one. */
  rollback: { version: string | null; date: string; sha256: string } | null;
}

export interface VersionCheck {
  klipper_state: KlippyState;
  host: { version: string | null; source: HostVersionSource; detail?: string };
  mcus: McuVersion[];
  /** Klipper is in "MCU Protocol error"; `detail` is its last line, the first command the firmware did not know. */
  protocol_error: { detail: string | null } | null;
}

/** One MCU as error_mcu.py lists it: the last word of its section ("toolhead"), and its version. */
export interface ListedMcu {
  name: string;
  version: string | null;
}

export interface ProtocolErrorReport {
  hostVersion: string | null;
  outdated: ListedMcu[];
  upToDate: ListedMcu[];
  /** details['error'], the message's last line (e.g. "Unknown command: config_spi_shutdown"). */
  detail: string | null;
}

const PROTOCOL_ERROR = "MCU Protocol error";
const HOST_LINE = /^Your Klipper version is:\s*(.*)$/;
const SHOULD_UPDATE = "MCU(s) which should be updated:";
const UP_TO_DATE = "Up-to-date MCU(s):";
// "<name>: Current version <version>"; the name is mcu_name.split()[-1], so it has no spaces.
const MCU_LINE = /^(\S+): Current version (.*)$/;

/**
 * Reads the "MCU Protocol error" state message error_mcu.py builds; null for any other message. Each list ends at
 * the first blank line; "<none>" stands for an empty list. An entry without "Current version" (a bare name) is
 * accepted too.
 */
export function parseMcuProtocolError(message: string): ProtocolErrorReport | null {
  const lines = message.split(/\r?\n/).map((l) => l.trim());
  const first = lines.findIndex((l) => l !== "");
  if (first < 0 || lines[first] !== PROTOCOL_ERROR) return null;
  const report: ProtocolErrorReport = { hostVersion: null, outdated: [], upToDate: [], detail: null };
  let list: ListedMcu[] | null = null;
  for (const line of lines.slice(first + 1)) {
    const host = HOST_LINE.exec(line);
    if (host) {
      report.hostVersion = host[1]!.trim() || null;
      list = null;
    } else if (line === SHOULD_UPDATE) list = report.outdated;
    else if (line === UP_TO_DATE) list = report.upToDate;
    else if (line === "") list = null;
    else if (list && line !== "<none>") {
      const m = MCU_LINE.exec(line);
      list.push(m ? { name: m[1]!, version: m[2]!.trim() || null } : { name: line, version: null });
    }
  }
  const last = lines.filter((l) => l !== "").at(-1);
  if (last !== undefined && last !== PROTOCOL_ERROR) report.detail = last;
  return report;
}

/** Klipper's rule (error_mcu.py): any difference from the host's version means the MCU should be updated. */
export function isOutdated(mcuVersion: string | null | undefined, hostVersion: string | null | undefined): boolean | null {
  if (!mcuVersion || !hostVersion) return null;
  return mcuVersion !== hostVersion;
}

/** The section error_mcu.py's name stands for: it prints only the last word of "mcu NAME". */
function sectionForListedName(name: string, known: string[]): string {
  if (name === "mcu") return "mcu";
  return known.find((s) => s !== "mcu" && s.split(/\s+/).at(-1) === name) ?? `mcu ${name}`;
}

/** Klipper's state as a reason can say it. */
function klipperCondition(state: PrinterState): string {
  if (!state.moonrakerConnected) return "Moonraker is not reachable";
  if (!state.klippyConnected) return "Klipper is stopped";
  const first = state.stateMessage.split("\n")[0]?.trim();
  switch (state.klippyState) {
    case "startup":
      return "Klipper is starting";
    case "shutdown":
      return `Klipper is shut down${first ? ` (${first})` : ""}`;
    case "error":
      return `Klipper is in error${first ? ` (${first})` : ""}`;
    default:
      return `Klipper is ${state.klippyState}`;
  }
}

function versionOrUnknown(version: string | null): string {
  return version ?? "an unknown version";
}

export interface CheckVersionsOptions {
  store?: FirmwareStore;
  logger?: Logger;
  /** For `git describe` (default 10 s). */
  gitTimeoutMs?: number;
}

/** Per MCU: its version, the host's, and whether Klipper would call it outdated; see the file comment for sources. */
export async function checkVersions(printer: PrinterPort, settings: FlashSettings, opts: CheckVersionsOptions = {}): Promise<VersionCheck> {
  const state = printer.state();
  const store = opts.store ?? new FirmwareStore(dataPaths(settings.dataDir).firmware, opts.logger);
  let report: McuReport = { hostVersion: null, mcus: [] };
  if (state.klippyConnected) {
    try {
      report = await printer.mcuReport();
    } catch (err) {
      opts.logger?.warn({ err }, "could not read Klipper's MCU versions");
    }
  }
  const protocol = state.klippyState === "error" ? parseMcuProtocolError(state.stateMessage) : null;

  let host: VersionCheck["host"];
  if (protocol?.hostVersion) host = { version: protocol.hostVersion, source: "protocol-error" };
  else if (report.hostVersion) host = { version: report.hostVersion, source: "klipper" };
  else host = await treeVersion(settings.moonflash.klipper_path, opts.gitTimeoutMs ?? 10_000);

  // Sections in Klipper's order, then those only the protocol error, moonflash.conf or (Klipper down) the store names.
  const sections: string[] = [];
  const addSection = (s: string): void => {
    if (!sections.includes(s)) sections.push(s);
  };
  for (const m of report.mcus) addSection(m.section);
  const listed = new Map<string, { version: string | null; outdated: boolean }>();
  const addListed = (entries: ListedMcu[], outdated: boolean): void => {
    for (const e of entries) {
      const section = sectionForListedName(e.name, [...sections, ...Object.keys(settings.mcus)]);
      // A bare name in the up-to-date list has the host's version, by the rule that put it there.
      listed.set(section, { version: e.version ?? (outdated ? null : host.version), outdated });
      addSection(section);
    }
  };
  addListed(protocol?.outdated ?? [], true);
  addListed(protocol?.upToDate ?? [], false);
  for (const s of Object.keys(settings.mcus)) addSection(s);
  if (report.mcus.length === 0 && !protocol) {
    for (const s of await store.mcus().catch(() => [])) addSection(s);
  }

  const mcus: McuVersion[] = [];
  for (const section of sections) {
    const images = await store.list(section).catch((err: unknown) => {
      opts.logger?.warn({ err: toMoonflashError(err), mcu: section }, "could not read the firmware store");
      return [] as StoredImage[];
    });
    const previous = images[1];
    const rollback = previous && !previous.damaged ? { version: previous.version, date: previous.date, sha256: previous.sha256 } : null;
    mcus.push({ mcu: section, name: mcuUserName(section), ...judge(section, images[0]), rollback });
  }
  return { klipper_state: state.klippyState, host, mcus, protocol_error: protocol ? { detail: protocol.detail } : null };

  function judge(section: string, current: StoredImage | undefined): Pick<McuVersion, "version" | "source" | "outdated" | "reason"> {
    const hostV = host.version;
    const fromError = listed.get(section);
    if (fromError) {
      return {
        version: fromError.version,
        source: "protocol-error",
        outdated: fromError.outdated,
        reason: fromError.outdated
          ? `Klipper's "MCU Protocol error" lists it to be updated: it runs ${versionOrUnknown(fromError.version)}, Klipper is ${versionOrUnknown(hostV)}`
          : `Klipper's "MCU Protocol error" lists it as up to date (${versionOrUnknown(fromError.version)})`,
      };
    }
    const mcuVersion = report.mcus.find((m) => m.section === section)?.mcuVersion;
    if (mcuVersion) {
      const outdated = isOutdated(mcuVersion, hostV);
      return {
        version: mcuVersion,
        source: "klipper",
        outdated,
        reason: outdated === null
          ? `it runs ${mcuVersion}; the Klipper version is unknown`
          : outdated
            ? `it runs ${mcuVersion}, Klipper is ${hostV}: Klipper wants every MCU on its own version`
            : `it runs ${mcuVersion}, the same as Klipper`,
      };
    }
    const why = state.klippyConnected && report.mcus.some((m) => m.section === section)
      ? `${klipperCondition(state)} and reports no version for it`
      : report.mcus.length > 0 && state.klippyConnected
        ? "it is not in Klipper's config (only in moonflash.conf), so Klipper does not report its version"
        : `${klipperCondition(state)}, so the MCU cannot be asked`;
    if (current) {
      const outdated = isOutdated(current.version, hostV);
      const flashed = `the last image moonflash put on it (${current.date}) is ${versionOrUnknown(current.version)}`;
      return {
        version: current.version,
        source: "firmware-store",
        outdated,
        reason: `${why}; ${flashed}${outdated === null ? "" : outdated ? `, Klipper is ${hostV}` : ", the same as Klipper"}`,
      };
    }
    return { version: null, source: "unknown", outdated: null, reason: `${why}, and moonflash has flashed no image to it` };
  }
}

/**
 * The version the Klipper tree at `klipperPath` runs as, asked as klippy/util.py get_git_version does:
 * `git -C <tree> describe --always --tags --long --dirty`, else klippy/.version (a tree without git metadata).
 */
export async function treeVersion(klipperPath: string, timeoutMs: number): Promise<VersionCheck["host"]> {
  let detail: string;
  try {
    const run = await runTool({
      command: "git",
      args: ["-C", klipperPath, "describe", "--always", "--tags", "--long", "--dirty"],
      timeoutMs,
      tailLines: 5,
    });
    const version = run.stdoutTail.map((l) => l.trim()).filter(Boolean).at(-1);
    if (run.exitCode === 0 && version) return { version, source: "git-describe" };
    detail = `git describe in ${klipperPath} failed: ${run.stderrTail.join(" ").trim() || `exit code ${run.exitCode}`}`;
  } catch (err) {
    detail = `git describe in ${klipperPath} failed: ${toMoonflashError(err).message}`;
  }
  try {
    const version = (await readFile(join(klipperPath, "klippy", ".version"), "utf8")).trim();
    if (version) return { version, source: "version-file" };
  } catch {
    // No version file either: the version is unknown, and `detail` says why.
  }
  return { version: null, source: "unknown", detail: `${detail}. Check klipper_path in moonflash.conf.` };
}

/** The macro's console line: "moonflash: Klipper v0.13.0-730. Outdated: toolhead (v0.12.0-85). Up to date: mcu." */
export function versionSummary(check: VersionCheck): string {
  const outdated = check.mcus.filter((m) => m.outdated === true);
  const upToDate = check.mcus.filter((m) => m.outdated === false);
  const unknown = check.mcus.filter((m) => m.outdated === null);
  const host = check.host.version ? `Klipper ${check.host.version}` : "Klipper's version is unknown";
  const where = check.protocol_error ? " (MCU Protocol error)" : check.host.source === "git-describe" || check.host.source === "version-file" ? " (Klipper is not running: its source tree's version)" : "";
  const parts = [`moonflash: ${host}${where}.`];
  parts.push(outdated.length ? `Outdated: ${outdated.map((m) => `${m.name} (${versionOrUnknown(m.version)})`).join(", ")}.` : "Outdated: none.");
  if (upToDate.length) parts.push(`Up to date: ${upToDate.map((m) => m.name).join(", ")}.`);
  if (unknown.length) parts.push(`Unknown: ${unknown.map((m) => m.name).join(", ")}.`);
  const only = outdated.length === 1 ? outdated[0] : undefined;
  if (only) parts.push(`Flash it with FLASH_MCU MCU=${only.name}.`);
  else if (outdated.length > 1) parts.push("Flash each with FLASH_MCU MCU=<name>.");
  return parts.join(" ");
}
