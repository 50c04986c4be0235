// The images flashed to each MCU, newest first, so a board can be rolled back and its version known while Klipper is
// down. One directory per MCU under <data>/moonflash/firmware/, two files per image: <sha256>.bin (the bytes) and
// <sha256>.json (what it is, where it came from, when it went on). A sidecar per image, not one index file: a torn
// or corrupt sidecar costs that one entry, never the whole history. Every write is durable (core/durable.ts) and
// each step leaves a consistent store: a blob without a sidecar is no entry (and is swept on the next add).
//
// The newest entry is what the board holds now; rollback flashes the one before. An identical image added again
// moves to the front instead of taking a place, so re-flashing the same build never pushes out older ones.
// The flash engine adds after a successful flash; a Katapult read-back of the board before its first flash and
// the OTA pipeline add with their own source.
//
// node:crypto is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

import { readdir, readFile, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import type { Logger } from "pino";
import * as z from "zod/mini";
import "../core/zod.js";
import { fsyncDir, removeDurable, writeFileDurable } from "../core/durable.js";
import { toMoonflashError } from "../core/errors.js";
import { detectImageMcu } from "./katapult/image.js";

/** How many images are kept per MCU. */
export const IMAGES_KEPT = 3;

/** How an image reached the board: a flash, a rollback, a read-back of the board itself, an OTA update. */
export const IMAGE_SOURCES = ["flash", "rollback", "read-back", "ota"] as const;
export type ImageSource = (typeof IMAGE_SOURCES)[number];

export interface ImageMeta {
  source: ImageSource;
  /** The file it was flashed from; null for a read-back. */
  sourcePath?: string | null;
  /** When it went on the board; now by default. */
  date?: Date;
}

export interface StoredImage {
  /** Klipper section: "mcu" or "mcu toolhead". */
  mcu: string;
  sha256: string;
  size: number;
  /** The Klipper version in the image's data dictionary (scripts/buildcommands.py); null when it has none. */
  version: string | null;
  /** The dictionary's config.MCU, e.g. "stm32f103xe". */
  mcu_type: string | null;
  /** ISO 8601: when it was (last) put on the board. */
  date: string;
  source: ImageSource;
  source_path: string | null;
  /** The stored copy, to flash it again. */
  file: string;
  /** Why the stored copy cannot be flashed (missing, wrong size); absent when it can. */
  damaged?: string;
  /** Order within the MCU: higher is newer. */
  seq: number;
}

const SHA256 = /^[0-9a-f]{64}$/;

const sidecarSchema = z.object({
  format: z.literal(1),
  mcu: z.string(),
  sha256: z.string().check(z.regex(SHA256)),
  size: z.number(),
  version: z.nullable(z.string()),
  mcu_type: z.nullable(z.string()),
  date: z.string(),
  source: z.enum(IMAGE_SOURCES),
  source_path: z.nullable(z.string()),
  seq: z.number(),
});

// The layout before this store: FlashEngine.keepImage wrote last.bin and last.json, before the flash.
const legacySchema = z.object({ sha256: z.string().check(z.regex(SHA256)), size: z.number(), date: z.string(), source: z.string() });

export function sha256Of(data: Uint8Array): string {
  return process.getBuiltinModule("node:crypto").createHash("sha256").update(data).digest("hex");
}

/** The directory name of a section: "mcu toolhead" → "mcu_toolhead" (as the flash engine has always named it). */
export function storeDirName(section: string): string {
  return section.trim().replace(/\s+/g, "_");
}

const isMissing = (err: unknown): boolean => (err as NodeJS.ErrnoException).code === "ENOENT";

export class FirmwareStore {
  constructor(
    /** <data>/moonflash/firmware */
    readonly root: string,
    private readonly logger?: Logger,
  ) {}

  dir(mcu: string): string {
    return join(this.root, storeDirName(mcu));
  }

  /**
   * Writes the image's bytes before a flash, so a full disk is found while Klipper still runs. Not an entry
   * yet: add() makes it one once the flash succeeded; a blob nothing refers to is swept by the next add().
   */
  async stage(mcu: string, image: Uint8Array): Promise<string> {
    const file = join(this.dir(mcu), `${sha256Of(image)}.bin`);
    if (!(await sameBytes(file, image))) await writeFileDurable(file, image);
    return file;
  }

  /** Records that `image` is now on the board; returns its entry. Keeps the newest IMAGES_KEPT. */
  async add(mcu: string, image: Uint8Array, meta: ImageMeta): Promise<StoredImage> {
    const dir = this.dir(mcu);
    await this.migrateLegacy(mcu);
    const sha256 = sha256Of(image);
    const before = await this.list(mcu);
    const file = await this.stage(mcu, image);
    const detected = detectImageMcu(image);
    const entry: StoredImage = {
      mcu,
      sha256,
      size: image.length,
      version: detected?.version ?? null,
      mcu_type: detected?.mcu ?? null,
      date: (meta.date ?? new Date()).toISOString(),
      source: meta.source,
      source_path: meta.sourcePath ?? null,
      file,
      seq: Math.max(0, ...before.map((e) => e.seq)) + 1,
    };
    await writeFileDurable(join(dir, `${sha256}.json`), sidecarText(entry));
    await this.prune(mcu, [entry, ...before.filter((e) => e.sha256 !== sha256)]);
    return entry;
  }

  /** The MCU's images, newest first; entries whose stored copy is gone or cut short say so in `damaged`. */
  async list(mcu: string): Promise<StoredImage[]> {
    return this.listIn(this.dir(mcu), mcu);
  }

  private async listIn(dir: string, mcu: string): Promise<StoredImage[]> {
    let names: string[];
    try {
      names = await readdir(dir);
    } catch (err) {
      if (isMissing(err) || (err as NodeJS.ErrnoException).code === "ENOTDIR") return [];
      throw toMoonflashError(err);
    }
    const entries: StoredImage[] = [];
    for (const name of names) {
      const sha = /^([0-9a-f]{64})\.json$/.exec(name)?.[1];
      if (!sha) continue;
      const entry = await this.readSidecar(join(dir, name), sha);
      if (entry) entries.push(entry);
    }
    const legacy = await readLegacy(dir, mcu);
    if (legacy && !entries.some((e) => e.sha256 === legacy.sha256)) entries.push(legacy);
    return entries.sort((a, b) => b.seq - a.seq);
  }

  /** What the board holds now, as far as moonflash knows: the newest entry. */
  async current(mcu: string): Promise<StoredImage | null> {
    return (await this.list(mcu))[0] ?? null;
  }

  /** The image a rollback flashes: the one before the newest. */
  async previous(mcu: string): Promise<StoredImage | null> {
    return (await this.list(mcu))[1] ?? null;
  }

  /** Sections with at least one entry. */
  async mcus(): Promise<string[]> {
    let dirs: string[];
    try {
      dirs = await readdir(this.root);
    } catch (err) {
      if (isMissing(err)) return [];
      throw toMoonflashError(err);
    }
    const sections = new Set<string>();
    for (const name of dirs) {
      // The section as the sidecars spell it; a legacy-only directory by its name ("mcu_toolhead" → "mcu toolhead").
      const first = (await this.listIn(join(this.root, name), name.replace(/_/g, " ")))[0];
      if (first) sections.add(first.mcu);
    }
    return [...sections].sort();
  }

  private async readSidecar(path: string, sha: string): Promise<StoredImage | null> {
    let parsed: z.infer<typeof sidecarSchema>;
    try {
      const result = sidecarSchema.safeParse(JSON.parse(await readFile(path, "utf8")));
      if (!result.success || result.data.sha256 !== sha) throw new Error(result.success ? "its sha256 is not its name" : result.error.message);
      parsed = result.data;
    } catch (err) {
      if (isMissing(err)) return null;
      // Written durably, so this is damage from outside; that entry is lost, the others stand.
      this.logger?.warn({ err, path }, "a stored firmware entry is unreadable; ignoring it");
      return null;
    }
    const { format: _format, ...fields } = parsed;
    const file = path.replace(/\.json$/, ".bin");
    const entry: StoredImage = { ...fields, file };
    const damaged = await damage(file, parsed.size);
    if (damaged) entry.damaged = damaged;
    return entry;
  }

  /** Turns last.bin + last.json into an entry of this store (or removes them when they are unusable). */
  private async migrateLegacy(mcu: string): Promise<void> {
    const dir = this.dir(mcu);
    const legacyMeta = join(dir, "last.json");
    const legacyBin = join(dir, "last.bin");
    try {
      await stat(legacyMeta);
    } catch {
      try {
        await stat(legacyBin);
      } catch {
        return;
      }
    }
    const legacy = await readLegacy(dir, mcu);
    const known = legacy ? await stat(join(dir, `${legacy.sha256}.json`)).then(() => true, () => false) : false;
    if (legacy && !known) {
      const file = join(dir, `${legacy.sha256}.bin`);
      await rename(legacyBin, file);
      await fsyncDir(dir);
      await writeFileDurable(join(dir, `${legacy.sha256}.json`), sidecarText({ ...legacy, file }));
      this.logger?.info({ mcu, sha256: legacy.sha256 }, "moved the image kept by an older moonflash into the firmware store");
    } else if (!legacy) {
      this.logger?.warn({ mcu, dir }, "the image kept by an older moonflash is incomplete or damaged; removing it");
    }
    await removeDurable(legacyMeta);
    await removeDurable(legacyBin);
  }

  /** Keeps the newest IMAGES_KEPT entries; removes the rest and any blob no entry refers to (a failed flash's). */
  private async prune(mcu: string, newestFirst: StoredImage[]): Promise<void> {
    const dir = this.dir(mcu);
    const kept = new Set(newestFirst.slice(0, IMAGES_KEPT).map((e) => e.sha256));
    // Sidecar first: a crash between the two leaves a blob without an entry, which the next prune sweeps.
    for (const old of newestFirst.slice(IMAGES_KEPT)) await removeDurable(join(dir, `${old.sha256}.json`));
    for (const name of await readdir(dir)) {
      const sha = /^([0-9a-f]{64})\.bin$/.exec(name)?.[1];
      if (sha && !kept.has(sha)) await rm(join(dir, name), { force: true });
      // Temp files of a write that died mid-way (core/durable.ts names them .<name>.<pid>.<random>.tmp).
      if (/^\..+\.tmp$/.test(name)) await rm(join(dir, name), { force: true });
    }
    await fsyncDir(dir);
  }
}

/** last.bin + last.json from before this store, as the oldest entry (seq 0); null when absent or unusable. */
async function readLegacy(dir: string, mcu: string): Promise<StoredImage | null> {
  let meta: z.infer<typeof legacySchema>;
  try {
    const result = legacySchema.safeParse(JSON.parse(await readFile(join(dir, "last.json"), "utf8")));
    if (!result.success) return null;
    meta = result.data;
  } catch {
    return null;
  }
  const file = join(dir, "last.bin");
  let image: Buffer;
  try {
    image = await readFile(file);
  } catch {
    return null;
  }
  // It was kept before its flash, whose outcome it does not record; the bytes must at least be what it says.
  if (sha256Of(image) !== meta.sha256) return null;
  const detected = detectImageMcu(image);
  return {
    mcu,
    sha256: meta.sha256,
    size: image.length,
    version: detected?.version ?? null,
    mcu_type: detected?.mcu ?? null,
    date: meta.date,
    source: "flash",
    source_path: meta.source,
    file,
    seq: 0,
  };
}

function sidecarText(entry: StoredImage): string {
  const { file: _file, damaged: _damaged, ...fields } = entry;
  return `${JSON.stringify({ format: 1, ...fields }, null, 2)}\n`;
}

/** Why the stored copy cannot be flashed as recorded, or null when it can (its SHA-256 is checked when it is read to flash). */
async function damage(file: string, size: number): Promise<string | null> {
  try {
    const s = await stat(file);
    return s.size === size ? null : `the stored image has ${s.size} bytes instead of ${size}`;
  } catch (err) {
    if (isMissing(err)) return "the stored image file is missing";
    return `the stored image cannot be read (${(err as NodeJS.ErrnoException).code ?? String(err)})`;
  }
}

async function sameBytes(file: string, image: Uint8Array): Promise<boolean> {
  try {
    const existing = await readFile(file);
    return existing.equals(image);
  } catch {
    return false;
  }
}
