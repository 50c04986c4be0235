// The repository must stand on its own: a user's clone has no sibling "shared" directory, so no source, test,
// script, doc or CI file may read from it or point a reader at it (cite upstream files or docs/ instead).
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";

const repoRoot = path.resolve(import.meta.dirname, "../..");
const SCANNED = ["src", "test", "scripts", "docs", "bench", "demo", ".ci", "README.md"];
// Built from parts so that this file does not match itself.
const FORBIDDEN = [["..", "shared"].join("/"), ["shared", "fixtures"].join("/"), ["shared", "reference"].join("/")];

/** Every line under `root`'s scanned entries that mentions a forbidden path, as "file:line: text". */
async function findMentions(root: string): Promise<string[]> {
  const found: string[] = [];
  const visit = async (rel: string): Promise<void> => {
    const abs = path.join(root, rel);
    const stat = await fs.lstat(abs).catch(() => null);
    if (stat === null || stat.isSymbolicLink()) return;
    if (stat.isDirectory()) {
      for (const entry of (await fs.readdir(abs)).sort()) await visit(path.join(rel, entry));
      return;
    }
    const content = await fs.readFile(abs);
    if (content.includes(0)) return; // binary
    content
      .toString("utf8")
      .split("\n")
      .forEach((line, i) => {
        if (FORBIDDEN.some((needle) => line.includes(needle))) found.push(`${rel}:${i + 1}: ${line.trim()}`);
      });
  };
  for (const entry of SCANNED) await visit(entry);
  return found;
}

describe("self-contained repository", () => {
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0)) await cleanup();
  });

  it(`mentions none of ${FORBIDDEN.join(", ")} in ${SCANNED.join(", ")}`, async () => {
    expect(await findMentions(repoRoot)).toEqual([]);
  });

  it("reports a mention with its file and line, in nested directories and README.md", async () => {
    const root = await fs.mkdtemp(path.join(os.tmpdir(), "moonflash-self-contained-"));
    cleanups.push(() => fs.rm(root, { recursive: true, force: true }));
    await fs.mkdir(path.join(root, "test/deep/er"), { recursive: true });
    await fs.writeFile(path.join(root, "test/deep/er/a.ts"), `const ok = 1;\nconst dir = "${FORBIDDEN[0]}/x";\n`);
    await fs.writeFile(path.join(root, "README.md"), `see ${FORBIDDEN[2]}/flashing.md\n`);
    await fs.mkdir(path.join(root, "other"));
    await fs.writeFile(path.join(root, "other/b.ts"), `"${FORBIDDEN[1]}"\n`);
    expect(await findMentions(root)).toEqual([
      `test/deep/er/a.ts:2: const dir = "${FORBIDDEN[0]}/x";`,
      `README.md:1: see ${FORBIDDEN[2]}/flashing.md`,
    ]);
  });
});
