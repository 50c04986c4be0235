// The closing line CI's log reader trusts: vitest runs as a real child process on throwaway test files with the
// project's reporter, and a red run (exit code non-zero) must never close with "0 failed".

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { mkdtemp, mkdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { execa } from "execa";

const repo = resolve(import.meta.dirname, "../..");
const vitestBin = join(repo, "node_modules", "vitest", "vitest.mjs");
const reporter = join(repo, "test", "support", "summary-reporter.ts");
let root: string;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), "moonflash-reporter-"));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const PASSING = `it("passes", () => {});\n`;

/** Runs vitest on `files` (name -> source) in a directory of their own; returns its exit code and closing line. */
async function runVitest(name: string, files: Record<string, string>): Promise<{ exitCode: number | undefined; closing: string; stdout: string }> {
  const dir = join(root, name);
  await mkdir(dir);
  // globals: the files live outside the repository, where `import "vitest"` would not resolve.
  await writeFile(
    join(dir, "vitest.config.mjs"),
    `export default { test: { globals: true, include: ["*.test.js"], maxWorkers: 1, reporters: ["default", ${JSON.stringify(reporter)}] } };\n`,
  );
  for (const [file, text] of Object.entries(files)) await writeFile(join(dir, file), text);
  const result = await execa("node", [vitestBin, "run", "--root", dir, "--config", join(dir, "vitest.config.mjs")], {
    cwd: dir,
    env: { NO_COLOR: "1" },
    reject: false,
    timeout: 15_000,
  });
  const lines = result.stdout.trimEnd().split("\n");
  return { exitCode: result.exitCode, closing: lines.at(-1) ?? "", stdout: result.stdout };
}

describe.concurrent("summary reporter's closing line", () => {
  it("a green run says 0 failed and counts skipped tests", async () => {
    const run = await runVitest("green", { "a.test.js": PASSING, "b.test.js": `it("passes too", () => {});\nit.skip("skipped", () => {});\n` });
    expect(run.exitCode).toBe(0);
    expect(run.closing).toBe("2 passed, 0 failed, 1 skipped");
    expect(run.stdout).not.toContain("errors outside tests");
  });

  it("a failing test counts once", async () => {
    const run = await runVitest("failing-test", { "a.test.js": PASSING, "b.test.js": `describe("d", () => { it("fails", () => { throw new Error("no"); }); });\n` });
    expect(run.exitCode).toBe(1);
    expect(run.closing).toBe("1 passed, 1 failed, 0 skipped");
  });

  it("test files that do not load (syntax error, missing import, throw at top level) count as failures", async () => {
    const run = await runVitest("broken", {
      "a.test.js": PASSING,
      "syntax.test.js": `it("never parsed", () => {\n`,
      "import.test.js": `import "./missing.js";\nit("never collected", () => {});\n`,
      "throws.test.js": `throw new Error("at top level");\n`,
    });
    expect(run.exitCode).toBe(1);
    expect(run.closing).toBe("1 passed, 3 failed, 0 skipped");
    expect(run.stdout).toMatch(/errors outside tests: .*1 in import\.test\.js.*1 in syntax\.test\.js.*1 in throws\.test\.js/);
  });

  it("an unhandled rejection counts, although every test passed", async () => {
    const run = await runVitest("unhandled", {
      "a.test.js": `it("rejects unobserved", () => { Promise.reject(new Error("nobody waits")); });\nit("gives it time", async () => { await new Promise((r) => setTimeout(r, 50)); });\n`,
    });
    expect(run.exitCode).toBe(1);
    expect(run.closing).toBe("2 passed, 1 failed, 0 skipped");
    expect(run.stdout).toContain("1 unhandled");
  });

  it("failing beforeAll and afterAll hooks count, in a suite and at file level", async () => {
    const run = await runVitest("hooks", {
      "a.test.js": PASSING,
      "before.test.js": `describe("s", () => { beforeAll(() => { throw new Error("before"); }); it("x", () => {}); it("y", () => {}); });\n`,
      "after.test.js": `afterAll(() => { throw new Error("after"); });\nit("z", () => {});\n`,
    });
    expect(run.exitCode).toBe(1);
    // vitest skips the tests of a suite whose beforeAll failed: 2 skipped, and the hook itself is the failure.
    expect(run.closing).toBe("2 passed, 2 failed, 2 skipped");
    expect(run.stdout).toMatch(/errors outside tests: .*1 in after\.test\.js.*1 in before\.test\.js > s/);
  });
});
