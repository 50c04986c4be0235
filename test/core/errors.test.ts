// toMoonflashError for what node itself throws: ENOSPC is DISK_FULL; a chunk of the bundle that an update removed
// under the running service (a real failed import from a dist/chunks folder) says what happened and what to do.

import { describe, expect, it } from "vitest";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { toMoonflashError } from "../../src/core/errors.js";

describe("toMoonflashError", () => {
  it("a chunk of dist/ that is gone (replaced by an update): a message that says to wait for the restart", async () => {
    const dir = await mkdtemp(join(tmpdir(), "moonflash-chunks-"));
    try {
      await mkdir(join(dir, "dist", "chunks"), { recursive: true });
      // The entry imports a chunk by the name it had when it was built.
      await writeFile(join(dir, "dist", "entry.mjs"), 'export const load = () => import("./chunks/shared-a+b.mjs");\n');
      const { load } = (await import(pathToFileURL(join(dir, "dist", "entry.mjs")).href)) as { load: () => Promise<unknown> };
      const err = await load().catch((e: unknown) => e);
      expect((err as NodeJS.ErrnoException).code).toBe("ERR_MODULE_NOT_FOUND");
      expect(toMoonflashError(err)).toMatchObject({
        code: "INTERNAL",
        message: "moonflash was updated while it ran (a file it loads on first use is gone). It restarts in a moment; if not, restart it: sudo systemctl restart moonflash. Then try again.",
      });
      // Any other missing module keeps node's own message.
      const other = await import(pathToFileURL(join(dir, "elsewhere.mjs")).href).catch((e: unknown) => e);
      expect(toMoonflashError(other).message).toMatch(/Cannot find module/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("ENOSPC is DISK_FULL", () => {
    expect(toMoonflashError(Object.assign(new Error("write failed"), { code: "ENOSPC" }))).toMatchObject({ code: "DISK_FULL" });
  });
});
