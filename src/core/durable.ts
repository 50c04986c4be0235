// Durable file writes: temp file, fsync, rename, fsync the directory, so a power cut leaves either the old or
// the new content, never a torn file.

import { open, rename, rm, mkdir } from "node:fs/promises";
import { dirname, basename, join } from "node:path";
import { toMoonflashError } from "./errors.js";
// node:crypto is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

export async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Called between the steps of a durable write: the OTA crash matrix kills the process there (src/ota/state.ts). */
export interface DurableWriteSteps {
  /** The temp file is written and fsynced; the rename comes next. */
  written?(): void;
  /** The temp file is renamed into place; the directory's fsync comes next. */
  renamed?(): void;
}

export async function writeFileDurable(path: string, data: string | Uint8Array, mode = 0o644, steps: DurableWriteSteps = {}): Promise<void> {
  const dir = dirname(path);
  await mkdir(dir, { recursive: true });
  const tmp = join(dir, `.${basename(path)}.${process.pid}.${process.getBuiltinModule("node:crypto").randomBytes(4).toString("hex")}.tmp`);
  try {
    const handle = await open(tmp, "w", mode);
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    steps.written?.();
    await rename(tmp, path);
    steps.renamed?.();
    await fsyncDir(dir);
  } catch (err) {
    await rm(tmp, { force: true });
    throw toMoonflashError(err);
  }
}

/** Removes a file and makes the removal durable. Missing files are fine. */
export async function removeDurable(path: string): Promise<void> {
  await rm(path, { force: true });
  await fsyncDir(dirname(path));
}
