// `moonflash doctor`: is this installation complete? Each check says what it found and, when something is wrong, the
// one thing to do about it. Exit 1 when a check fails. What install.sh sets up is checked where it puts it: the
// systemd unit (MOONFLASH_SYSTEMD_DIR, default /etc/systemd/system), <data>/moonraker.asvc, the macros in
// <data>/config, [update_manager moonflash] in moonraker.conf; what Klipper loaded is asked from Klipper when it
// runs (configfile), else read from printer.cfg and the files it includes.

import { constants } from "node:fs";
import { access, readFile, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { connectPrinter, createRuntime, type Runtime } from "../app.js";
import { toMoonflashError } from "../core/errors.js";
import { findExecutable } from "../core/tool.js";
import type { AgentSession } from "../moonraker/session.js";

export interface DoctorCheck {
  name: string;
  ok: boolean;
  /** What was found. */
  detail: string;
  /** What to do, when not ok. */
  fix?: string;
}

const MIN_NODE = [20, 19] as const;

const pass = (name: string, detail: string): DoctorCheck => ({ name, ok: true, detail });
const fail = (name: string, detail: string, fix: string): DoctorCheck => ({ name, ok: false, detail, fix });

async function readText(path: string): Promise<string | null> {
  try {
    return await readFile(path, "utf8");
  } catch {
    return null;
  }
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Section names of a Klipper config file and the files it includes (one level of [include], no globs), lower case. */
async function configFileSections(configDir: string): Promise<{ sections: Set<string>; includes: string[] } | null> {
  const main = await readText(join(configDir, "printer.cfg"));
  if (main === null) return null;
  const sections = new Set<string>();
  const includes: string[] = [];
  const scan = (text: string): string[] => {
    const found: string[] = [];
    for (const match of text.matchAll(/^\[([^\]\n]+)\]/gm)) {
      const name = match[1]!.trim().replace(/\s+/g, " ").toLowerCase();
      if (name.startsWith("include ")) found.push(name.slice(8).trim());
      else sections.add(name);
    }
    return found;
  };
  for (const include of scan(main)) {
    includes.push(include);
    if (/[*?[]/.test(include)) continue;
    const text = await readText(join(configDir, include));
    if (text !== null) scan(text);
  }
  return { sections, includes };
}

function nodeCheck(): DoctorCheck {
  const [major, minor] = process.versions.node.split(".").map(Number) as [number, number];
  const ok = major > MIN_NODE[0] || (major === MIN_NODE[0] && minor >= MIN_NODE[1]);
  return ok
    ? pass("node", `Node ${process.versions.node}`)
    : fail("node", `Node ${process.versions.node} is older than ${MIN_NODE.join(".")}`, "install Node 20.19 or later (Raspberry Pi OS trixie: sudo apt install nodejs npm)");
}

async function serviceChecks(): Promise<DoctorCheck[]> {
  const unit = join(process.env.MOONFLASH_SYSTEMD_DIR ?? "/etc/systemd/system", "moonflash.service");
  const checks = [(await exists(unit)) ? pass("service unit", unit) : fail("service unit", `${unit} does not exist`, "run ./install.sh in the moonflash folder")];
  const systemctl = await findExecutable("systemctl");
  if (!systemctl) {
    checks.push(fail("service running", "systemctl is not on PATH", "moonflash runs as a systemd service; start it by hand with npm start where there is no systemd"));
    return checks;
  }
  const { execa } = await import("execa");
  // is-active answers "active", "inactive", "failed", … on stdout, with exit 3 when not active.
  const state = String((await execa(systemctl, ["is-active", "moonflash"], { reject: false, timeout: 10_000 })).stdout).trim();
  checks.push(state === "active" ? pass("service running", "moonflash.service is active") : fail("service running", `moonflash.service is ${state || "not active"}`, "sudo systemctl restart moonflash; then journalctl -u moonflash or <data>/logs/moonflash.log says why it stops"));
  return checks;
}

async function moonrakerFileChecks(dataDir: string): Promise<DoctorCheck[]> {
  const asvc = join(dataDir, "moonraker.asvc");
  const listed = (await readText(asvc))?.split("\n").some((line) => line.trim() === "moonflash") ?? false;
  const conf = join(dataDir, "config", "moonraker.conf");
  const updater = /^\[update_manager\s+moonflash\]/m.test((await readText(conf)) ?? "");
  return [
    listed
      ? pass("moonraker.asvc", `${asvc} lists moonflash`)
      : fail("moonraker.asvc", `${asvc} does not list moonflash: Moonraker may not stop, start or update it`, `echo moonflash >> ${asvc}, then sudo systemctl restart moonraker (or run ./install.sh)`),
    updater
      ? pass("update_manager", `${conf} has [update_manager moonflash]`)
      : fail("update_manager", `${conf} has no [update_manager moonflash]: the update panel will not offer moonflash updates`, "run ./install.sh (it adds the section with your yes), then restart Moonraker"),
  ];
}

async function klipperChecks(dataDir: string, session: AgentSession | null): Promise<DoctorCheck[]> {
  const configDir = join(dataDir, "config");
  const macrosFile = join(configDir, "moonflash.cfg");
  const checks = [(await exists(macrosFile)) ? pass("macros file", macrosFile) : fail("macros file", `${macrosFile} does not exist`, "run ./install.sh (it links the macros from the moonflash folder)")];
  const loaded = session ? await session.configSections().catch(() => null) : null;
  const fromFiles = loaded ? null : await configFileSections(configDir);
  const where = loaded ? "Klipper's loaded config" : "printer.cfg and the files it includes";
  const sections = loaded ? new Set(loaded) : (fromFiles?.sections ?? null);
  if (!sections) {
    checks.push(fail("macros included", `no ${join(configDir, "printer.cfg")} and Klipper is not running`, "check the --data folder"));
    return checks;
  }
  const included = loaded ? sections.has("gcode_macro flash_mcu") : (fromFiles?.includes.some((i) => i === "moonflash.cfg") ?? false);
  checks.push(
    included
      ? pass("macros included", `FLASH_MCU and the other macros are in ${where}`)
      : fail("macros included", `${where} ${loaded ? "has no [gcode_macro FLASH_MCU]" : "does not include moonflash.cfg"}`, "add [include moonflash.cfg] to printer.cfg, then FIRMWARE_RESTART"),
  );
  checks.push(
    sections.has("respond")
      ? pass("[respond]", `[respond] is in ${where}`)
      : fail("[respond]", `${where} has no [respond]: moonflash's console lines and dialogs need RESPOND`, "add a [respond] section to printer.cfg (Mainsail's and Fluidd's own config files have one), then FIRMWARE_RESTART"),
  );
  return checks;
}

async function dialoutCheck(): Promise<DoctorCheck> {
  if (process.getuid?.() === 0) return pass("dialout", "running as root");
  const groups = new Set(process.getgroups?.() ?? []);
  const line = ((await readText("/etc/group")) ?? "").split("\n").find((l) => l.startsWith("dialout:"));
  const gid = line ? Number(line.split(":")[2]) : NaN;
  return groups.has(gid)
    ? pass("dialout", "this user is in the dialout group (serial devices)")
    : fail("dialout", "this user is not in the dialout group: serial devices cannot be opened", "sudo usermod -aG dialout $USER, then log in again and sudo systemctl restart moonflash");
}

/** The tools the configured MCUs' methods need, and sudo only where a method needs root. */
async function toolChecks(rt: Runtime): Promise<DoctorCheck[]> {
  const m = rt.config.moonflash;
  const mcus = Object.values(rt.config.mcus);
  const methods = new Set(mcus.flatMap((mcu) => mcu.method ?? (mcu.canbus_uuid ? ["flashtool"] : ["katapult", "make"])));
  const checks: DoctorCheck[] = [];
  const tool = async (name: string, command: string, why: string, fix: string): Promise<void> => {
    const found = await findExecutable(command);
    checks.push(found ? pass(name, `${found} (${why})`) : fail(name, `${command} not found (${why})`, fix));
  };
  checks.push(
    (await exists(join(m.klipper_path, "Makefile")))
      ? pass("klipper tree", `${m.klipper_path} (builds)`)
      : fail("klipper tree", `no Klipper tree at ${m.klipper_path} (builds need it)`, "set klipper_path in [moonflash] of moonflash.conf"),
  );
  await tool("make", "make", "builds and method make", "sudo apt install build-essential");
  if (methods.has("flashtool")) {
    const flashtool = join(m.katapult_path, "scripts", "flashtool.py");
    checks.push((await exists(flashtool)) ? pass("flashtool.py", `${flashtool} (CAN boards)`) : fail("flashtool.py", `${flashtool} not found (CAN boards)`, "git clone https://github.com/Arksine/katapult ~/katapult, or set katapult_path"));
    await tool("python3", "python3", "runs flashtool.py", "sudo apt install python3");
  }
  if (methods.has("wchisp")) await tool("wchisp", m.wchisp_path ?? "wchisp", "CH32V203 boards", "install wchisp (https://github.com/ch32-rs/wchisp/releases) or set wchisp_path");
  const linux = mcus.filter((mcu) => mcu.method?.includes("linux") || mcu.linux_mcu_path);
  for (const mcu of linux) {
    const target = dirname(mcu.linux_mcu_path ?? "/usr/local/bin/klipper_mcu");
    const writable = await access(target, constants.W_OK).then(
      () => true,
      () => false,
    );
    if (writable) {
      checks.push(pass(`sudo for ${mcu.section}`, `${target} is writable: no sudo needed`));
      continue;
    }
    const sudo = await findExecutable("sudo");
    const { execa } = await import("execa");
    const allowed = sudo ? (await execa(sudo, ["-n", "true"], { reject: false, timeout: 10_000 })).exitCode === 0 : false;
    checks.push(
      allowed
        ? pass(`sudo for ${mcu.section}`, `${target} is not writable; sudo -n works`)
        : fail(`sudo for ${mcu.section}`, `${target} is not writable and sudo -n asks for a password`, `allow this user to install the host MCU: a sudoers rule for cp into ${target}, or make ${target} writable`),
    );
  }
  return checks;
}

export async function runDoctor(opts: { dataDir: string; json: boolean }): Promise<number> {
  const checks: DoctorCheck[] = [nodeCheck()];
  let rt: Runtime | null = null;
  try {
    rt = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    checks.push(pass("moonflash.conf", rt.config.exists ? rt.config.file : `${rt.config.file} does not exist: defaults apply`));
  } catch (err) {
    checks.push(fail("moonflash.conf", toMoonflashError(err).message, "fix the line it names"));
  }
  checks.push(...(await serviceChecks()), ...(await moonrakerFileChecks(opts.dataDir)));
  let session: AgentSession | null = null;
  if (rt) {
    try {
      session = await connectPrinter(rt, 3000);
      checks.push(pass("moonraker", `reached at ${rt.endpointName}`));
    } catch (err) {
      checks.push(fail("moonraker", toMoonflashError(err).message, "start Moonraker, or set moonraker_socket / moonraker_url in moonflash.conf"));
    }
  }
  try {
    checks.push(...(await klipperChecks(opts.dataDir, session)), await dialoutCheck());
    if (rt) checks.push(...(await toolChecks(rt)));
  } finally {
    await session?.stop();
  }
  const ok = checks.every((c) => c.ok);
  if (opts.json) {
    process.stdout.write(`${JSON.stringify({ ok, checks })}\n`);
  } else {
    for (const c of checks) process.stdout.write(c.ok ? `✓ ${c.name}: ${c.detail}\n` : `✗ ${c.name}: ${c.detail}\n    fix: ${c.fix}\n`);
    process.stdout.write(ok ? "moonflash doctor: everything checked is in order\n" : `moonflash doctor: ${checks.filter((c) => !c.ok).length} problem(s)\n`);
  }
  return ok ? 0 : 1;
}
