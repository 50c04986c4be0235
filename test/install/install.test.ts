// install.sh as a real child process (execa, an argument array, a timeout) against a temporary printer_data.
//
// Each test lays out a "checkout" (install.sh, package.json, dist/, moonraker/ copied from this repository, a git
// repo whose origin is a URL nobody contacts, on branch "release") and a HOME with printer_data/{config,systemd},
// a printer.cfg, a moonraker.conf and a moonraker.asvc with content of their own. First on PATH are recording fakes:
// `systemctl` appends "systemctl <argv>" to a log and exits 0; `sudo` appends "sudo <argv>", drops sudo's own
// options (-u NAME, -H, --) and then runs the command as the calling user (a test cannot grant root), so a unit
// "installed through sudo" really lands in MOONFLASH_SYSTEMD_DIR and every systemctl call is logged once as
// "systemctl …" whichever way it came; `npm` appends "npm <argv> (in <cwd>)" and exits 0 (no network, ever).
//
// When the tests run as root, install.sh runs as `nobody` (setpriv), like the pi user with sudo on a printer, so
// the sudo path is the one tested; one test runs it as root itself, where no sudo is used. Run as another user,
// the tests run install.sh as that user, and the same assertions hold.

import { afterEach, describe, expect, it } from "vitest";
import { chmod, copyFile, cp, lstat, mkdir, mkdtemp, readFile, readdir, readlink, rm, symlink, writeFile } from "node:fs/promises";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { tmpdir, userInfo } from "node:os";
import { join, resolve } from "node:path";
import { execa } from "execa";
import { parseConfig } from "../../src/moonflash-conf.js";
import { startFakeMoonraker } from "../support/fake-moonraker/index.js";

const repoRoot = resolve(import.meta.dirname, "../..");
const testIsRoot = process.getuid?.() === 0;
const NOBODY = 65534;
const ORIGIN = "https://example.com/moonflash.git";
const BRANCH = "release";
const INCLUDE_MARK = "# moonflash: added by install.sh (install.sh --uninstall removes it and the next line)";

const PRINTER_CFG = `# printer.cfg of a test printer
[include mainsail.cfg]

[printer]
kinematics: corexy
max_velocity: 300

[respond]

#*# <---------------------- SAVE_CONFIG ---------------------->
#*# DO NOT EDIT THIS BLOCK OR BELOW. The contents are auto-generated.
#*#
#*# [probe]
#*# z_offset = 1.234
`;
const MOONRAKER_CONF = `[server]
host: 0.0.0.0
port: 7125

[authorization]
trusted_clients:
  127.0.0.0/8

[update_manager]
channel: dev

[update_manager mainsail]
type: web
repo: mainsail-crew/mainsail
path: ~/mainsail
`;
const ASVC = "klipper_mcu\nwebcamd\ncrowsnest\n";

interface World {
  root: string;
  repo: string;
  home: string;
  data: string;
  config: string;
  bin: string;
  systemdDir: string;
  unit: string;
  log: string;
}

const worlds: string[] = [];
afterEach(async () => {
  for (const dir of worlds.splice(0)) await rm(dir, { recursive: true, force: true });
});

async function writeScript(path: string, body: string): Promise<void> {
  await writeFile(path, `#!/bin/bash\n${body}`);
  await chmod(path, 0o755);
}

async function makeWorld(files: { printerCfg?: string; moonrakerConf?: string; asvc?: string } = {}): Promise<World> {
  const root = await mkdtemp(join(tmpdir(), "moonflash-install-"));
  worlds.push(root);
  await chmod(root, 0o755);
  const repo = join(root, "moonflash");
  const home = join(root, "home");
  const data = join(home, "printer_data");
  const config = join(data, "config");
  const bin = join(root, "bin");
  const systemdDir = join(root, "etc-systemd-system");
  const log = join(root, "calls.log");
  for (const dir of [join(repo, "moonraker"), config, join(data, "systemd"), bin, systemdDir]) await mkdir(dir, { recursive: true });

  for (const file of ["install.sh", "package.json", "moonraker/moonflash.cfg", "moonraker/moonflash.conf"]) await copyFile(join(repoRoot, file), join(repo, file));
  await chmod(join(repo, "install.sh"), 0o755);
  await cp(join(repoRoot, "dist"), join(repo, "dist"), { recursive: true });
  await symlink(join(repoRoot, "node_modules"), join(repo, "node_modules"));
  await execa("git", ["init", "--quiet", `--initial-branch=${BRANCH}`, repo], { timeout: 10_000 });
  await execa("git", ["-C", repo, "remote", "add", "origin", ORIGIN], { timeout: 10_000 });

  await writeFile(join(config, "printer.cfg"), files.printerCfg ?? PRINTER_CFG);
  await writeFile(join(config, "moonraker.conf"), files.moonrakerConf ?? MOONRAKER_CONF);
  await writeFile(join(data, "moonraker.asvc"), files.asvc ?? ASVC);
  await writeFile(log, "");

  const record = `printf '%s\\n' "$(basename "$0") $*" >> '${log}'\n`;
  await writeScript(join(bin, "systemctl"), `${record}exit 0\n`);
  await writeScript(join(bin, "npm"), `printf '%s\\n' "npm $* (in $PWD)" >> '${log}'\nexit 0\n`);
  await writeScript(
    join(bin, "sudo"),
    `${record}while (($# > 0)); do\n  case "$1" in\n    -u) shift 2 ;;\n    --) shift; break ;;\n    -*) shift ;;\n    *) break ;;\n  esac\ndone\nexec "$@"\n`,
  );
  if (testIsRoot) await execa("chown", ["-R", `${NOBODY}:${NOBODY}`, root], { timeout: 10_000 });
  return { root, repo, home, data, config, bin, systemdDir, unit: join(systemdDir, "moonflash.service"), log };
}

/** The user install.sh runs as in `run` (without `asRoot`). */
const runUser = testIsRoot ? "nobody" : userInfo().username;

async function run(w: World, args: string[], opts: { input?: string; env?: Record<string, string>; pathFirst?: string; asRoot?: boolean } = {}) {
  const env = {
    PATH: `${opts.pathFirst ? `${opts.pathFirst}:` : ""}${w.bin}:${process.env.PATH ?? "/usr/bin:/bin"}`,
    HOME: w.home,
    LANG: "C.UTF-8",
    MOONFLASH_SYSTEMD_DIR: w.systemdDir,
    // systemd "running" (sd_booted) for the recording systemctl; a test that removes it sees a host without systemd.
    MOONFLASH_SYSTEMD_RUN: w.root,
    ...opts.env,
  };
  const script = join(w.repo, "install.sh");
  const dropToNobody = testIsRoot && !opts.asRoot;
  const [file, argv] = dropToNobody ? ["setpriv", [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", script, ...args]] : [script, args];
  return execa(file, argv, { cwd: w.root, env, extendEnv: false, input: opts.input ?? "", reject: false, timeout: 60_000 });
}

/** Log lines since `from` (a line count). */
async function calls(w: World, from = 0): Promise<string[]> {
  return (await readFile(w.log, "utf8")).split("\n").filter(Boolean).slice(from);
}
const systemctlCalls = (lines: string[]) => lines.filter((l) => l.startsWith("systemctl ")).map((l) => l.slice("systemctl ".length));
const sudoCalls = (lines: string[]) => lines.filter((l) => l.startsWith("sudo ")).map((l) => l.slice("sudo ".length));

type Entry = { kind: string; mode: number; uid: number; mtimeMs: number; sha256?: string; target?: string };
/** Every file, directory and link under `dirs` with its kind, mode, owner, mtime and content hash or link target. */
async function snapshot(...dirs: string[]): Promise<Record<string, Entry>> {
  const out: Record<string, Entry> = {};
  const visit = async (path: string): Promise<void> => {
    const st = await lstat(path);
    const entry: Entry = { kind: st.isSymbolicLink() ? "link" : st.isDirectory() ? "dir" : "file", mode: st.mode, uid: st.uid, mtimeMs: st.mtimeMs };
    if (st.isSymbolicLink()) entry.target = await readlink(path);
    else if (st.isFile()) entry.sha256 = createHash("sha256").update(await readFile(path)).digest("hex");
    out[path] = entry;
    if (st.isDirectory()) for (const name of (await readdir(path)).sort()) await visit(join(path, name));
  };
  for (const dir of dirs) await visit(dir);
  return out;
}

/** The node options of package.json's "start" script: the words between "node" and "dist/moonflash.mjs". */
async function startOptions(): Promise<string[]> {
  const pkg = JSON.parse(await readFile(join(repoRoot, "package.json"), "utf8")) as { scripts: { start: string } };
  const words = pkg.scripts.start.trim().split(/\s+/);
  expect(words[0]).toBe("node");
  return words.slice(1, words.indexOf("dist/moonflash.mjs"));
}

function updateManagerBlock(w: World): string {
  return [
    "# >>> moonflash: added by install.sh (install.sh --uninstall removes this block)",
    "[update_manager moonflash]",
    "type: git_repo",
    `path: ${w.repo}`,
    `origin: ${ORIGIN}`,
    `primary_branch: ${BRANCH}`,
    "enable_node_updates: True",
    "managed_services: moonflash",
    "info_tags:",
    "  desc=moonflash (firmware flashing and OTA for Klipper)",
    "# <<< moonflash",
    "",
  ].join("\n");
}

const read = (path: string) => readFile(path, "utf8");

describe("install.sh", () => {
  it("installs the unit (ExecStart with package.json start's node options), env file, asvc line, macros link, moonflash.conf, include line and update_manager section, then daemon-reload, enable, restart", async () => {
    const w = await makeWorld();
    const result = await run(w, ["--data", w.data, "--user", runUser, "--yes", "--no-npm"]);
    expect(result.exitCode, result.stderr).toBe(0);

    // The unit: node found on PATH, the options of package.json's start script, the arguments from moonflash.env.
    const node = (await execa("bash", ["-c", "command -v node"], { env: { PATH: `${w.bin}:${process.env.PATH}` }, extendEnv: false, timeout: 10_000 })).stdout.trim();
    const options = await startOptions();
    expect(options).toContain("--lite-mode");
    const unit = await read(w.unit);
    const lines = unit.split("\n");
    expect(lines).toContain(`ExecStart=${node} ${options.join(" ")} ${w.repo}/dist/moonflash.mjs $MOONFLASH_ARGS`);
    expect(lines).toContain(`User=${runUser}`);
    expect(lines).toContain(`WorkingDirectory=${w.repo}`);
    expect(lines).toContain(`EnvironmentFile=-${w.data}/systemd/moonflash.env`);
    expect(lines).toContain(`Environment="MOONFLASH_ARGS=serve --data ${w.data}"`);
    expect(lines).toContain("Restart=always");
    expect(lines).toContain("WantedBy=multi-user.target");
    expect(lines.some((l) => /^RestartSec=\d+$/.test(l))).toBe(true);
    const stopTimeout = Number(lines.find((l) => l.startsWith("TimeoutStopSec="))?.split("=")[1]);
    expect(stopTimeout).toBeGreaterThan(300); // longer than a flash attempt's default timeout
    // systemd itself reads the unit without complaint (it only frowns at the user nobody these tests run as).
    const verify = await execa("systemd-analyze", ["verify", w.unit], { reject: false, timeout: 30_000 });
    expect(verify.exitCode).toBe(0);
    expect(verify.stderr.split("\n").filter((l) => l.trim() && !l.includes("Special user nobody configured"))).toEqual([]);
    // The command line the unit starts is one node runs: with MOONFLASH_ARGS replaced by --version.
    const execStart = lines.find((l) => l.startsWith("ExecStart="))!.slice("ExecStart=".length).split(" ");
    const version = await execa(execStart[0]!, execStart.slice(1).map((a) => (a === "$MOONFLASH_ARGS" ? "--version" : a)), { reject: false, timeout: 30_000 });
    expect(version.stdout.trim()).toBe(JSON.parse(await read(join(repoRoot, "package.json"))).version);

    expect(await read(join(w.data, "systemd", "moonflash.env"))).toBe(`MOONFLASH_ARGS="serve --data ${w.data}"\n`);
    expect(await read(join(w.data, "moonraker.asvc"))).toBe(`${ASVC}moonflash\n`);

    // The include at the top of printer.cfg (never below SAVE_CONFIG), once.
    const printerCfg = await read(join(w.config, "printer.cfg"));
    expect(printerCfg).toBe(`${INCLUDE_MARK}\n[include moonflash.cfg]\n${PRINTER_CFG}`);
    expect(printerCfg.split("\n").filter((l) => l === "[include moonflash.cfg]")).toHaveLength(1);

    const link = join(w.config, "moonflash.cfg");
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
    expect(await readlink(link)).toBe(join(w.repo, "moonraker", "moonflash.cfg"));
    expect(await read(link)).toBe(await read(join(repoRoot, "moonraker", "moonflash.cfg")));

    // moonflash.conf: commented defaults the agent's own parser accepts as they are.
    const conf = await read(join(w.config, "moonflash.conf"));
    expect(conf).toContain("\n[moonflash]\n");
    expect(conf).toContain("# log_level: info");
    expect(conf).toMatch(/^#\[mcu toolhead\]$/m);
    expect(conf).toContain(`devices --data ${w.data}`);
    const parsed = parseConfig(conf, join(w.config, "moonflash.conf"), w.data);
    expect(parsed.moonflash.log_level).toBe("info");
    expect(parsed.mcus).toEqual({});

    expect(await read(join(w.config, "moonraker.conf"))).toBe(`${MOONRAKER_CONF}\n${updateManagerBlock(w)}`);

    // Mainsail's sidebar: one entry opening the status page at this host's address and the default port.
    const navi = JSON.parse(await read(join(w.config, ".theme", "navi.json"))) as Array<Record<string, unknown>>;
    expect(navi).toEqual([{ title: "moonflash", href: expect.stringMatching(/^http:\/\/[\d.]+:7180\/$/), target: "_blank", icon: expect.stringMatching(/^M[\d ,.HVMZ]+Z$/), position: 90 }]);
    expect(result.stdout).toContain(`added "moonflash" to Mainsail's sidebar (${join(w.config, ".theme", "navi.json")})`);

    const log = await calls(w);
    expect(systemctlCalls(log)).toEqual(["daemon-reload", "enable moonflash", "restart moonflash", "restart moonraker"]);
    // Not root: the unit and every systemctl call that changes something go through sudo.
    expect(sudoCalls(log)).toEqual([
      expect.stringMatching(new RegExp(`^install -m 0644 -- \\S+ ${w.unit.replace(/[.]/g, "\\.")}$`)),
      "systemctl daemon-reload",
      "systemctl enable moonflash",
      "systemctl restart moonflash",
      "systemctl restart moonraker",
    ]);
    expect(log.filter((l) => l.startsWith("npm "))).toEqual([]); // --no-npm

    expect(result.stdout).toContain(`moonflash installed (user ${runUser}, data ${w.data}):`);
    expect(result.stdout).toContain("restarted Moonraker");
    expect(result.stdout).toContain("RESTART");
  });

  it("systemctl there but systemd not running (a container): writes everything, calls no systemctl, says how to start moonflash", async () => {
    const w = await makeWorld();
    const result = await run(w, ["--data", w.data, "--user", runUser, "--yes", "--no-npm"], { env: { MOONFLASH_SYSTEMD_RUN: join(w.root, "no-such-dir") } });
    expect(result.exitCode, result.stderr).toBe(0);
    expect(await read(w.unit)).toContain("ExecStart=");
    expect(systemctlCalls(await calls(w))).toEqual([]);
    expect(result.stdout).toMatch(/systemd is not running here \(or systemctl was not found\): start moonflash with your service manager: \S+ .*dist\/moonflash\.mjs serve --data /);
    expect(result.stdout).toContain("restart Moonraker, which reads moonraker.asvc");

    const removed = await run(w, ["--uninstall", "--data", w.data, "--user", runUser, "--yes"], { env: { MOONFLASH_SYSTEMD_RUN: join(w.root, "no-such-dir") } });
    expect(removed.exitCode, removed.stderr).toBe(0);
    expect(removed.stdout).toContain(`  - removed ${w.unit}\n`);
    expect(removed.stdout).not.toContain("stopped and disabled");
    expect(removed.stdout).toContain("systemd is not running here: stop moonflash with the service manager that runs it");
    expect(systemctlCalls(await calls(w))).toEqual([]);
  });

  it("a second run changes no file (contents, mtimes, owners) and says nothing changed", async () => {
    const w = await makeWorld();
    const first = await run(w, ["--data", w.data, "--user", runUser, "--yes"], { env: { MOONFLASH_SKIP_NPM: "1" } });
    expect(first.exitCode, first.stderr).toBe(0);
    const before = await snapshot(w.home, w.systemdDir, w.repo);
    const logged = (await calls(w)).length;

    const second = await run(w, ["--data", w.data, "--user", runUser, "--yes"], { env: { MOONFLASH_SKIP_NPM: "1" } });
    expect(second.exitCode, second.stderr).toBe(0);
    expect(await snapshot(w.home, w.systemdDir, w.repo)).toEqual(before);
    expect(second.stdout).toContain("moonflash is already installed; nothing changed.");
    const log = await calls(w, logged);
    // Only questions to systemd, nothing through sudo, no npm (MOONFLASH_SKIP_NPM=1).
    expect(systemctlCalls(log)).toEqual(["is-enabled --quiet moonflash", "is-active --quiet moonflash"]);
    expect(sudoCalls(log)).toEqual([]);
    expect(log.filter((l) => l.startsWith("npm "))).toEqual([]);
    expect(second.stdout).not.toMatch(/\? yes/); // nothing left to ask
  });

  it("--uninstall removes exactly what install added, keeps moonflash.conf and says so; a second --uninstall changes nothing", async () => {
    const w = await makeWorld();
    expect((await run(w, ["--data", w.data, "--user", runUser, "--yes", "--no-npm"])).exitCode).toBe(0);
    const conf = await read(join(w.config, "moonflash.conf"));
    const logged = (await calls(w)).length;

    const result = await run(w, ["--uninstall", "--data", w.data, "--user", runUser, "--yes"]);
    expect(result.exitCode, result.stderr).toBe(0);
    expect(await read(join(w.config, "printer.cfg"))).toBe(PRINTER_CFG);
    expect(await read(join(w.config, "moonraker.conf"))).toBe(MOONRAKER_CONF);
    expect(await read(join(w.data, "moonraker.asvc"))).toBe(ASVC);
    expect(existsSync(w.unit)).toBe(false);
    expect(existsSync(join(w.data, "systemd", "moonflash.env"))).toBe(false);
    await expect(lstat(join(w.config, "moonflash.cfg"))).rejects.toThrow(/ENOENT/);
    expect(await read(join(w.config, "moonflash.conf"))).toBe(conf);
    expect((await readdir(w.config)).sort()).toEqual(["moonflash.conf", "moonraker.conf", "printer.cfg"]);
    expect(await readdir(join(w.data, "systemd"))).toEqual([]);
    expect(result.stdout).toContain(`Left in place: ${join(w.config, "moonflash.conf")}`);
    expect(result.stdout).toContain("moonflash uninstalled");

    const log = await calls(w, logged);
    expect(systemctlCalls(log)).toEqual(["stop moonflash", "disable moonflash", "daemon-reload", "restart moonraker"]);
    expect(sudoCalls(log)).toEqual(["systemctl stop moonflash", "systemctl disable moonflash", `rm -f -- ${w.unit}`, "systemctl daemon-reload", "systemctl restart moonraker"]);

    const before = await snapshot(w.home, w.systemdDir);
    const again = await run(w, ["--uninstall", "--data", w.data, "--user", runUser, "--yes"]);
    expect(again.exitCode, again.stderr).toBe(0);
    expect(again.stdout).toContain("moonflash is not installed; nothing changed.");
    expect(await snapshot(w.home, w.systemdDir)).toEqual(before);
  });

  it("without --yes, answered n: printer.cfg and moonraker.conf stay untouched and the lines to add are printed", async () => {
    const w = await makeWorld();
    const untouched = await snapshot(join(w.config, "printer.cfg"), join(w.config, "moonraker.conf"));
    const result = await run(w, ["--data", w.data, "--user", runUser, "--no-npm"], { input: "n\nn\nn\n" });
    expect(result.exitCode, result.stderr).toBe(0);
    expect(await snapshot(join(w.config, "printer.cfg"), join(w.config, "moonraker.conf"))).toEqual(untouched);

    expect(result.stdout).toContain(`Add [include moonflash.cfg] at the top of ${join(w.config, "printer.cfg")}? [y/N] n`);
    expect(result.stdout).toMatch(/^ {6}\[include moonflash\.cfg\]$/m);
    const section = updateManagerBlock(w).split("\n").slice(1, -2);
    expect(result.stdout).toContain(section.map((l) => `      ${l}`).join("\n"));
    expect(result.stdout).toContain("sudo systemctl restart moonraker");

    // The rest is installed all the same: it touches no file of the user's.
    expect(existsSync(w.unit)).toBe(true);
    expect(await read(join(w.data, "moonraker.asvc"))).toBe(`${ASVC}moonflash\n`);
    expect(systemctlCalls(await calls(w))).toEqual(["daemon-reload", "enable moonflash", "restart moonflash"]);

    // With no answer at all (stdin closed) the questions are answered no as well.
    const closed = await run(w, ["--data", w.data, "--user", runUser, "--no-npm"], { input: "" });
    expect(closed.exitCode, closed.stderr).toBe(0);
    expect(closed.stdout).toContain("moonflash is already installed; nothing changed.");
    expect(closed.stdout).toContain("[include moonflash.cfg]");
    expect(await snapshot(join(w.config, "printer.cfg"), join(w.config, "moonraker.conf"))).toEqual(untouched);
  });

  it("a Node.js older than 20.19 exits 1 with the Raspberry Pi OS hint before it writes anything", async () => {
    const w = await makeWorld();
    const oldNode = join(w.root, "old-node");
    await mkdir(oldNode);
    await writeScript(
      join(oldNode, "node"),
      `printf '%s\\n' "node $*" >> '${w.log}'\nif [[ "\${1:-}" == "--version" ]]; then echo v18.19.0; exit 0; fi\necho "node v18.19.0 was not meant to run: $*" >&2\nexit 1\n`,
    );
    if (testIsRoot) await execa("chown", ["-R", `${NOBODY}:${NOBODY}`, oldNode], { timeout: 10_000 });
    const before = await snapshot(w.home, w.systemdDir);

    const result = await run(w, ["--data", w.data, "--user", runUser, "--yes"], { pathFirst: oldNode });
    expect(result.exitCode).toBe(1);
    expect(result.stderr).toContain("moonflash needs Node.js >= 20.19 and npm (found v18.19.0 at");
    expect(result.stderr).toContain("Raspberry Pi OS");
    expect(result.stderr).toContain("sudo apt install nodejs npm");
    expect(result.stderr).toContain("NodeSource");
    expect(await snapshot(w.home, w.systemdDir)).toEqual(before);
    expect(await calls(w)).toEqual(["node --version"]); // no npm, no systemctl, no sudo

    // 20.18 is one minor short.
    await writeScript(join(oldNode, "node"), `if [[ "\${1:-}" == "--version" ]]; then echo v20.18.3; exit 0; fi\nexit 1\n`);
    const minor = await run(w, ["--data", w.data, "--user", runUser, "--yes"], { pathFirst: oldNode });
    expect(minor.exitCode).toBe(1);
    expect(minor.stderr).toContain("(found v20.18.3 at");
    expect(await snapshot(w.home, w.systemdDir)).toEqual(before);
  });

  it("leaves an include, an update_manager section and an edited macros file the user made alone, at install and at uninstall", async () => {
    const printerCfg = `[include moonflash.cfg]\n${PRINTER_CFG}`;
    const moonrakerConf = `${MOONRAKER_CONF}\n[update_manager moonflash]\ntype: git_repo\npath: ~/moonflash\norigin: https://example.com/fork.git\n`;
    const w = await makeWorld({ printerCfg, moonrakerConf });
    const edited = `${await read(join(repoRoot, "moonraker", "moonflash.cfg"))}\n[gcode_macro MINE]\ngcode:\n  M117 mine\n`;
    await writeFile(join(w.config, "moonflash.cfg"), edited);
    if (testIsRoot) await execa("chown", [`${NOBODY}:${NOBODY}`, join(w.config, "moonflash.cfg")], { timeout: 10_000 });

    const installed = await run(w, ["--data", w.data, "--user", runUser, "--yes", "--no-npm"]);
    expect(installed.exitCode, installed.stderr).toBe(0);
    expect(await read(join(w.config, "printer.cfg"))).toBe(printerCfg);
    expect(await read(join(w.config, "moonraker.conf"))).toBe(moonrakerConf);
    expect(await read(join(w.config, "moonflash.cfg"))).toBe(edited);
    expect(installed.stderr).toContain("is a file of its own");
    expect(installed.stdout).not.toContain("[y/N]");

    const removed = await run(w, ["--uninstall", "--data", w.data, "--user", runUser, "--yes"]);
    expect(removed.exitCode, removed.stderr).toBe(0);
    expect(await read(join(w.config, "printer.cfg"))).toBe(printerCfg);
    expect(await read(join(w.config, "moonraker.conf"))).toBe(moonrakerConf);
    expect(await read(join(w.config, "moonflash.cfg"))).toBe(edited);
    expect(await read(join(w.data, "moonraker.asvc"))).toBe(ASVC);
    expect(removed.stderr).toContain("has [update_manager moonflash], which install.sh did not add");
  });

  it("an unchanged copy of the macros becomes the link; a missing moonraker.asvc gets Moonraker's default services and moonflash", async () => {
    const w = await makeWorld();
    await copyFile(join(repoRoot, "moonraker", "moonflash.cfg"), join(w.config, "moonflash.cfg"));
    await rm(join(w.data, "moonraker.asvc"));
    const result = await run(w, ["--data", w.data, "--user", runUser, "--yes", "--no-npm"]);
    expect(result.exitCode, result.stderr).toBe(0);
    expect(await readlink(join(w.config, "moonflash.cfg"))).toBe(join(w.repo, "moonraker", "moonflash.cfg"));
    const asvc = (await read(join(w.data, "moonraker.asvc"))).split("\n");
    expect(asvc).toEqual(expect.arrayContaining(["klipper_mcu", "crowsnest", "KlipperScreen", "moonflash"]));
    expect(asvc.at(-1)).toBe("");

    const removed = await run(w, ["--uninstall", "--data", w.data, "--user", runUser, "--yes"]);
    expect(removed.exitCode, removed.stderr).toBe(0);
    expect(await read(join(w.data, "moonraker.asvc"))).not.toMatch(/^moonflash$/m);
    expect(await read(join(w.data, "moonraker.asvc"))).toMatch(/^klipper_mcu$/m);
  });

  it("run as the tests' own user without --data, --user or --no-npm: printer_data under HOME, npm ci --omit=dev in the checkout", async () => {
    const w = await makeWorld();
    // The include, the sidebar link, update_manager: yes; restart Moonraker: no.
    const result = await run(w, [], { asRoot: true, input: "y\ny\ny\nn\n" });
    expect(result.exitCode, result.stderr).toBe(0);
    const me = userInfo().username;
    expect(result.stdout).toContain(`moonflash installed (user ${me}, data ${w.data}):`);
    expect((await read(w.unit)).split("\n")).toContain(`User=${me}`);
    expect(await read(join(w.config, "printer.cfg"))).toBe(`${INCLUDE_MARK}\n[include moonflash.cfg]\n${PRINTER_CFG}`);
    expect(await read(join(w.config, "moonraker.conf"))).toBe(`${MOONRAKER_CONF}\n${updateManagerBlock(w)}`);
    const log = await calls(w);
    expect(log.filter((l) => l.startsWith("npm "))).toEqual([`npm ci --omit=dev --no-audit --no-fund (in ${w.repo})`]);
    expect(systemctlCalls(log)).toEqual(["daemon-reload", "enable moonflash", "restart moonflash"]);
    // As root there is no sudo at all; as anyone else the changes go through it.
    expect(sudoCalls(log)).toEqual(testIsRoot ? [] : [expect.stringMatching(/^install -m 0644 /), "systemctl daemon-reload", "systemctl enable moonflash", "systemctl restart moonflash"]);
  });

  it("for another user: as root the files in printer_data are handed to that user and npm runs as them; as anyone else it is refused", async () => {
    const w = await makeWorld();
    if (testIsRoot) {
      const result = await run(w, ["--data", w.data, "--user", "nobody", "--yes"], { asRoot: true });
      expect(result.exitCode, result.stderr).toBe(0);
      for (const file of ["systemd/moonflash.env", "config/moonflash.conf", "config/moonflash.cfg"]) expect((await lstat(join(w.data, file))).uid, file).toBe(NOBODY);
      expect((await read(w.unit)).split("\n")).toContain("User=nobody");
      const log = await calls(w);
      const node = (await execa("bash", ["-c", "command -v node"], { env: { PATH: `${w.bin}:${process.env.PATH}` }, extendEnv: false, timeout: 10_000 })).stdout.trim();
      const cli = `${node} ${join(w.repo, "dist", "moonflash.mjs")} sidebar-link --data ${w.data} --json`;
      expect(sudoCalls(log)).toEqual(["-u nobody -H npm ci --omit=dev --no-audit --no-fund", `-u nobody -H ${cli} --check`, `-u nobody -H ${cli}`]);
      expect((await lstat(join(w.config, ".theme", "navi.json"))).uid).toBe(NOBODY);
    } else {
      const before = await snapshot(w.home, w.systemdDir);
      const result = await run(w, ["--data", w.data, "--user", "root", "--yes"]);
      expect(result.exitCode).toBe(1);
      expect(result.stderr).toContain("installing for root needs root");
      expect(await snapshot(w.home, w.systemdDir)).toEqual(before);
    }
  });

  it("with Moonraker running: asks once and adds the console filter \"moonflash\" beside the user's; a second run asks nothing; --uninstall removes it", async () => {
    const w = await makeWorld();
    const mainsail = { console: { consolefilters: { "user-1": { bool: true, name: "temps", regex: "^B:" } } } };
    const fake = await startFakeMoonraker({
      dataDir: w.data,
      websocket: false,
      database: { mainsail },
      klipper: {
        mcus: [
          { section: "mcu", settings: { serial: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1A0038-if00" } },
          { section: "mcu toolhead", settings: { canbus_uuid: "0123456789ab" } },
        ],
      },
    });
    try {
      // As root, so that this test's own Moonraker socket answers; the other tests cover the unprivileged install.
      const first = await run(w, ["--data", w.data, "--yes"], { env: { MOONFLASH_SKIP_NPM: "1" }, asRoot: true });
      expect(first.exitCode, first.stderr).toBe(0);
      // moonflash.conf: a commented section for each MCU of Klipper's config, before the template's examples.
      const conf = await read(join(w.config, "moonflash.conf"));
      expect(first.stdout).toContain("(commented, with a section for each MCU of Klipper's config)");
      // (The fake's MCUs report the MCU type "linux" in mcu_constants, shown after the device.)
      expect(conf).toMatch(
        new RegExp(
          [
            "#\\[mcu\\]",
            "#  \\(Klipper: serial /dev/serial/by-id/usb-Klipper_stm32f446xx_1A0038-if00(, \\w+)?\\)",
            "#method: katapult, make",
            "#",
            "#\\[mcu toolhead\\]",
            "#  \\(Klipper: canbus_uuid 0123456789ab on can0(, \\w+)?\\)",
            "#method: flashtool",
            "#",
            "# More examples:",
            "#\\[mcu\\]",
          ].join("\n"),
        ),
      );
      expect(parseConfig(conf, join(w.config, "moonflash.conf"), w.data).mcus).toEqual({});
      expect(first.stdout).toContain('added the console filter "moonflash" to Mainsail/Fluidd (reload the page)');
      const filters = (fake.database.get("mainsail") as typeof mainsail).console.consolefilters as Record<string, { name: string; regex: string }>;
      expect(Object.values(filters).map((f) => f.name).sort()).toEqual(["moonflash", "temps"]);

      // Answered by nothing on stdin: a question would be answered no and show in the output.
      const second = await run(w, ["--data", w.data], { env: { MOONFLASH_SKIP_NPM: "1" }, asRoot: true });
      expect(second.exitCode, second.stderr).toBe(0);
      expect(second.stdout).not.toContain("console filter");
      expect(Object.values((fake.database.get("mainsail") as typeof mainsail).console.consolefilters).length).toBe(2);

      const removed = await run(w, ["--uninstall", "--data", w.data, "--yes"], { asRoot: true });
      expect(removed.exitCode, removed.stderr).toBe(0);
      expect(removed.stdout).toContain('removed the console filter "moonflash" from Mainsail/Fluidd');
      expect(fake.database.get("mainsail")).toEqual(mainsail);
    } finally {
      await fake.stop();
    }
  });

  it("--help lists the options; a bad argument exits 2 and a missing data directory 1, writing nothing", async () => {
    const w = await makeWorld();
    const help = await run(w, ["--help"]);
    expect(help.exitCode).toBe(0);
    for (const word of ["--data DIR", "--user NAME", "--yes", "--uninstall", "--no-npm", "MOONFLASH_SKIP_NPM=1", "MOONFLASH_SYSTEMD_DIR", "--help"]) expect(help.stdout).toContain(word);

    const before = await snapshot(w.home, w.systemdDir);
    const bad = await run(w, ["--data", w.data, "--frobnicate"]);
    expect(bad.exitCode).toBe(2);
    expect(bad.stderr).toContain("unknown argument: --frobnicate");
    expect((await run(w, ["--data"])).exitCode).toBe(2);
    const missing = await run(w, ["--data", join(w.root, "no-such-printer_data"), "--yes", "--no-npm"]);
    expect(missing.exitCode).toBe(1);
    expect(missing.stderr).toContain("no printer data directory at");
    expect(await snapshot(w.home, w.systemdDir)).toEqual(before);
    expect(await calls(w)).toEqual([]);
  });
});
