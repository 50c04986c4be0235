// The firmware store on real files in a temp dir: the last three images per MCU, identical images deduplicated,
// everything readable by a new store (a restart), damage confined to the entry it hits, the old last.bin layout
// taken over.

import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, readFile, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { deflateSync } from "node:zlib";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { FirmwareStore, IMAGES_KEPT, sha256Of } from "../../src/flash/firmware-store.js";

/** A Klipper image: firmware bytes with the zlib-compressed data dictionary in them (scripts/buildcommands.py). */
function klipperImage(version: string, mcu = "stm32f103xe"): Buffer {
  return Buffer.concat([randomBytes(2000), deflateSync(JSON.stringify({ version, config: { MCU: mcu } })), randomBytes(500)]);
}

let root: string;
let store: FirmwareStore;

beforeEach(async () => {
  root = join(await mkdtemp(join(tmpdir(), "moonflash-store-")), "firmware");
  store = new FirmwareStore(root);
});

afterEach(async () => {
  await rm(join(root, ".."), { recursive: true, force: true });
});

const versions = async (mcu = "mcu toolhead", s = store) => (await s.list(mcu)).map((e) => e.version);
const filesIn = async (mcu = "mcu_toolhead") => (await readdir(join(root, mcu))).sort();

describe("FirmwareStore", () => {
  it("keeps the last three images per MCU, newest first, with version, size, SHA-256, date and source", async () => {
    const images = ["v0.12.0-1", "v0.12.0-2", "v0.13.0-1", "v0.13.0-2"].map((v) => klipperImage(v));
    for (const [i, image] of images.entries()) {
      await store.add("mcu toolhead", image, { source: "flash", sourcePath: `/home/pi/fw${i}.bin`, date: new Date(Date.UTC(2025, 0, 1 + i)) });
    }
    expect(IMAGES_KEPT).toBe(3);
    const list = await store.list("mcu toolhead");
    expect(list.map((e) => e.version)).toEqual(["v0.13.0-2", "v0.13.0-1", "v0.12.0-2"]);
    expect(list[0]).toEqual({
      mcu: "mcu toolhead",
      sha256: sha256Of(images[3]!),
      size: images[3]!.length,
      version: "v0.13.0-2",
      mcu_type: "stm32f103xe",
      date: "2025-01-04T00:00:00.000Z",
      source: "flash",
      source_path: "/home/pi/fw3.bin",
      file: join(root, "mcu_toolhead", `${sha256Of(images[3]!)}.bin`),
      seq: 4,
    });
    expect((await readFile(list[2]!.file)).equals(images[1]!)).toBe(true);
    // The oldest is gone from disk, bytes and description.
    expect(await filesIn()).toEqual(images.slice(1).flatMap((i) => [`${sha256Of(i)}.bin`, `${sha256Of(i)}.json`]).sort());
    expect((await store.current("mcu toolhead"))?.version).toBe("v0.13.0-2");
    expect((await store.previous("mcu toolhead"))?.version).toBe("v0.13.0-1");
    // Each MCU has its own three.
    await store.add("mcu", klipperImage("v0.13.0-2", "rp2040"), { source: "flash", sourcePath: "/x.bin" });
    expect(await versions("mcu")).toEqual(["v0.13.0-2"]);
    expect(await store.mcus()).toEqual(["mcu", "mcu toolhead"]);
  });

  it("an identical image flashed again moves to the front and pushes nothing out", async () => {
    const [a, b, c] = ["A", "B", "C"].map((v) => klipperImage(v));
    for (const image of [a!, b!, c!]) await store.add("mcu toolhead", image, { source: "flash", sourcePath: "/fw.bin" });
    await store.add("mcu toolhead", a!, { source: "flash", sourcePath: "/again.bin" });
    expect(await versions()).toEqual(["A", "C", "B"]);
    expect((await store.current("mcu toolhead"))?.source_path).toBe("/again.bin");
    expect(await filesIn()).toHaveLength(6);
    await store.add("mcu toolhead", a!, { source: "rollback", sourcePath: "/fw.bin" });
    expect(await versions()).toEqual(["A", "C", "B"]);
    expect((await store.current("mcu toolhead"))?.source).toBe("rollback");
  });

  it("survives a restart: a new store reads the same entries from disk", async () => {
    const a = klipperImage("v0.12.0-85");
    const b = klipperImage("v0.13.0-730");
    await store.add("mcu toolhead", a, { source: "flash", sourcePath: "/a.bin" });
    await store.add("mcu toolhead", b, { source: "flash", sourcePath: "/b.bin" });
    const before = await store.list("mcu toolhead");
    const restarted = new FirmwareStore(root);
    expect(await restarted.list("mcu toolhead")).toEqual(before);
    expect(await restarted.mcus()).toEqual(["mcu toolhead"]);
    // The description on disk is plain JSON, next to the bytes.
    const sidecar = JSON.parse(await readFile(join(root, "mcu_toolhead", `${sha256Of(b)}.json`), "utf8")) as Record<string, unknown>;
    expect(sidecar).toMatchObject({ format: 1, mcu: "mcu toolhead", version: "v0.13.0-730", size: b.length, source: "flash", source_path: "/b.bin", seq: 2 });
    // The next add continues the order.
    await restarted.add("mcu toolhead", a, { source: "rollback", sourcePath: "/a.bin" });
    expect(await versions("mcu toolhead", restarted)).toEqual(["v0.12.0-85", "v0.13.0-730"]);
  });

  it("a damaged description costs only its own entry; a missing or cut image is flagged, not flashed", async () => {
    const [a, b, c] = ["A", "B", "C"].map((v) => klipperImage(v));
    for (const image of [a!, b!, c!]) await store.add("mcu toolhead", image, { source: "flash", sourcePath: "/fw.bin" });
    await writeFile(join(root, "mcu_toolhead", `${sha256Of(c!)}.json`), "{ not json");
    await rm(join(root, "mcu_toolhead", `${sha256Of(b!)}.bin`));
    await truncate(join(root, "mcu_toolhead", `${sha256Of(a!)}.bin`), 100);
    const list = await store.list("mcu toolhead");
    expect(list.map((e) => [e.version, e.damaged])).toEqual([
      ["B", "the stored image file is missing"],
      ["A", `the stored image has 100 bytes instead of ${a!.length}`],
    ]);
    // An empty or missing store is no error.
    expect(await store.list("mcu nowhere")).toEqual([]);
    expect(await new FirmwareStore(join(root, "absent")).mcus()).toEqual([]);
    // Adding again repairs what it can: D is newest; C's blob without a readable entry is swept.
    const d = klipperImage("D");
    await store.add("mcu toolhead", d, { source: "flash", sourcePath: "/d.bin" });
    expect((await store.list("mcu toolhead")).map((e) => e.version)).toEqual(["D", "B", "A"]);
    expect(existsSync(join(root, "mcu_toolhead", `${sha256Of(c!)}.bin`))).toBe(false);
  });

  it("sweeps an image staged for a flash that never finished, on the next add", async () => {
    const failed = klipperImage("failed");
    const staged = await store.stage("mcu toolhead", failed);
    expect((await readFile(staged)).equals(failed)).toBe(true);
    expect(await store.list("mcu toolhead")).toEqual([]);
    await store.add("mcu toolhead", klipperImage("ok"), { source: "flash", sourcePath: "/ok.bin" });
    expect(existsSync(staged)).toBe(false);
    expect(await versions()).toEqual(["ok"]);
  });

  it("takes an image read back from the board (no source file) and one without a Klipper dictionary", async () => {
    const raw = randomBytes(4096);
    await store.add("mcu", raw, { source: "read-back" });
    expect(await store.list("mcu")).toEqual([expect.objectContaining({ source: "read-back", source_path: null, version: null, mcu_type: null, size: 4096 })]);
  });

  it("takes over the old layout (last.bin + last.json) as the oldest entry, and drops it when it is damaged", async () => {
    const dir = join(root, "mcu_toolhead");
    await mkdir(dir, { recursive: true });
    const old = klipperImage("v0.12.0-85");
    await writeFile(join(dir, "last.bin"), old);
    await writeFile(join(dir, "last.json"), JSON.stringify({ sha256: sha256Of(old), size: old.length, date: "2024-12-01T10:00:00.000Z", source: "/home/pi/klipper/out/klipper.bin" }));
    expect(await store.list("mcu toolhead")).toEqual([
      expect.objectContaining({ version: "v0.12.0-85", source: "flash", source_path: "/home/pi/klipper/out/klipper.bin", file: join(dir, "last.bin"), seq: 0 }),
    ]);
    expect(await store.mcus()).toEqual(["mcu toolhead"]);
    await store.add("mcu toolhead", klipperImage("v0.13.0-730"), { source: "flash", sourcePath: "/new.bin" });
    const list = await store.list("mcu toolhead");
    expect(list.map((e) => e.version)).toEqual(["v0.13.0-730", "v0.12.0-85"]);
    expect(list[1]).toMatchObject({ file: join(dir, `${sha256Of(old)}.bin`), date: "2024-12-01T10:00:00.000Z" });
    expect(existsSync(join(dir, "last.bin")) || existsSync(join(dir, "last.json"))).toBe(false);
    expect((await readFile(list[1]!.file)).equals(old)).toBe(true);

    // A last.bin that is not what its last.json says is not an image anyone can trust: ignored, then removed.
    const other = join(root, "mcu");
    await mkdir(other, { recursive: true });
    await writeFile(join(other, "last.bin"), randomBytes(100));
    await writeFile(join(other, "last.json"), JSON.stringify({ sha256: "0".repeat(64), size: 100, date: "2024-12-01T10:00:00.000Z", source: "/x.bin" }));
    expect(await store.list("mcu")).toEqual([]);
    await store.add("mcu", klipperImage("v1"), { source: "flash", sourcePath: "/v1.bin" });
    expect(await versions("mcu")).toEqual(["v1"]);
    expect((await readdir(other)).filter((n) => n.startsWith("last."))).toEqual([]);
  });
});
