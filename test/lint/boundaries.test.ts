// The design's boundaries are lint rules (eslint.config.mjs). Each forbidden edge is linted as if it were written
// in the folder it is forbidden in, and must be refused; the allowed ones must pass; the tree itself is clean.

import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { ESLint } from "eslint";
import { describe, expect, it } from "vitest";

const repo = resolve(import.meta.dirname, "../..");
const eslint = new ESLint({ cwd: repo });

async function restrictedImports(filePath: string, code: string): Promise<string[]> {
  const [result] = await eslint.lintText(code, { filePath: resolve(repo, filePath) });
  return (result?.messages ?? []).filter((m) => m.ruleId === "no-restricted-imports").map((m) => m.message);
}

const forbidden: Array<[from: string, importPath: string]> = [
  ["src/core/jobs.ts", "../flash/engine.js"],
  ["src/core/jobs.ts", "../ota/engine.js"],
  ["src/core/jobs.ts", "../moonraker/session.js"],
  ["src/core/jobs.ts", "../agent/agent.js"],
  ["src/core/jobs.ts", "../cli/main.js"],
  ["src/core/jobs.ts", "../app.js"],
  ["src/core/jobs.ts", "../moonflash-conf.js"],
  ["src/flash/engine.ts", "../moonraker/session.js"],
  ["src/flash/katapult/flasher.ts", "../../agent/progress.js"],
  ["src/flash/engine.ts", "../cli/render.js"],
  ["src/flash/engine.ts", "../ota/engine.js"],
  ["src/flash/engine.ts", "../app.js"],
  ["src/ota/engine.ts", "../moonraker/session.js"],
  ["src/ota/engine.ts", "../agent/agent.js"],
  ["src/ota/engine.ts", "../cli/main.js"],
  ["src/moonraker/session.ts", "../flash/engine.js"],
  ["src/moonraker/session.ts", "../agent/agent.js"],
  ["src/sim/virtual-device.ts", "../moonraker/session.js"],
  ["src/agent/agent.ts", "../cli/main.js"],
  ["src/agent/agent.ts", "../app.js"],
  ["src/status/page-server.ts", "../moonraker/session.js"],
  ["src/status/page-server.ts", "../agent/agent.js"],
  ["src/status/page-server.ts", "../cli/main.js"],
  ["src/status/page-server.ts", "../ota/engine.js"],
  ["src/status/page-server.ts", "../flash/engine.js"],
  ["src/status/page-server.ts", "../flash/update-all.js"],
  ["src/status/page-server.ts", "../app.js"],
  ["src/status/page-server.ts", "../moonflash-conf.js"],
  ["src/status/page-server.ts", "node:child_process"],
];

const allowed: Array<[from: string, importPath: string]> = [
  ["src/flash/engine.ts", "../core/jobs.js"],
  ["src/ota/engine.ts", "../flash/engine.js"],
  ["src/agent/agent.ts", "../flash/engine.js"],
  ["src/agent/agent.ts", "../moonraker/session.js"],
  ["src/app.ts", "./agent/agent.js"],
  ["src/cli/main.ts", "../app.js"],
  ["src/status/view.ts", "../core/jobs.js"],
  ["src/status/view.ts", "../flash/mcu-name.js"],
  ["src/status/page-server.ts", "node:http"],
];

describe("import boundaries", () => {
  it.each(forbidden)("%s may not import %s", async (from, importPath) => {
    expect(await restrictedImports(from, `import * as m from "${importPath}";\nexport { m };\n`)).toHaveLength(1);
  });

  it.each(allowed)("%s may import %s", async (from, importPath) => {
    expect(await restrictedImports(from, `import * as m from "${importPath}";\nexport { m };\n`)).toEqual([]);
  });

  it("the fixture (core importing the flash engine) is refused when it stands in src/core", async () => {
    const fixture = readFileSync(resolve(repo, "test/lint/fixtures/core-imports-flash.ts"), "utf8");
    const messages = await restrictedImports("src/core/config-values.ts", fixture);
    expect(messages).toEqual([expect.stringContaining("core knows no engine")]);
  });

  it("the tree itself has no boundary violation", async () => {
    const results = await eslint.lintFiles(["src/**/*.ts"]);
    const violations = results.flatMap((r) => r.messages.filter((m) => m.ruleId === "no-restricted-imports").map((m) => `${r.filePath}:${m.line} ${m.message}`));
    expect(violations).toEqual([]);
  });
});
