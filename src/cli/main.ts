// moonflash command line: arguments, rendering and exit codes around the same engines the agent uses.
// Exit codes: 0 ok, 1 failure, 2 usage.

import { Command, CommanderError, InvalidArgumentError, Option } from "commander";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { VERSION } from "../version.js";
import { isMoonflashError, toMoonflashError } from "../core/errors.js";
import { EXIT_OK, EXIT_USAGE, exitCodeFor } from "../app.js";
import { FLASH_METHODS } from "../flash/types.js";
import { runServe } from "./serve.js";
// The other verbs are imported when they run: the bundle splits them into chunks that `serve`, the long-running
// process, never loads (idle memory, docs/BENCHMARKS.md).

function expandHome(p: string): string {
  return p === "~" || p.startsWith("~/") ? join(homedir(), p.slice(1)) : p;
}

const dataOption = (): Option =>
  new Option("--data <dir>", "printer_data directory").default(join(homedir(), "printer_data"), "~/printer_data").argParser((v) => resolve(expandHome(v)));

export function buildProgram(): Command {
  const program = new Command("moonflash")
    .description("Reflash Klipper MCUs and apply safe updates, driven from Mainsail/Fluidd through Moonraker.")
    .version(VERSION, "-V, --version")
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride();

  program
    .command("serve")
    .description("run the Moonraker agent (what the moonflash service runs)")
    .addOption(dataOption())
    .option("--config <file>", "configuration file (default <data>/config/moonflash.conf)")
    .action(async (opts: { data: string; config?: string }) => {
      process.exitCode = await runServe({ dataDir: opts.data, ...(opts.config ? { configFile: resolve(expandHome(opts.config)) } : {}) });
    });

  program
    .command("status")
    .description("show the running job and the last results")
    .addOption(dataOption())
    .option("--json", "print JSON")
    .action(async (opts: { data: string; json?: boolean }) => {
      process.exitCode = await (await import("./offline.js")).runStatus({ dataDir: opts.data, json: !!opts.json });
    });

  program
    .command("devices")
    .description("list serial devices and CAN nodes, mapped to Klipper's [mcu] sections")
    .addOption(dataOption())
    .option("--json", "print JSON")
    .action(async (opts: { data: string; json?: boolean }) => {
      process.exitCode = await (await import("./offline.js")).runDevices({ dataDir: opts.data, json: !!opts.json });
    });

  program
    .command("flash")
    .description("flash one MCU (stops Klipper, flashes, verifies, starts Klipper)")
    .argument("<mcu>", 'MCU section: "mcu", "toolhead" or "mcu toolhead"')
    .addOption(dataOption())
    .option("--firmware <file>", "image to flash (default from moonflash.conf, else <klipper>/out/klipper.bin)")
    .addOption(new Option("--method <method>", "use only this method").choices([...FLASH_METHODS]))
    .option("--dry-run", "check everything, stop nothing, flash nothing")
    .option("--json", "print job events and the result as JSON lines")
    .action(async (mcu: string, opts: { data: string; firmware?: string; method?: string; dryRun?: boolean; json?: boolean }) => {
      process.exitCode = await (await import("./offline.js")).runFlash({
        dataDir: opts.data,
        mcu,
        ...(opts.firmware ? { firmware: resolve(expandHome(opts.firmware)) } : {}),
        ...(opts.method ? { method: opts.method } : {}),
        dryRun: !!opts.dryRun,
        json: !!opts.json,
      });
    });

  program
    .command("check")
    .description("compare each MCU's firmware version with Klipper's (works with Klipper stopped too)")
    .addOption(dataOption())
    .option("--json", "print JSON")
    .action(async (opts: { data: string; json?: boolean }) => {
      process.exitCode = await (await import("./offline.js")).runCheck({ dataDir: opts.data, json: !!opts.json });
    });

  program
    .command("doctor")
    .description("check the installation: service, Moonraker, macros, [respond], update_manager, tools; exit 1 on a problem")
    .addOption(dataOption())
    .option("--json", "print JSON")
    .action(async (opts: { data: string; json?: boolean }) => {
      process.exitCode = await (await import("./doctor.js")).runDoctor({ dataDir: opts.data, json: !!opts.json });
    });

  program
    .command("console-filters")
    .description("hide moonflash's doubled console lines in Mainsail and Fluidd (a filter in Moonraker's database); --remove takes it away")
    .addOption(dataOption())
    .option("--remove", "remove the filter")
    .addOption(new Option("--check", "only say whether the filter is there").conflicts("remove"))
    .option("--json", "print JSON")
    .action(async (opts: { data: string; remove?: boolean; check?: boolean; json?: boolean }) => {
      const mode = opts.remove ? "remove" : opts.check ? "check" : "add";
      process.exitCode = await (await import("./console-filters.js")).runConsoleFilters({ dataDir: opts.data, mode, json: !!opts.json });
    });

  program
    .command("init-conf")
    .description("print a first moonflash.conf: the template with a commented section for each [mcu] of Klipper's config (install.sh writes it)")
    .addOption(dataOption())
    .requiredOption("--template <file>", "the commented template (moonraker/moonflash.conf)")
    .action(async (opts: { data: string; template: string }) => {
      process.exitCode = await (await import("./init-conf.js")).runInitConf({ dataDir: opts.data, template: opts.template });
    });

  program
    .command("sidebar-link")
    .description("a 'moonflash' entry in Mainsail's sidebar (config/.theme/navi.json) that opens the status page; --remove takes it away")
    .addOption(dataOption())
    .option("--remove", "remove the entry")
    .addOption(new Option("--check", "only say whether the entry is there").conflicts("remove"))
    .option("--json", "print JSON")
    .action(async (opts: { data: string; remove?: boolean; check?: boolean; json?: boolean }) => {
      const mode = opts.remove ? "remove" : opts.check ? "check" : "add";
      process.exitCode = await (await import("./sidebar-link.js")).runSidebarLink({ dataDir: opts.data, mode, json: !!opts.json });
    });

  program
    .command("rollback")
    .description("flash the MCU's previous image again (moonflash keeps the last 3 it flashed)")
    .argument("<mcu>", 'MCU section: "mcu", "toolhead" or "mcu toolhead"')
    .addOption(dataOption())
    .option("--dry-run", "show which image would be flashed; stop nothing, flash nothing")
    .option("--json", "print job events and the result as JSON lines")
    .action(async (mcu: string, opts: { data: string; dryRun?: boolean; json?: boolean }) => {
      process.exitCode = await (await import("./offline.js")).runRollback({ dataDir: opts.data, mcu, dryRun: !!opts.dryRun, json: !!opts.json });
    });

  program
    .command("build")
    .description("build firmware from each MCU's profile (without names: every MCU of moonflash.conf with one); Klipper keeps running")
    .argument("[mcu...]", 'MCU sections: "mcu", "toolhead" or "mcu toolhead"')
    .addOption(dataOption())
    .option("--force", "build even when profile, Klipper version and compiler are unchanged")
    .option("--json", "print job events and the result as JSON lines")
    .action(async (mcus: string[], opts: { data: string; force?: boolean; json?: boolean }) => {
      process.exitCode = await (await import("./build.js")).runBuild({ dataDir: opts.data, mcus, force: !!opts.force, json: !!opts.json });
    });

  program
    .command("update")
    .description("bring MCUs to Klipper's version: build all while Klipper runs, stop it once, flash in order, start it, check")
    .argument("[mcu...]", "MCUs to update (default: the outdated ones)")
    .addOption(dataOption())
    .option("--force", "update the named (or all configured) MCUs even when their version matches")
    .option("--dry-run", "show the plan; build, stop and flash nothing")
    .option("--json", "print job events and the result as JSON lines")
    .action(async (mcus: string[], opts: { data: string; force?: boolean; dryRun?: boolean; json?: boolean }) => {
      process.exitCode = await (await import("./build.js")).runUpdate({ dataDir: opts.data, mcus, force: !!opts.force, dryRun: !!opts.dryRun, json: !!opts.json });
    });

  program
    .command("config")
    .description("make an MCU's firmware profile: Klipper's menuconfig, --import a saved .config, or --suggest one from the board")
    .argument("<mcu>", 'MCU section: "mcu", "toolhead" or "mcu toolhead"')
    .addOption(dataOption())
    .option("--import <file>", "copy this saved Klipper .config in as the profile")
    .option("--suggest", "print a profile proposed from the board's MCU type and connection, guesses marked")
    .option("--write", "with --suggest: save the proposal as the profile")
    .action(async (mcu: string, opts: { data: string; import?: string; suggest?: boolean; write?: boolean }) => {
      process.exitCode = await (await import("./build.js")).runConfig({
        dataDir: opts.data,
        mcu,
        ...(opts.import ? { importFile: resolve(expandHome(opts.import)) } : {}),
        suggest: !!opts.suggest,
        write: !!opts.write,
      });
    });

  const ota = program
    .command("ota")
    .description("OTA updates: download and verify a package, install it (rolled back by itself on failure), status, cancel, rollback; pack, sign and keygen for vendors");

  ota
    .command("download")
    .description("download an OTA package and verify it (MD5, SHA-256, signature, manifest, every file); the same URL again resumes")
    .argument("<url>", "the package's http:// or https:// URL")
    .requiredOption("--md5 <hex>", "the package's MD5 (32 hex digits)")
    .option("--sha256 <hex>", "the package's SHA-256 (64 hex digits), checked too")
    .option("--size <bytes>", "the package's size in bytes", (v) => parseCount("--size", v))
    .addOption(dataOption())
    .option("--json", "print job events and the result as JSON lines")
    .action(async (url: string, opts: { data: string; md5: string; sha256?: string; size?: number; json?: boolean }) => {
      process.exitCode = await (await import("./ota.js")).runOtaDownload({
        dataDir: opts.data,
        url,
        md5: opts.md5,
        ...(opts.sha256 ? { sha256: opts.sha256 } : {}),
        ...(opts.size === undefined ? {} : { size: opts.size }),
        json: !!opts.json,
      });
    });

  ota
    .command("install")
    .description("install the downloaded package: back up, stop the services it names, replace files, flash firmware, start, probation; rolls back on failure")
    .addOption(dataOption())
    .option("--json", "print job events and the result as JSON lines")
    .action(async (opts: { data: string; json?: boolean }) => {
      process.exitCode = await (await import("./ota.js")).runOtaInstall({ dataDir: opts.data, json: !!opts.json });
    });

  ota
    .command("status")
    .description("the update's state, the running job and the last OTA results")
    .addOption(dataOption())
    .option("--json", "print JSON")
    .action(async (opts: { data: string; json?: boolean }) => {
      process.exitCode = await (await import("./ota.js")).runOtaStatus({ dataDir: opts.data, json: !!opts.json });
    });

  ota
    .command("cancel")
    .description("cancel the service's running OTA job (download, verify, checks; not once files are replaced)")
    .addOption(dataOption())
    .option("--json", "print JSON")
    .action(async (opts: { data: string; json?: boolean }) => {
      process.exitCode = await (await import("./ota.js")).runOtaCancel({ dataDir: opts.data, json: !!opts.json });
    });

  ota
    .command("rollback")
    .description("restore what was installed before the last OTA update (files, firmware, services)")
    .addOption(dataOption())
    .option("--json", "print job events and the result as JSON lines")
    .action(async (opts: { data: string; json?: boolean }) => {
      process.exitCode = await (await import("./ota.js")).runOtaRollback({ dataDir: opts.data, json: !!opts.json });
    });

  ota
    .command("pack")
    .description("make a package: manifest.json (sha256 and size filled in) and the files it names, signed with --key")
    .argument("<manifest>", "manifest.json, or a directory holding it; files are found relative to it")
    .requiredOption("--out <zip>", "the package to write")
    .option("--key <private.pem>", "sign the manifest with this Ed25519 private key (ota keygen)")
    .option("--file <src=path...>", "take the manifest's src from this path instead")
    .option("--json", "print JSON")
    .action(async (manifest: string, opts: { out: string; key?: string; file?: string[]; json?: boolean }) => {
      process.exitCode = await (await import("./ota.js")).runOtaPack({
        input: expandHome(manifest),
        out: expandHome(opts.out),
        ...(opts.key ? { key: expandHome(opts.key) } : {}),
        files: opts.file ?? [],
        json: !!opts.json,
      });
    });

  ota
    .command("sign")
    .description("write manifest.sig for a complete manifest.json (the signature pack --key puts into a package)")
    .argument("<manifest>", "the manifest.json to sign")
    .requiredOption("--key <private.pem>", "the Ed25519 private key (ota keygen)")
    .option("--out <file>", "where to write the signature (default manifest.sig beside the manifest)")
    .option("--json", "print JSON")
    .action(async (manifest: string, opts: { key: string; out?: string; json?: boolean }) => {
      process.exitCode = await (await import("./ota.js")).runOtaSign({
        manifest: expandHome(manifest),
        key: expandHome(opts.key),
        ...(opts.out ? { out: expandHome(opts.out) } : {}),
        json: !!opts.json,
      });
    });

  ota
    .command("keygen")
    .description("make an Ed25519 key pair for signing packages: private.pem and public.pem")
    .requiredOption("--out <dir>", "directory for the two files (never overwritten)")
    .option("--json", "print JSON")
    .action(async (opts: { out: string; json?: boolean }) => {
      process.exitCode = await (await import("./ota.js")).runOtaKeygen({ out: expandHome(opts.out), json: !!opts.json });
    });

  program
    .command("virtual-device")
    .description("serve a virtual Katapult board on a pseudo-terminal, to try moonflash without hardware")
    .requiredOption("--path <link>", "where to create the device link, e.g. /tmp/virtual-mcu")
    .option("--mcu <type>", "MCU type the bootloader reports", "stm32f103xe")
    .addOption(new Option("--mode <mode>", "katapult: in the bootloader; app: running Klipper, waits for a bootloader request").choices(["katapult", "app"]).default("katapult"))
    .option("--baud <n>", "throttle the link to this baud rate", (v) => parsePositiveInt("--baud", v))
    .option("--block-size <n>", "Katapult block size", (v) => parsePositiveInt("--block-size", v), 64)
    .option("--flash-size <bytes>", "application flash size in bytes", (v) => parsePositiveInt("--flash-size", v))
    .option("--reappear-path <link>", "after a bootloader request, come back under this path (USB re-enumeration)")
    .option("--fault <spec...>", "inject faults: drop-reply:SEND_BLOCK:3, busy:SEND_BLOCK:5, nack:CONNECT:1, corrupt-readback, disconnect:10, silence")
    .action(async (opts: { path: string; mcu: string; mode: "katapult" | "app"; baud?: number; blockSize: number; flashSize?: number; reappearPath?: string; fault?: string[] }) => {
      process.exitCode = await (await import("./virtual-device.js")).runVirtualDevice(opts);
    });

  return program;
}

function parseCount(name: string, value: string): number {
  const n = /^\d+$/.test(value) ? Number(value) : NaN;
  // InvalidArgumentError: commander prints it (naming the option) and exits through exitOverride.
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(`${name} expects a whole number of bytes, got '${value}'`);
  return n;
}

function parsePositiveInt(name: string, value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError(`${name} expects a positive integer, got '${value}'`);
  return n;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === "number" ? process.exitCode : EXIT_OK;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === "commander.helpDisplayed" || err.code === "commander.version" || err.code === "commander.help") return EXIT_OK;
      return EXIT_USAGE;
    }
    const e = toMoonflashError(err);
    process.stderr.write(`moonflash: ${e.message} [${e.code}]\n`);
    if (!isMoonflashError(err)) process.stderr.write(`${(err as Error)?.stack ?? ""}\n`);
    return exitCodeFor(e);
  }
}

/**
 * `moonflash status | head -3`: once the reader has gone, output is pointless, not an error. A verb ends quietly
 * with the exit code it had; the service (whose output is only a copy of its log) keeps running without it.
 */
function quietOnClosedPipe(serving: boolean): void {
  for (const stream of [process.stdout, process.stderr]) {
    stream.on("error", (err: NodeJS.ErrnoException) => {
      if (serving) return;
      if (err.code !== "EPIPE") throw err;
      process.exit(typeof process.exitCode === "number" ? process.exitCode : EXIT_OK);
    });
  }
}

quietOnClosedPipe(process.argv[2] === "serve");
process.exitCode = await main(process.argv);
