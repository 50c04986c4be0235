// The OTA package format against real zip files in temp directories: a packed package round trip, signatures,
// and every hostile package we know of (zip slip, links, duplicates, extra and missing files, size limits, bombs,
// dependency problems, targets escaping their root or not writable, damaged data, damaged zips).

import { createHash } from "node:crypto";
import { chmod, lstat, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { isMoonflashError, type ErrorCode } from "../../src/core/errors.js";
import { compareVersions, parseManifest, type Manifest } from "../../src/ota/manifest.js";
import { packPackage, type ManifestInput } from "../../src/ota/pack.js";
import { DEFAULT_LIMITS, extractPackage, readPackage, resolveTargets, type PackageLimits, type ReadPackageOptions } from "../../src/ota/package.js";
import { keygen, parsePublicKey, sign, verify } from "../../src/ota/signing.js";
import { buildZip, extraField, type RawEntry } from "./support/zip-builder.js";

const isRoot = process.getuid?.() === 0;

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-ota-package-"));
});
afterEach(async () => {
  // A test may leave a read-only directory behind; make it removable again.
  await chmod(join(dir, "ro"), 0o755).catch(() => undefined);
  await rm(dir, { recursive: true, force: true });
});

const sha256 = (data: Buffer | string) => createHash("sha256").update(data).digest("hex");

/** Rejects with a MoonflashError of `code` whose message (or details.problem) matches `pattern`. */
async function expectFailure(promise: Promise<unknown>, code: ErrorCode, pattern?: RegExp): Promise<Record<string, unknown>> {
  let error: unknown;
  try {
    await promise;
  } catch (err) {
    error = err;
  }
  expect(error, "expected a failure").toBeDefined();
  if (!isMoonflashError(error)) throw error;
  expect({ code: error.code, message: error.message }).toMatchObject({ code });
  if (pattern) expect(error.message).toMatch(pattern);
  return error.details;
}

type Files = Record<string, string | Buffer>;

/** A manifest with one module installing `files` (src → config/src). */
function manifestFor(files: Files, more: Partial<Record<string, unknown>> = {}): Record<string, unknown> {
  return {
    name: "acme-printer",
    version: "1.2.0",
    modules: [
      {
        id: "config",
        service: "klipper",
        files: Object.entries(files).map(([src, content]) => ({ src, dst: `config/${src}`, sha256: sha256(content), size: Buffer.byteLength(content) })),
      },
    ],
    ...more,
  };
}

interface RawPackage {
  manifest?: unknown;
  files?: Files;
  /** Entries after the files, as written. */
  extra?: RawEntry[];
  signature?: string | Buffer;
}

/** Writes a package with the raw builder: manifest.json (unless null), manifest.sig, the files, extra entries. */
async function rawPackage(spec: RawPackage, name = "package.zip"): Promise<string> {
  const files = spec.files ?? {};
  const manifest = spec.manifest === undefined ? manifestFor(files) : spec.manifest;
  const entries: RawEntry[] = [];
  if (manifest !== null) {
    const bytes = Buffer.isBuffer(manifest) ? manifest : typeof manifest === "string" ? manifest : JSON.stringify(manifest, null, 2);
    entries.push({ name: "manifest.json", data: bytes });
  }
  if (spec.signature !== undefined) entries.push({ name: "manifest.sig", data: spec.signature, method: 0 });
  for (const [src, data] of Object.entries(files)) entries.push({ name: src, data });
  entries.push(...(spec.extra ?? []));
  const path = join(dir, name);
  await writeFile(path, buildZip(entries));
  return path;
}

const GOOD: Files = { "printer.cfg": "[printer]\nkinematics: corexy\n", "macros/start.cfg": "[gcode_macro START]\ngcode: G28\n" };

describe("pack → read → extract", () => {
  it("round-trips a signed package with a firmware module: hashes, sizes and modes filled in, files extracted and verified", async () => {
    const src = join(dir, "src");
    await mkdir(src);
    const firmware = Buffer.alloc(40_000);
    for (let i = 0; i < firmware.length; i++) firmware[i] = (i * 7919) & 0xff;
    await writeFile(join(src, "printer.cfg"), GOOD["printer.cfg"]!);
    await writeFile(join(src, "start.cfg"), GOOD["macros/start.cfg"]!);
    await writeFile(join(src, "hook.sh"), "#!/bin/sh\necho ok\n");
    await writeFile(join(src, "toolhead.bin"), firmware);
    const manifest: ManifestInput = {
      name: "acme-printer",
      version: "1.3.0",
      min_version: "1.0.0",
      modules: [
        {
          id: "config",
          service: "klipper",
          files: [
            { src: "config/printer.cfg", dst: "config/printer.cfg" },
            { src: "config/macros/start.cfg", dst: "config/macros/start.cfg", mode: "0640" },
            { src: "scripts/hook.sh", dst: "scripts/hook.sh", mode: 0o755 },
          ],
        },
        { id: "toolhead", type: "firmware", depends: ["config"], mcu: "toolhead", image: { src: "firmware/toolhead.bin" } },
      ],
    };
    const keys = keygen();
    const out = join(dir, "out", "acme-1.3.0.zip");
    await mkdir(join(dir, "out"));
    const packed = await packPackage({
      manifest,
      out,
      privateKey: keys.privateKey,
      files: new Map([
        ["config/printer.cfg", join(src, "printer.cfg")],
        ["config/macros/start.cfg", join(src, "start.cfg")],
        ["scripts/hook.sh", join(src, "hook.sh")],
        ["firmware/toolhead.bin", join(src, "toolhead.bin")],
      ]),
    });
    expect(packed.signature).toMatch(/^[A-Za-z0-9+/]{86}==$/);
    expect(await readdir(join(dir, "out"))).toEqual(["acme-1.3.0.zip"]); // no temp file left

    const read = await readPackage(out, { publicKey: keys.publicKey });
    expect(read.signed).toBe(true);
    expect(read.manifestBytes.equals(packed.manifestBytes)).toBe(true);
    expect(read.manifest.min_version).toBe("1.0.0");
    const [config, toolhead] = read.manifest.modules;
    expect(config?.files.map((f) => [f.src, f.size, f.sha256, f.mode])).toEqual([
      ["config/printer.cfg", Buffer.byteLength(GOOD["printer.cfg"]!), sha256(GOOD["printer.cfg"]!), 0o644],
      ["config/macros/start.cfg", Buffer.byteLength(GOOD["macros/start.cfg"]!), sha256(GOOD["macros/start.cfg"]!), 0o640],
      ["scripts/hook.sh", "#!/bin/sh\necho ok\n".length, sha256("#!/bin/sh\necho ok\n"), 0o755],
    ]);
    expect(toolhead).toMatchObject({ type: "firmware", mcu: "toolhead", depends: ["config"], image: { src: "firmware/toolhead.bin", size: 40_000, sha256: sha256(firmware) } });
    expect(read.entries.map((e) => e.name)).toEqual(["manifest.json", "manifest.sig", "config/printer.cfg", "config/macros/start.cfg", "scripts/hook.sh", "firmware/toolhead.bin"]);
    // The raw public key works as well as the PEM.
    expect((await readPackage(out, { publicKey: keys.publicKeyBase64, verifyContents: true })).signed).toBe(true);

    const staging = join(dir, "work", "staging");
    const extracted = await extractPackage(out, staging, { publicKey: keys.publicKey });
    expect(extracted.stagingDir).toBe(staging);
    expect(extracted.files.map((f) => [f.src, f.kind, f.module])).toEqual([
      ["config/printer.cfg", "file", "config"],
      ["config/macros/start.cfg", "file", "config"],
      ["scripts/hook.sh", "file", "config"],
      ["firmware/toolhead.bin", "image", "toolhead"],
    ]);
    for (const file of extracted.files) {
      const data = await readFile(file.path);
      expect(sha256(data)).toBe(file.sha256);
      expect((await stat(file.path)).mode & 0o777).toBe(file.mode);
    }
    expect((await readFile(join(staging, "firmware/toolhead.bin"))).equals(firmware)).toBe(true);
    expect((await stat(join(staging, "scripts/hook.sh"))).mode & 0o777).toBe(0o755);
    expect((await readdir(join(dir, "work"))).sort()).toEqual(["staging"]); // no .partial left
    expect((await readdir(join(staging, "config"))).sort()).toEqual(["macros", "printer.cfg"]); // no temp files

    const roots = new Map([
      ["config", join(dir, "printer_data", "config")],
      ["scripts", join(dir, "printer_data", "scripts")],
    ]);
    await mkdir(roots.get("config")!, { recursive: true });
    await writeFile(join(roots.get("config")!, "printer.cfg"), "old\n");
    const targets = await resolveTargets(read.manifest, roots);
    expect(targets.map((t) => [t.file.dst, t.target, t.exists])).toEqual([
      ["config/printer.cfg", join(dir, "printer_data/config/printer.cfg"), true],
      ["config/macros/start.cfg", join(dir, "printer_data/config/macros/start.cfg"), false],
      ["scripts/hook.sh", join(dir, "printer_data/scripts/hook.sh"), false],
    ]);
  });

  it("pack refuses a given sha256 or size that the file does not have, and files that do not match the manifest", async () => {
    await writeFile(join(dir, "a.cfg"), "a\n");
    const base = (file: Record<string, unknown>): ManifestInput => ({ name: "p", version: "1", modules: [{ id: "m", files: [{ src: "a.cfg", dst: "config/a.cfg", ...file }] }] });
    const files = new Map([["a.cfg", join(dir, "a.cfg")]]);
    const out = join(dir, "p.zip");
    await expectFailure(packPackage({ manifest: base({ sha256: sha256("b\n") }), files, out }), "SHA256_MISMATCH");
    await expectFailure(packPackage({ manifest: base({ size: 3 }), files, out }), "INVALID_MANIFEST", /is 2 bytes/);
    await expectFailure(packPackage({ manifest: base({}), files: new Map(), out }), "INVALID_PARAMS", /no file was given for it/);
    await expectFailure(packPackage({ manifest: base({}), files: new Map([...files, ["b.cfg", join(dir, "a.cfg")]]), out }), "INVALID_PARAMS", /does not list/);
    await expectFailure(packPackage({ manifest: base({ dst: "config/../a.cfg" }), files, out }), "INVALID_PACKAGE", /'\.\.' segment/);
    // Over a limit the printer enforces: the written zip is removed again.
    await expectFailure(packPackage({ manifest: base({}), files, out, limits: { maxFileBytes: 1 } }), "INVALID_PACKAGE", /over the limit of 1 per file/);
    expect(await readdir(dir)).toEqual(["a.cfg"]);
    await packPackage({ manifest: base({ mode: "0600" }), files, out });
    expect((await readPackage(out)).manifest.modules[0]?.files[0]?.mode).toBe(0o600);
  });
});

describe("pack against a printer's limits", () => {
  const PREVIOUS = "the vendor's previous package";

  it("refuses a package over a limit before writing anything, with the reader's codes, and leaves an existing zip in place", async () => {
    await writeFile(join(dir, "a.bin"), Buffer.alloc(3000, 1));
    await writeFile(join(dir, "b.bin"), Buffer.alloc(3000, 2));
    const manifest: ManifestInput = {
      name: "p", version: "1", modules: [{ id: "m", files: [{ src: "a.bin", dst: "config/a.bin" }, { src: "b.bin", dst: "config/b.bin" }] }],
    };
    const files = new Map([["a.bin", join(dir, "a.bin")], ["b.bin", join(dir, "b.bin")]]);
    const out = join(dir, "p.zip");
    await writeFile(out, PREVIOUS);
    const cases: Array<[Partial<PackageLimits>, ErrorCode, RegExp]> = [
      [{ maxFileBytes: 2999 }, "INVALID_PACKAGE", /^'a\.bin' is 3000 bytes, over the limit of 2999 per file \(file_size\), so a printer would refuse the package\. Nothing was written\.$/],
      [{ maxTotalBytes: 6000 }, "INVALID_PACKAGE", /^The package's entries add up to \d+ bytes uncompressed, over the limit of 6000 \(total_size\)/],
      [{ maxEntries: 2 }, "INVALID_PACKAGE", /^The package would have 3 entries, over the limit of 2 \(entries\)/],
      [{ maxManifestBytes: 100 }, "INVALID_MANIFEST", /^manifest\.json is \d+ bytes, over the limit of 100 \(manifest_size\)/],
    ];
    for (const [limits, code, pattern] of cases) {
      await expectFailure(packPackage({ manifest, files, out, limits }), code, pattern);
      expect(await readFile(out, "utf8")).toBe(PREVIOUS);
      expect((await readdir(dir)).sort()).toEqual(["a.bin", "b.bin", "p.zip"]);
    }
    // Within the limits the same inputs pack, replacing the old zip.
    await packPackage({ manifest, files, out, limits: { maxFileBytes: 3000, maxTotalBytes: 7000, maxEntries: 3 } });
    expect((await readPackage(out)).manifest.modules[0]?.files).toHaveLength(2);
  });

  it("checks against the printer's defaults (DEFAULT_LIMITS of the reader) when given none: a 2 MiB file deflating over 100:1 is refused and the old zip kept", async () => {
    await writeFile(join(dir, "zeros.img"), Buffer.alloc(2 * 1024 * 1024));
    const manifest: ManifestInput = { name: "p", version: "1", modules: [{ id: "m", files: [{ src: "zeros.img", dst: "config/zeros.img" }] }] };
    const files = new Map([["zeros.img", join(dir, "zeros.img")]]);
    const out = join(dir, "p.zip");
    await writeFile(out, PREVIOUS);
    // Only known once compressed: checked by reading the written temp file back, before it replaces `out`.
    const details = await expectFailure(packPackage({ manifest, files, out }), "INVALID_PACKAGE", /refused as a zip bomb/);
    expect(details.limit).toBe(DEFAULT_LIMITS.maxCompressionRatio);
    expect(await readFile(out, "utf8")).toBe(PREVIOUS);
    expect((await readdir(dir)).sort()).toEqual(["p.zip", "zeros.img"]);
    await packPackage({ manifest, files, out, limits: { maxCompressionRatio: 10_000 } });
    await readPackage(out, { limits: { maxCompressionRatio: 10_000 } });
  });
});

describe("cancelling a check or an extraction", () => {
  it("stops with CANCELLED when the signal is aborted, leaving no staging directory behind", async () => {
    const path = await rawPackage({ files: GOOD });
    const controller = new AbortController();
    controller.abort();
    await expectFailure(readPackage(path, { verifyContents: true, signal: controller.signal }), "CANCELLED", /^Checking the package was cancelled; nothing was installed\.$/);
    const staging = join(dir, "work", "staging");
    await expectFailure(extractPackage(path, staging, { signal: controller.signal }), "CANCELLED");
    await expect(lstat(staging)).rejects.toThrow(/ENOENT/);
    await expect(lstat(`${staging}.partial`)).rejects.toThrow(/ENOENT/);
    // The same package without a cancel reads and extracts.
    await extractPackage(path, staging, { signal: new AbortController().signal });
  });
});

describe("compareVersions (min_version)", () => {
  it.each([
    ["2.10.0", "2.9.0", 1],
    ["10.0", "9.99.99", 1],
    ["1.4", "1.4.0", 0],
    ["1.04", "1.4", 0],
    ["1.4.0+build.7", "1.4.0", 0],
    ["1.4.0", "1.4.0-rc.1", 1],
    ["1.4.0-rc.2", "1.4.0-rc.10", -1],
    ["1.4.0-rc", "1.4.0-rc.1", -1],
    ["1.0.0-1", "1.0.0-alpha", -1],
    ["1.0.0-alpha", "1.0.0-beta", -1],
    ["1.4.0", "1.4.x", -1],
    ["123456789012345678901.0", "123456789012345678900.9", 1],
  ] as const)("%s against %s: %i", (a, b, order) => {
    expect(Math.sign(compareVersions(a, b))).toBe(order);
    expect(Math.sign(compareVersions(b, a))).toBe(order === 0 ? 0 : -order);
  });
});

describe("signature", () => {
  const keys = keygen();
  const manifestBytes = Buffer.from(JSON.stringify(manifestFor(GOOD), null, 2));

  it("verifies a good signature with the PEM key", async () => {
    const path = await rawPackage({ manifest: manifestBytes, files: GOOD, signature: `${sign(manifestBytes, keys.privateKey)}\n` });
    expect((await readPackage(path, { publicKey: keys.publicKey })).signed).toBe(true);
  });

  it("refuses a missing manifest.sig when a key is configured", async () => {
    const path = await rawPackage({ manifest: manifestBytes, files: GOOD });
    expect(await expectFailure(readPackage(path, { publicKey: keys.publicKey }), "SIGNATURE_INVALID", /has no manifest\.sig/)).toMatchObject({ reason: "missing" });
  });

  it("refuses a signature made with another key", async () => {
    const other = keygen();
    const path = await rawPackage({ manifest: manifestBytes, files: GOOD, signature: sign(manifestBytes, other.privateKey) });
    expect(await expectFailure(readPackage(path, { publicKey: keys.publicKey }), "SIGNATURE_INVALID")).toMatchObject({ reason: "mismatch" });
  });

  it("refuses a manifest changed after signing (the same package reads without a key)", async () => {
    const signature = sign(manifestBytes, keys.privateKey);
    const tampered = Buffer.from(manifestBytes.toString().replace('"1.2.0"', '"9.9.9"'));
    expect(tampered.equals(manifestBytes)).toBe(false);
    const path = await rawPackage({ manifest: tampered, files: GOOD, signature });
    await expectFailure(readPackage(path, { publicKey: keys.publicKey }), "SIGNATURE_INVALID");
    expect((await readPackage(path)).manifest.version).toBe("9.9.9");
  });

  it("refuses a garbage manifest.sig and an oversized one when a key is configured", async () => {
    for (const signature of ["not a signature", Buffer.alloc(64, 1), "A".repeat(5000)]) {
      const path = await rawPackage({ manifest: manifestBytes, files: GOOD, signature });
      await expectFailure(readPackage(path, { publicKey: keys.publicKey }), "SIGNATURE_INVALID");
    }
  });

  it("ignores manifest.sig, good or garbage, when no key is configured", async () => {
    const garbage = await rawPackage({ manifest: manifestBytes, files: GOOD, signature: "garbage" }, "garbage.zip");
    const unsigned = await rawPackage({ manifest: manifestBytes, files: GOOD }, "unsigned.zip");
    expect((await readPackage(garbage)).signed).toBe(false);
    expect((await readPackage(unsigned, { publicKey: null })).signed).toBe(false);
  });

  it("sign and verify: a flipped manifest byte, a cut or non-canonical signature fail; bad keys are CONFIG_INVALID", () => {
    const signature = sign(manifestBytes, keys.privateKey);
    expect(verify(manifestBytes, signature, keys.publicKey)).toBe(true);
    expect(verify(manifestBytes, Buffer.from(`${signature}\n`), parsePublicKey(keys.publicKeyBase64))).toBe(true);
    const flipped = Buffer.from(manifestBytes);
    flipped[10] = flipped[10]! ^ 1;
    expect(verify(flipped, signature, keys.publicKey)).toBe(false);
    expect(verify(manifestBytes, signature.slice(0, 80), keys.publicKey)).toBe(false);
    expect(verify(manifestBytes, `${signature} junk`, keys.publicKey)).toBe(false);
    expect(() => parsePublicKey("not a key")).toThrow(expect.objectContaining({ code: "CONFIG_INVALID" }));
    const { generateKeyPairSync } = process.getBuiltinModule("node:crypto");
    const ec = generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ type: "spki", format: "pem" }).toString();
    expect(() => parsePublicKey(ec)).toThrow(expect.objectContaining({ code: "CONFIG_INVALID" }));
    expect(() => sign(manifestBytes, keys.publicKey)).toThrow(expect.objectContaining({ code: "INVALID_PARAMS" }));
  });
});

// Names an extractor could be tricked with, each with the reason it must be refused for.
const HOSTILE_NAMES: Array<[string, RegExp]> = [
  ["../evil.cfg", /'\.\.' segment/],
  ["config/../../evil.cfg", /'\.\.' segment/],
  ["config/..", /'\.\.' segment/], // trailing ..
  ["/etc/evil.cfg", /is absolute/],
  ["C:\\evil.cfg", /backslash/],
  ["C:/evil.cfg", /drive letter/],
  ["config\\..\\evil.cfg", /backslash/],
  ["config/evil\0.cfg", /NUL byte/],
  ["config//evil.cfg", /empty segment/],
  ["./evil.cfg", /'\.' segment/],
  ["config/evil\x1b[2J.cfg", /control character/],
];

describe("zip slip: entry names, src and dst", () => {
  it.each(HOSTILE_NAMES)("refuses a zip entry named %j", async (name, reason) => {
    const path = await rawPackage({ files: GOOD, extra: [{ name, data: "x" }] });
    const details = await expectFailure(readPackage(path), "INVALID_PACKAGE");
    expect(details.problem).toMatch(reason);
  });

  it.each(HOSTILE_NAMES)("refuses a manifest src %j", async (name, reason) => {
    const manifest = manifestFor(GOOD);
    (manifest.modules as Array<{ files: Array<{ src: string }> }>)[0]!.files[0]!.src = name;
    const details = await expectFailure(readPackage(await rawPackage({ manifest, files: GOOD })), "INVALID_PACKAGE");
    expect(details.problem).toMatch(reason);
  });

  it.each([
    ...HOSTILE_NAMES,
    ["config/./evil.cfg", /'\.' segment/],
    ["config", /is not '<root alias>\/<relative path>'/],
    ["config/", /empty segment/],
    ["con fig/evil.cfg", /root alias/],
  ] as Array<[string, RegExp]>)("refuses a manifest dst %j", async (dst, reason) => {
    const manifest = manifestFor(GOOD);
    (manifest.modules as Array<{ files: Array<{ dst: string }> }>)[0]!.files[0]!.dst = dst;
    const details = await expectFailure(readPackage(await rawPackage({ manifest, files: GOOD })), "INVALID_PACKAGE");
    expect(details.problem).toMatch(reason);
  });

  it("refuses a name that is not UTF-8 and a second, different name in a Unicode path field", async () => {
    const notUtf8 = await rawPackage({ files: GOOD, extra: [{ name: Buffer.from([0x61, 0xff, 0x2e, 0x63]), data: "x", flags: 0x800 }] }, "a.zip");
    expect((await expectFailure(readPackage(notUtf8), "INVALID_PACKAGE")).problem).toMatch(/not valid UTF-8/);
    const cp437 = await rawPackage({ files: GOOD, extra: [{ name: Buffer.from([0x61, 0x82]), data: "x", flags: 0 }] }, "b.zip");
    expect((await expectFailure(readPackage(cp437), "INVALID_PACKAGE")).problem).toMatch(/non-ASCII name/);
    const unicodePath = extraField(0x7075, Buffer.concat([Buffer.from([1, 0, 0, 0, 0]), Buffer.from("../evil.cfg")]));
    const twoNames = await rawPackage({ manifest: manifestFor(GOOD), files: {}, extra: [
      { name: "printer.cfg", data: GOOD["printer.cfg"]!, extra: unicodePath },
      { name: "macros/start.cfg", data: GOOD["macros/start.cfg"]! },
    ] }, "c.zip");
    expect((await expectFailure(readPackage(twoNames), "INVALID_PACKAGE")).problem).toMatch(/second name '\.\.\/evil\.cfg'/);
  });
});

describe("links and special entries", () => {
  it("refuses a symlink entry even when the manifest lists it with the right hash", async () => {
    const target = "../../../etc/passwd";
    const manifest = manifestFor({ ...GOOD, "link.cfg": target });
    const path = await rawPackage({ manifest, files: GOOD, extra: [{ name: "link.cfg", data: target, unixMode: 0o120777 }] });
    expect((await expectFailure(readPackage(path), "INVALID_PACKAGE")).problem).toBe("is a symbolic link");
  });

  it("refuses a symlinked directory followed by a file through it", async () => {
    const path = await rawPackage({ files: GOOD, extra: [{ name: "lib", data: "/etc", unixMode: 0o120777 }, { name: "lib/cron.d/evil", data: "* * * * * root sh" }] });
    expect((await expectFailure(readPackage(path), "INVALID_PACKAGE")).entry).toBe("lib");
  });

  it.each([
    ["a hard link (PKWARE Unix extra field with a link target)", { extra: extraField(0x000d, Buffer.concat([Buffer.alloc(12), Buffer.from("/etc/shadow")])) }, /hard or symbolic link/],
    ["a character device", { unixMode: 0o020644 }, /character device/],
    ["a block device", { unixMode: 0o060644 }, /block device/],
    ["a FIFO", { unixMode: 0o010644 }, /FIFO/],
    ["a socket", { unixMode: 0o140644 }, /socket/],
    ["an unknown file type", { unixMode: 0o160644 }, /unknown file type/],
    ["a Windows reparse point (DOS attributes)", { unixMode: 0, dosAttributes: 0x400, versionMadeBy: 20 }, /reparse point/],
    ["a directory mode on a file name", { unixMode: 0o040755 }, /marked as a directory/],
  ] as Array<[string, Partial<RawEntry>, RegExp]>)("refuses %s", async (_what, fields, reason) => {
    const manifest = manifestFor({ ...GOOD, "odd.cfg": "x" });
    const path = await rawPackage({ manifest, files: GOOD, extra: [{ name: "odd.cfg", data: "x", ...fields }] });
    expect((await expectFailure(readPackage(path), "INVALID_PACKAGE")).problem).toMatch(reason);
  });

  it("refuses encrypted entries and compression methods other than stored and deflate", async () => {
    const manifest = manifestFor({ ...GOOD, "odd.cfg": "x" });
    const encrypted = await rawPackage({ manifest, files: GOOD, extra: [{ name: "odd.cfg", data: "x", flags: 0x801 }] }, "a.zip");
    expect((await expectFailure(readPackage(encrypted), "INVALID_PACKAGE")).problem).toBe("is encrypted");
    const bzip2 = await rawPackage({ manifest, files: GOOD, extra: [{ name: "odd.cfg", data: "x", method: 12 }] }, "b.zip");
    expect((await expectFailure(readPackage(bzip2), "INVALID_PACKAGE")).problem).toMatch(/compression method 12/);
  });
});

describe("the zip against the manifest", () => {
  it("refuses a name that appears twice in the zip", async () => {
    const path = await rawPackage({ files: GOOD, extra: [{ name: "printer.cfg", data: "[evil]\n" }] });
    expect((await expectFailure(readPackage(path), "INVALID_PACKAGE")).problem).toBe("appears twice in the zip");
  });

  it("refuses a name that is a file and a directory", async () => {
    const path = await rawPackage({ files: { ...GOOD, macros: "x" } });
    expect(await expectFailure(readPackage(path), "INVALID_PACKAGE")).toMatchObject({ entry: "macros", problem: "is a file, but 'macros/start.cfg' needs it as a directory" });
  });

  it("refuses a file in the zip that the manifest does not list", async () => {
    const path = await rawPackage({ manifest: manifestFor(GOOD), files: GOOD, extra: [{ name: "extra.sh", data: "rm -rf ~" }] });
    expect(await expectFailure(readPackage(path), "INVALID_PACKAGE")).toMatchObject({ entry: "extra.sh", problem: "is in the zip but not in the manifest" });
  });

  it("refuses a manifest file missing from the zip, also a firmware image", async () => {
    const missing = await rawPackage({ manifest: manifestFor(GOOD), files: { "printer.cfg": GOOD["printer.cfg"]! } }, "a.zip");
    expect(await expectFailure(readPackage(missing), "INVALID_PACKAGE")).toMatchObject({ entry: "macros/start.cfg", problem: expect.stringMatching(/missing from the zip/) });
    const manifest = manifestFor(GOOD);
    (manifest.modules as unknown[]).push({ id: "mcu", type: "firmware", mcu: "mcu", image: { src: "fw.bin", sha256: sha256("fw"), size: 2 } });
    const noImage = await rawPackage({ manifest, files: GOOD }, "b.zip");
    expect(await expectFailure(readPackage(noImage), "INVALID_PACKAGE")).toMatchObject({ entry: "fw.bin", module: "mcu" });
  });

  it("refuses a file whose size in the zip differs from the manifest's", async () => {
    const manifest = manifestFor(GOOD);
    (manifest.modules as Array<{ files: Array<{ size: number }> }>)[0]!.files[0]!.size += 1;
    expect((await expectFailure(readPackage(await rawPackage({ manifest, files: GOOD })), "INVALID_PACKAGE")).problem).toMatch(/bytes in the zip but/);
  });

  it("accepts directory entries that hold manifest files, refuses one that holds none", async () => {
    const dirEntry = (name: string): RawEntry => ({ name, method: 0, unixMode: 0o040755 });
    expect((await readPackage(await rawPackage({ files: GOOD, extra: [dirEntry("macros/")] }, "a.zip"))).entries.find((e) => e.name === "macros")).toMatchObject({ kind: "directory" });
    const untyped = await rawPackage({ files: GOOD, extra: [{ ...dirEntry("macros/"), unixMode: 0 }] }, "b.zip");
    expect((await readPackage(untyped)).entries.find((e) => e.name === "macros")).toMatchObject({ kind: "directory", mode: null });
    const stray = await rawPackage({ files: GOOD, extra: [dirEntry("stray/")] }, "c.zip");
    expect((await expectFailure(readPackage(stray), "INVALID_PACKAGE")).problem).toMatch(/holds no file of the manifest/);
    const fileMode = await rawPackage({ files: GOOD, extra: [{ ...dirEntry("macros/"), unixMode: 0o100644 }] }, "d.zip");
    expect((await expectFailure(readPackage(fileMode), "INVALID_PACKAGE")).problem).toMatch(/marked as a regular file/);
  });

  it("refuses a package without manifest.json, with one that is not JSON, or one over the manifest limit", async () => {
    await expectFailure(readPackage(await rawPackage({ manifest: null, files: GOOD }, "a.zip")), "INVALID_MANIFEST", /no manifest\.json/);
    await expectFailure(readPackage(await rawPackage({ manifest: "{ name: 1", files: GOOD }, "b.zip")), "INVALID_MANIFEST", /not valid JSON/);
    await expectFailure(readPackage(await rawPackage({ manifest: Buffer.from([0x7b, 0xff, 0x7d]), files: GOOD }, "c.zip")), "INVALID_MANIFEST", /not UTF-8/);
    await expectFailure(readPackage(await rawPackage({ files: GOOD }, "d.zip"), { limits: { maxManifestBytes: 100 } }), "INVALID_MANIFEST", /over the limit of 100/);
  });
});

describe("sizes and zip bombs", () => {
  const big = { "a.bin": Buffer.alloc(2000, 1), "b.bin": Buffer.alloc(2000, 2) };

  it("refuses a file over the per-file limit", async () => {
    const path = await rawPackage({ files: big });
    await readPackage(path); // within the defaults
    expect(await expectFailure(readPackage(path, { limits: { maxFileBytes: 1999 } }), "INVALID_PACKAGE")).toMatchObject({ entry: "a.bin", size: 2000, limit: 1999 });
  });

  it("refuses files that add up to more than the total limit", async () => {
    const path = await rawPackage({ files: big });
    await readPackage(path, { limits: { maxTotalBytes: 6000 } });
    expect(await expectFailure(readPackage(path, { limits: { maxTotalBytes: 4000 } }), "INVALID_PACKAGE", /uncompressed total/)).toMatchObject({ entry: "b.bin" });
  });

  it("refuses more entries than the limit", async () => {
    const path = await rawPackage({ files: big });
    await expectFailure(readPackage(path, { limits: { maxEntries: 2 } }), "INVALID_PACKAGE", /3 entries, over the limit of 2/);
  });

  it("refuses a high compression ratio from the declared sizes (a zip bomb)", async () => {
    const zeros = Buffer.alloc(4 * 1024 * 1024);
    const path = await rawPackage({ files: { "zeros.bin": zeros } });
    const details = await expectFailure(readPackage(path), "INVALID_PACKAGE", /refused as a zip bomb/);
    expect(details.ratio).toBeGreaterThan(100);
    await readPackage(path, { limits: { maxCompressionRatio: 10_000 } }); // the ratio was the reason
  });

  it("stops inflating an entry whose header lies about its size, and leaves nothing behind", async () => {
    const bomb = Buffer.alloc(2 * 1024 * 1024);
    const manifest = manifestFor({ ...GOOD, "bomb.bin": bomb.subarray(0, 100) });
    const path = await rawPackage({ manifest, files: GOOD, extra: [{ name: "bomb.bin", data: bomb, declaredSize: 100 }] });
    expect((await readPackage(path)).entries.find((e) => e.name === "bomb.bin")?.size).toBe(100); // the header passes every check
    await expectFailure(readPackage(path, { verifyContents: true }), "INVALID_PACKAGE", /inflates to more than the 100 bytes/);
    const staging = join(dir, "work", "staging");
    await expectFailure(extractPackage(path, staging), "INVALID_PACKAGE", /inflates to more than the 100 bytes/);
    expect(await readdir(join(dir, "work"))).toEqual([]);
  });

  it("refuses a stored entry whose sizes disagree, and one with less data than declared", async () => {
    const manifest = manifestFor({ ...GOOD, "s.bin": Buffer.alloc(50) });
    const stored = await rawPackage({ manifest, files: GOOD, extra: [{ name: "s.bin", data: Buffer.alloc(10), method: 0, declaredSize: 50 }] }, "a.zip");
    await expectFailure(readPackage(stored), "INVALID_PACKAGE", /size mismatch/);
    const short = await rawPackage({ manifest, files: GOOD, extra: [{ name: "s.bin", data: Buffer.alloc(10), declaredSize: 50 }] }, "b.zip");
    await expectFailure(extractPackage(short, join(dir, "staging")), "INVALID_PACKAGE", /s\.bin/);
  });
});

describe("manifest rules", () => {
  const modules = (...list: Array<Record<string, unknown>>) => ({ name: "p", version: "1", modules: list });
  const files = [{ src: "a.cfg", dst: "config/a.cfg", sha256: sha256("a"), size: 1 }];
  const parse = (value: unknown) => parseManifest(Buffer.from(JSON.stringify(value)));
  const rejects = (value: unknown, pattern: RegExp) => {
    let error: unknown;
    try {
      parse(value);
    } catch (err) {
      error = err;
    }
    expect(error).toMatchObject({ code: "INVALID_MANIFEST", message: expect.stringMatching(pattern) });
  };

  const more = (name: string) => [{ ...files[0], src: `${name}.cfg`, dst: `config/${name}.cfg` }];

  it("refuses a dependency cycle, also a module depending on itself", () => {
    rejects(modules({ id: "a", depends: ["c"], files }, { id: "b", depends: ["a"], files: more("b") }, { id: "c", depends: ["b"], files: more("c") }), /cycle: a → c → b → a/);
    rejects(modules({ id: "a", depends: ["a"], files }), /cycle: a → a/);
  });

  it("refuses an unknown dependency, a dependency listed later and a repeated module id", () => {
    rejects(modules({ id: "a", depends: ["ghost"], files }), /depends on 'ghost', which the manifest does not define/);
    rejects(modules({ id: "a", depends: ["b"], files }, { id: "b", files: more("b") }), /comes after it/);
    rejects(modules({ id: "a", files }, { id: "a", files: more("b") }), /module id 'a' is used twice/);
  });

  it("refuses a dst written twice and a dst that another needs as a directory", () => {
    rejects(modules({ id: "a", files: [...files, { ...files[0], src: "b.cfg" }] }), /dst 'config\/a\.cfg' is written twice/);
    rejects(modules({ id: "a", files: [...files, { ...files[0], src: "b.cfg", dst: "config/a.cfg/b.cfg" }] }), /is a file, but/);
    rejects(modules({ id: "a", files: [...files, { ...files[0], dst: "config/b.cfg" }] }), /src 'a\.cfg' is listed twice/);
    rejects(modules({ id: "a", files: [{ ...files[0], src: "manifest.sig" }] }), /reserved/);
  });

  it.each([
    ["a bad sha256", { ...files[0], sha256: "abc" }, /sha256: expected 64 hex digits/],
    ["an unknown key", { ...files[0], dts: "config/x" }, /unknown key\(s\) 'dts'/],
    ["a world-writable mode", { ...files[0], mode: "0666" }, /world-writable/],
    ["setuid bits", { ...files[0], mode: 0o4755 }, /from 0 to 0777/],
    ["octal digits written as a number", { ...files[0], mode: 644 }, /did you mean "0644"/],
    ["a negative size", { ...files[0], size: -1 }, /size/],
  ])("refuses a file with %s", (_what, file, pattern) => {
    rejects(modules({ id: "a", files: [file] }), pattern);
  });

  it("refuses malformed modules and reads the mode forms", () => {
    rejects(modules({ id: "fw", type: "firmware", mcu: "toolhead" }), /firmware module needs an image/);
    rejects(modules({ id: "a", files, mcu: "toolhead" }), /only a module of type "firmware" names an mcu/);
    rejects(modules({ id: "a", files, service: "klipper", process: { name: "klippy" } }), /service or process, not both/);
    rejects(modules({ id: "a", files, process: { pidfile: "run/klipper.pid" } }), /absolute path/);
    rejects(modules({ id: "a", files: [] }), /at least one file/);
    rejects(modules(), /at least one module/);
    rejects({ ...modules({ id: "a", files }), version: "" }, /version/);
    const modes = [420, "0755", "640", "0o600"].map((mode) => (parse(modules({ id: "a", files: [{ ...files[0], mode }] })) as Manifest).modules[0]?.files[0]?.mode);
    expect(modes).toEqual([0o644, 0o755, 0o640, 0o600]);
  });
});

describe("targets on disk", () => {
  const manifestWith = (...dsts: string[]): Manifest =>
    parseManifest(Buffer.from(JSON.stringify({ name: "p", version: "1", modules: [{ id: "m", files: dsts.map((dst, i) => ({ src: `f${i}`, dst, sha256: sha256(""), size: 0 })) }] })));

  it("refuses a root alias that [ota] roots does not define", async () => {
    const details = await expectFailure(resolveTargets(manifestWith("klipper/klippy/extra.py"), new Map([["config", dir]])), "INVALID_MANIFEST", /defines no root 'klipper' \(defined: config\)/);
    expect(details).toMatchObject({ alias: "klipper" });
  });

  it("refuses two dsts that land on one file after resolution: two aliases, and an alias through a symlink", async () => {
    await mkdir(join(dir, "a"));
    await expectFailure(resolveTargets(manifestWith("one/x.cfg", "two/x.cfg"), new Map([["one", join(dir, "a")], ["two", join(dir, "a")]])), "INVALID_MANIFEST", /both go to/);
    await symlink(join(dir, "a"), join(dir, "b"));
    await expectFailure(resolveTargets(manifestWith("one/x.cfg", "two/x.cfg"), new Map([["one", join(dir, "a")], ["two", join(dir, "b")]])), "INVALID_MANIFEST", /both go to/);
    await expectFailure(resolveTargets(manifestWith("one/x", "two/x/y.cfg"), new Map([["one", join(dir, "a")], ["two", join(dir, "b")]])), "INVALID_MANIFEST", /is a file, but/);
  });

  it("refuses a directory in the root that is a symlink leading out of it", async () => {
    await mkdir(join(dir, "root"));
    await mkdir(join(dir, "outside"));
    await symlink(join(dir, "outside"), join(dir, "root", "escape"));
    const details = await expectFailure(resolveTargets(manifestWith("config/escape/x.cfg"), new Map([["config", join(dir, "root")]])), "PATH_REJECTED", /outside its root/);
    expect(details.target).toBe(join(dir, "outside", "x.cfg"));
    // Deeper and not existing yet: the deepest existing parent is resolved.
    await expectFailure(resolveTargets(manifestWith("config/escape/new/dir/x.cfg"), new Map([["config", join(dir, "root")]])), "PATH_REJECTED", /outside its root/);
  });

  it("refuses a symlink to a sibling whose name starts with the root's (/opt/app → /opt/app_evil)", async () => {
    await mkdir(join(dir, "app"));
    await mkdir(join(dir, "app_evil"));
    await symlink(join(dir, "app_evil"), join(dir, "app", "sub"));
    await expectFailure(resolveTargets(manifestWith("app/sub/x.cfg"), new Map([["app", join(dir, "app")]])), "PATH_REJECTED", /outside its root/);
  });

  it("accepts a symlink that stays inside the root, and a root that is itself a symlink", async () => {
    await mkdir(join(dir, "real", "inner"), { recursive: true });
    await symlink(join(dir, "real", "inner"), join(dir, "real", "alias"));
    await symlink(join(dir, "real"), join(dir, "linked-root"));
    const targets = await resolveTargets(manifestWith("config/alias/x.cfg"), new Map([["config", join(dir, "linked-root")]]));
    expect(targets[0]).toMatchObject({ root: join(dir, "real"), target: join(dir, "real", "inner", "x.cfg"), exists: false });
  });

  it("refuses a target that is a symlink, a directory, or a dangling symlink on the way", async () => {
    await mkdir(join(dir, "root", "dir"), { recursive: true });
    await writeFile(join(dir, "root", "real.cfg"), "x");
    await symlink(join(dir, "root", "real.cfg"), join(dir, "root", "link.cfg"));
    await symlink(join(dir, "nowhere"), join(dir, "root", "dangling"));
    const roots = new Map([["config", join(dir, "root")]]);
    await expectFailure(resolveTargets(manifestWith("config/link.cfg"), roots), "PATH_REJECTED", /is a symbolic link/);
    await expectFailure(resolveTargets(manifestWith("config/dir"), roots), "PATH_REJECTED", /is a directory/);
    await expectFailure(resolveTargets(manifestWith("config/dangling/x.cfg"), roots), "PATH_REJECTED", /symbolic link to nothing/);
  });

  it("refuses a target whose parent is a regular file (read-only for root too)", async () => {
    await mkdir(join(dir, "root"));
    await writeFile(join(dir, "root", "file"), "x");
    const roots = new Map([["config", join(dir, "root")]]);
    await expectFailure(resolveTargets(manifestWith("config/file/x.cfg"), roots), "PATH_REJECTED", /where a directory is needed/);
    await expectFailure(resolveTargets(manifestWith("config/file/deeper/x.cfg"), roots), "PATH_REJECTED", /goes through a file/);
  });

  it("refuses a read-only target directory (chmod 0555) before any write: checked in a child process as an unprivileged user (uid 65534 when the tests run as root)", async () => {
    await mkdir(join(dir, "ro", "sub"), { recursive: true });
    await chmod(dir, 0o755);
    await chmod(join(dir, "ro", "sub"), 0o777);
    await chmod(join(dir, "ro"), 0o555);
    const manifest = (dst: string): string => JSON.stringify(manifestWith(dst));
    // The child resolves three manifests against the read-only root and prints each outcome as JSON.
    const script = join(dir, "resolve-as-user.mts");
    await writeFile(
      script,
      `import { resolveTargets } from ${JSON.stringify(new URL("../../src/ota/package.ts", import.meta.url).pathname)};\n` +
        `const roots = new Map([["config", ${JSON.stringify(join(dir, "ro"))}]]);\n` +
        `for (const m of [${[manifest("config/new.cfg"), manifest("config/a/b/new.cfg"), manifest("config/sub/new.cfg")].join(", ")}]) {\n` +
        `  try { await resolveTargets(m, roots); console.log(JSON.stringify({ ok: true })); }\n` +
        `  catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message, path: e.details?.path })); }\n}\n`,
    );
    await chmod(script, 0o644);
    await mkdir(join(dir, "child-tmp"), { mode: 0o777 });
    await chmod(join(dir, "child-tmp"), 0o777);
    const child = await execa("node", ["--import", "tsx", script], {
      ...(isRoot ? { uid: 65534, gid: 65534 } : {}),
      cwd: new URL("../..", import.meta.url).pathname,
      env: { HOME: join(dir, "child-tmp"), TMPDIR: join(dir, "child-tmp") },
      reject: false,
      timeout: 60_000,
    });
    expect(child.exitCode, child.stderr).toBe(0);
    const [top, deeper, writable] = child.stdout.trim().split("\n").map((line) => JSON.parse(line) as { ok?: true; code?: string; message?: string; path?: string });
    expect(top).toMatchObject({ code: "PERMISSION_DENIED", path: join(dir, "ro") });
    expect(top!.message).toMatch(/may not write in/);
    // A missing directory below it: the deepest existing one is checked.
    expect(deeper).toMatchObject({ code: "PERMISSION_DENIED" });
    expect(writable).toEqual({ ok: true });
  });
});

describe("damaged data and damaged zips", () => {
  it("refuses a file whose data differs from its sha256 and leaves no staging directory", async () => {
    const manifest = manifestFor(GOOD);
    (manifest.modules as Array<{ files: Array<{ sha256: string }> }>)[0]!.files[1]!.sha256 = sha256("something else");
    const path = await rawPackage({ manifest, files: GOOD });
    await readPackage(path); // the headers are fine
    await expectFailure(readPackage(path, { verifyContents: true }), "SHA256_MISMATCH", /macros\/start\.cfg/);
    const details = await expectFailure(extractPackage(path, join(dir, "work", "staging")), "SHA256_MISMATCH");
    expect(details).toMatchObject({ src: "macros/start.cfg", actual: sha256(GOOD["macros/start.cfg"]!) });
    expect(await readdir(join(dir, "work"))).toEqual([]);
  });

  it("refuses to extract into an existing staging directory, and replaces a partial one left by a crash", async () => {
    const path = await rawPackage({ files: GOOD });
    await mkdir(join(dir, "staging"));
    await expectFailure(extractPackage(path, join(dir, "staging")), "PATH_REJECTED", /already exists/);
    await mkdir(join(dir, "next.partial"));
    await writeFile(join(dir, "next.partial", "stale"), "x");
    const extracted = await extractPackage(path, join(dir, "next"));
    expect((await readdir(extracted.stagingDir)).sort()).toEqual(["macros", "printer.cfg"]);
    expect(await lstat(join(dir, "next.partial")).catch(() => null)).toBeNull();
  });

  it("refuses random bytes, an empty file and a truncated zip as INVALID_PACKAGE; a missing file is NO_PACKAGE", async () => {
    const random = join(dir, "random.zip");
    await writeFile(random, Buffer.from(Array.from({ length: 1024 }, (_, i) => (i * 31 + 7) & 0xff)));
    await expectFailure(readPackage(random), "INVALID_PACKAGE", /not a readable zip/);
    const empty = join(dir, "empty.zip");
    await writeFile(empty, "");
    await expectFailure(readPackage(empty), "INVALID_PACKAGE");
    const good = await readFile(await rawPackage({ files: GOOD }));
    const truncated = join(dir, "truncated.zip");
    await writeFile(truncated, good.subarray(0, good.length - 30));
    await expectFailure(readPackage(truncated), "INVALID_PACKAGE");
    const cutData = join(dir, "cut.zip");
    await writeFile(cutData, Buffer.concat([good.subarray(0, 60), good.subarray(good.length - 400)]));
    await expectFailure(readPackage(cutData), "INVALID_PACKAGE");
    await expectFailure(readPackage(join(dir, "missing.zip")), "NO_PACKAGE");
  });

  it("reports a malformed public key as CONFIG_INVALID before reading the package", async () => {
    const opts: ReadPackageOptions = { publicKey: "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----" };
    await expectFailure(readPackage(await rawPackage({ files: GOOD }), opts), "CONFIG_INVALID");
  });
});
