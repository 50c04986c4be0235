// scripts/record-moonraker.ts run as `npm run record:moonraker` runs it (tsx, a child process) against the fake
// configured like the recording rig, over real websockets: what it records from the fake must match the committed
// recording of the real Moonraker under the replay's comparison, file by file and line by line.
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { execa } from "execa";
import { afterEach, describe, expect, it } from "vitest";
import { startFakeMoonraker } from "../support/fake-moonraker/index.js";
import { compareMessages, fixtureFiles, loadScenario, rigFakeOptions } from "./recorded-traffic.js";

const repoRoot = path.resolve(import.meta.dirname, "../..");
const TSX = path.join(repoRoot, "node_modules/.bin/tsx");
const RECORDER = path.join(repoRoot, "scripts/record-moonraker.ts");

describe("scripts/record-moonraker.ts", () => {
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });

  async function tempDir(prefix: string): Promise<string> {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
    cleanups.push(() => fs.rm(dir, { recursive: true, force: true }));
    return dir;
  }

  async function rigFake() {
    const fake = await startFakeMoonraker(rigFakeOptions(await tempDir("moonflash-recorder-fake-")));
    cleanups.push(() => fake.stop());
    return fake;
  }

  const record = (args: string[]) => execa(TSX, [RECORDER, ...args], { cwd: repoRoot, timeout: 150_000, reject: false });

  it("records from the fake what it recorded from the real Moonraker", { timeout: 180_000 }, async () => {
    const fake = await rigFake();
    const out = await tempDir("moonflash-recorder-out-");
    const run = await record(["--url", fake.wsUrl, "--out", out]);
    expect(run.exitCode, run.stderr).toBe(0);
    expect(run.stdout).toContain("Moonraker v0.10.0-31-gd5ee171 (API 1.5.0), Klipper v0.13.0-730-g84104bbbd");

    expect((await fs.readdir(out)).sort()).toEqual(["README.md", ...fixtureFiles].sort());
    for (const file of fixtureFiles) {
      const real = loadScenario(file);
      const fromFake = loadScenario(file, out);
      expect(fromFake.map((l) => `${l.conn} ${l.dir}`), file).toEqual(real.map((l) => `${l.conn} ${l.dir}`));
      const problems = real.flatMap((line, i) =>
        compareMessages(line.msg, fromFake[i]?.msg).map((p) => `${file} line ${i + 1}: ${p}`),
      );
      expect(problems).toEqual([]);
    }
    const readme = await fs.readFile(path.join(out, "README.md"), "utf8");
    expect(readme).toContain(`by \`npm run record:moonraker -- --url ${fake.wsUrl} --out ${out}\``);
    expect(readme).toContain("Moonraker `v0.10.0-31-gd5ee171`");
  });

  it("refuses to record while an agent is connected, and writes nothing", async () => {
    const fake = await rigFake();
    const agent = await fake.connectClient({ transport: "unix", name: "moonflash", type: "agent" });
    cleanups.push(() => agent.close());
    const out = await tempDir("moonflash-recorder-out-");
    const run = await record(["--url", fake.wsUrl, "--out", out]);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toContain("agent(s) connected: moonflash");
    expect(await fs.readdir(out)).toEqual([]);
  });

  it("exits 2 with its usage when --url or --out is missing, or a scenario is unknown", async () => {
    const missing = await record(["--out", "/nonexistent"]);
    expect(missing.exitCode).toBe(2);
    expect(missing.stderr).toContain("usage: npm run record:moonraker -- --url ws://HOST:7125/websocket --out DIR");
    const unknown = await record(["--url", "ws://127.0.0.1:1/websocket", "--out", "/nonexistent", "--scenario", "nope"]);
    expect(unknown.exitCode).toBe(2);
    expect(unknown.stderr).toContain("unknown scenario(s): nope");
  });
});
