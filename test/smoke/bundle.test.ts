// What a printer runs after `git pull`: the committed bundle, not src/. `node dist/moonflash.mjs serve` as a real
// child process against the fake Moonraker's unix socket, with the node options of package.json's `start` (what the
// service runs: --lite-mode has no JIT and no WebAssembly, so a dependency that needs them fails here); it must
// register, answer through Moonraker, and stop cleanly on SIGTERM (what systemd sends).

import { afterEach, beforeEach, expect, it } from "vitest";
import { cp, mkdtemp, mkdir, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { execa, type ResultPromise } from "execa";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";

const repo = resolve(import.meta.dirname, "../..");
let dir: string;
let data: string;
let moonraker: FakeMoonraker;
let child: ResultPromise | null = null;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-smoke-"));
  data = join(dir, "printer_data");
  await mkdir(join(data, "config"), { recursive: true });
  moonraker = await startFakeMoonraker({ dataDir: data });
});

afterEach(async () => {
  if (child && child.exitCode === null) {
    child.kill("SIGKILL");
    await child;
  }
  child = null;
  await moonraker.stop();
  await rm(dir, { recursive: true, force: true });
});

/** The node options of `npm start` (`node <options> dist/moonflash.mjs serve`), which the systemd unit runs too. */
async function serviceNodeOptions(): Promise<string[]> {
  const start = (JSON.parse(await readFile(join(repo, "package.json"), "utf8")) as { scripts: { start: string } }).scripts.start.split(/\s+/);
  expect(start[0]).toBe("node");
  expect(start.slice(-2)).toEqual(["dist/moonflash.mjs", "serve"]);
  return start.slice(1, -2);
}

/** Runs `serve` from `bundle` until it answers flash.status through Moonraker, then stops it with SIGTERM. */
async function serveOnce(bundle: string): Promise<void> {
  const { version } = JSON.parse(await readFile(join(repo, "package.json"), "utf8")) as { version: string };
  // cwd outside the checkout: a systemd unit need not set one. No --config: the data dir's defaults apply.
  child = execa("node", [...(await serviceNodeOptions()), bundle, "serve", "--data", data], { cwd: dir, reject: false, timeout: 30_000 });
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.status") || child?.exitCode !== null, 15_000);
  if (child.exitCode !== null) expect.fail(`serve exited early (${child.exitCode}):\n${String((await child).stderr)}`);
  expect(moonraker.agents()).toEqual([expect.objectContaining({ name: "moonflash", type: "agent", version })]);

  const web = await moonraker.connectClient({ transport: "unix" });
  expect(await web.call("server.extensions.request", { agent: "moonflash", method: "flash.status", arguments: {} })).toEqual({
    current: null,
    other: null,
    last: [],
    klipper_start_pending: null,
  });
  await web.close();

  child.kill("SIGTERM");
  const result = await child;
  expect({ exitCode: result.exitCode, signal: result.signal, timedOut: result.timedOut, stderr: result.stderr }).toEqual({
    exitCode: 0,
    signal: undefined,
    timedOut: false,
    stderr: "",
  });
  await moonraker.waitFor(() => moonraker.agents().length === 0, 5000);
  const log = await readFile(join(data, "logs", "moonflash.log"), "utf8");
  expect(log).toContain('"signal":"SIGTERM"');
}

it("the committed bundle serves: registers, answers flash.status through Moonraker, exits 0 on SIGTERM", async () => {
  await serveOnce(join(repo, "dist", "moonflash.mjs"));
});

it("the bundle needs from node_modules only its externals (serialport, pino-pretty, cli-progress)", async () => {
  // The bundled libraries are installed on printers too (so that npm audit sees them), which would hide a bundle
  // that quietly loads one of them from node_modules. A copy of dist/ next to a node_modules holding only the
  // externals (scripts/build.mjs's EXTERNAL) finds nothing else.
  const app = join(dir, "app");
  await cp(join(repo, "dist"), join(app, "dist"), { recursive: true });
  await mkdir(join(app, "node_modules"));
  for (const name of ["serialport", "pino-pretty", "cli-progress"]) await symlink(join(repo, "node_modules", name), join(app, "node_modules", name));
  const bundle = join(app, "dist", "moonflash.mjs");

  await serveOnce(bundle);
  // The other verbs load their own chunks; `devices` loads serialport's native binding.
  const status = await execa("node", [bundle, "status", "--data", data, "--json"], { cwd: dir, reject: false, timeout: 30_000 });
  expect(status.exitCode, status.stderr).toBe(0);
  expect(JSON.parse(status.stdout)).toMatchObject({ running: null, last: [] });
  const devices = await execa("node", [bundle, "devices", "--data", data, "--json"], { cwd: dir, reject: false, timeout: 30_000 });
  expect(devices.exitCode, devices.stderr).toBe(0);
  expect(JSON.parse(devices.stdout)).toMatchObject({ devices: expect.any(Array), mcus: expect.any(Array) });
});

it("updated as Moonraker's update_manager does it: clone, npm ci --omit=dev, serve; pull, npm ci --only=prod, serve; the tree stays clean", { timeout: 300_000 }, async () => {
  // update_manager's git_repo with enable_node_updates: git fetch + fast-forward pull, then `npm ci --only=prod`
  // when package-lock.json changed, then a restart of the service. No build step: the bundle is committed, and
  // nothing the service does may dirty the tree (a dirty tree is "not valid" and blocks every later update).
  const git = (args: string[], cwd = dir) => execa("git", ["-c", "user.name=moonflash test", "-c", "user.email=test@example.invalid", ...args], { cwd, timeout: 60_000 });
  const porcelain = async (tree: string) => (await git(["status", "--porcelain"], tree)).stdout;
  const npmCi = (tree: string, omit: string) => execa("npm", ["ci", omit, "--prefer-offline", "--no-audit", "--no-fund"], { cwd: tree, timeout: 240_000 });
  const origin = join(dir, "origin.git");
  await git(["clone", "--quiet", "--bare", repo, origin]);
  const app = join(dir, "moonflash");
  await git(["clone", "--quiet", origin, app]);

  await npmCi(app, "--omit=dev");
  await serveOnce(join(app, "dist", "moonflash.mjs"));
  expect(await porcelain(app)).toBe("");

  // Upstream moves on (a README change), the printer pulls it and runs what Moonraker runs.
  const upstream = join(dir, "upstream");
  await git(["clone", "--quiet", origin, upstream]);
  await writeFile(join(upstream, "README.md"), `${await readFile(join(upstream, "README.md"), "utf8")}\nA later upstream commit.\n`);
  await git(["commit", "--quiet", "-am", "a later upstream commit"], upstream);
  await git(["push", "--quiet", "origin", "HEAD"], upstream);
  await git(["fetch", "--quiet", "origin", "--prune"], app);
  await git(["pull", "--quiet", "--ff-only"], app);
  expect((await git(["log", "-1", "--format=%s"], app)).stdout).toBe("a later upstream commit");
  await npmCi(app, "--only=prod");
  await serveOnce(join(app, "dist", "moonflash.mjs"));
  expect(await porcelain(app)).toBe("");
});
