// `moonflash ota …` as a real child process (from source through tsx): a vendor makes a key pair, packs and signs a
// package with the CLI; a printer configured with that public key downloads it (signature checked), shows its
// status, installs it and rolls it back through the fake Moonraker; `ota sign` makes the very signature a package
// carries, which the engine accepts in a zip made by other tools; refusals exit 1 or 2 with their codes.

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { createHash } from "node:crypto";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { execa } from "execa";
import { packPackage } from "../../src/ota/pack.js";
import { readPackage } from "../../src/ota/package.js";
import { keygen, publicKeyOf, sign, verify } from "../../src/ota/signing.js";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";
import { TestHttpServer } from "../ota/support/http-server.js";
import { buildZip } from "../ota/support/zip-builder.js";
import { Receiver } from "../ota/support/report-receiver.js";

const repo = resolve(import.meta.dirname, "../..");

/**
 * The committed bundle, as users run it (CI checks dist/ matches src/ first): zip reading and writing load yauzl and
 * yazl from the bundle's chunks, where a CommonJS package has only a default export (src/core/commonjs.ts).
 */
function cli(args: string[]) {
  return execa("node", [join(repo, "dist", "moonflash.mjs"), ...args], { cwd: repo, reject: false, timeout: 60_000, env: { NO_COLOR: "1" } });
}

/** The last line of a --json run: the verb's outcome. */
const outcome = (stdout: string) => JSON.parse(stdout.trim().split("\n").at(-1)!) as { ok: boolean; result?: Record<string, unknown>; code?: string; message?: string };
const md5 = (data: Buffer) => createHash("md5").update(data).digest("hex");
const sha256 = (data: Buffer | string) => createHash("sha256").update(data).digest("hex");

let dir: string;
let vendor: string;
let moonraker: FakeMoonraker;
const servers: TestHttpServer[] = [];
const receivers: Receiver[] = [];

const MANIFEST = {
  name: "acme-macros",
  version: "1.1.0",
  modules: [
    {
      id: "macros",
      files: [
        { src: "macros.cfg", dst: "config/macros.cfg" },
        { src: "extra/readme.txt", dst: "config/readme.txt", mode: "0600" },
      ],
    },
  ],
};
const MACROS = "[gcode_macro HELLO]\ngcode: M117 hello v1.1\n";
const README = "read me, v1.1\n";

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-cli-ota-"));
  vendor = join(dir, "vendor");
  await mkdir(join(dir, "config"), { recursive: true });
  await writeFile(join(dir, "config", "macros.cfg"), "[gcode_macro HELLO]\ngcode: M117 hello v1.0\n");
  await mkdir(join(vendor, "src"), { recursive: true });
  await writeFile(join(vendor, "src", "manifest.json"), JSON.stringify(MANIFEST, null, 2));
  await writeFile(join(vendor, "src", "macros.cfg"), MACROS);
  // Not under src/: given with --file.
  await writeFile(join(vendor, "readme-v1.1.txt"), README);
  moonraker = await startFakeMoonraker({ dataDir: dir, websocket: false, timing: { stopOkMs: 30, stopStateMs: 20, startOkMs: 30, startStateMs: 20, readyMs: 100 } });
});

afterAll(async () => {
  for (const server of servers) await server.close();
  for (const receiver of receivers) await receiver.close();
  await moonraker?.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("moonflash ota", () => {
  it("keygen, pack --key, sign; a printer with the public key downloads, shows, installs and rolls back the package", { timeout: 60_000 }, async () => {
    // keygen: the pair, the private key readable by its owner only; never overwritten.
    const made = await cli(["ota", "keygen", "--out", join(vendor, "keys"), "--json"]);
    expect(made.exitCode, made.stderr).toBe(0);
    const keys = outcome(made.stdout).result as { private_key: string; public_key: string; public_key_base64: string };
    expect(keys.private_key).toBe(join(vendor, "keys", "private.pem"));
    expect((await stat(keys.private_key)).mode & 0o777).toBe(0o600);
    const privateKey = await readFile(keys.private_key, "utf8");
    expect(publicKeyOf(privateKey).export({ type: "spki", format: "pem" })).toBe(await readFile(keys.public_key, "utf8"));
    const zip = join(vendor, "acme-macros-1.1.0.zip");

    const [again, packed, missing] = await Promise.all([
      cli(["ota", "keygen", "--out", join(vendor, "keys")]),
      cli(["ota", "pack", join(vendor, "src"), "--out", zip, "--key", keys.private_key, "--file", `extra/readme.txt=${join(vendor, "readme-v1.1.txt")}`, "--json"]),
      // Without --file, extra/readme.txt is looked for beside the manifest, where it is not.
      cli(["ota", "pack", join(vendor, "src", "manifest.json"), "--out", join(vendor, "broken.zip")]),
    ]);
    expect(again.exitCode).toBe(2);
    expect(again.stderr).toContain(`${keys.private_key} exists; moonflash does not overwrite a key`);
    expect(missing.exitCode).toBe(2);
    expect(missing.stderr).toContain(`${join(vendor, "src", "extra", "readme.txt")} does not exist. [INVALID_PARAMS]`);

    expect(packed.exitCode, packed.stderr).toBe(0);
    const pkg = await readFile(zip);
    expect(outcome(packed.stdout)).toEqual({
      ok: true,
      result: { out: zip, name: "acme-macros", version: "1.1.0", modules: 1, files: 2, signed: true, size: pkg.length, md5: md5(pkg), sha256: sha256(pkg) },
    });
    const contents = await readPackage(zip, { publicKey: keys.public_key_base64, verifyContents: true });
    expect(contents.signed).toBe(true);
    expect(contents.manifest.modules[0]!.files.map((f) => [f.dst, f.sha256, f.mode])).toEqual([
      ["config/macros.cfg", sha256(MACROS), 0o644],
      ["config/readme.txt", sha256(README), 0o600],
    ]);

    // sign: the manifest inside the package, signed again by the CLI, gives a signature that verifies, and a zip
    // made by other tools from it and the files is a package the engine accepts.
    await mkdir(join(vendor, "signed"));
    await writeFile(join(vendor, "signed", "manifest.json"), contents.manifestBytes);
    const [signed, incomplete] = await Promise.all([
      cli(["ota", "sign", join(vendor, "signed", "manifest.json"), "--key", keys.private_key]),
      cli(["ota", "sign", join(vendor, "src", "manifest.json"), "--key", keys.private_key]),
    ]);
    expect(signed.exitCode, signed.stderr).toBe(0);
    expect(signed.stdout).toContain(`${join(vendor, "signed", "manifest.sig")}: signature of acme-macros 1.1.0`);
    const signature = (await readFile(join(vendor, "signed", "manifest.sig"), "utf8")).trim();
    expect(signature).toBe(sign(contents.manifestBytes, privateKey));
    expect(verify(contents.manifestBytes, signature, keys.public_key_base64)).toBe(true);
    const handmade = join(vendor, "handmade.zip");
    await writeFile(handmade, buildZip([
      { name: "manifest.json", data: contents.manifestBytes },
      { name: "manifest.sig", data: `${signature}\n` },
      { name: "macros.cfg", data: MACROS },
      { name: "extra/readme.txt", data: README },
    ]));
    expect((await readPackage(handmade, { publicKey: keys.public_key_base64, verifyContents: true })).signed).toBe(true);
    // A manifest without its sha256 and sizes is not what a printer checks: refused before signing.
    expect(incomplete.exitCode).toBe(1);
    expect(incomplete.stderr).toMatch(/\[INVALID_MANIFEST\]/);

    // The printer: [ota] with a root, the vendor's public key and the vendor's report endpoint.
    const receiver = new Receiver(await Receiver.freePort());
    await receiver.listen();
    receivers.push(receiver);
    await writeFile(
      join(dir, "config", "moonflash.conf"),
      `[moonflash]\nservice_timeout: 10\n\n[ota]\nroots:\n  config=${join(dir, "config")}\npublic_key: ${keys.public_key_base64}\nprobation_timeout: 5\ncallback_url: ${receiver.url}\n`,
    );
    const server = await TestHttpServer.start({ body: pkg });
    servers.push(server);
    const download = await cli(["ota", "download", server.url("/acme.zip"), "--md5", md5(pkg), "--sha256", sha256(pkg), "--size", String(pkg.length), "--data", dir, "--json"]);
    expect(download.exitCode, download.stderr).toBe(0);
    const lines = download.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.filter((l) => l.type === "stage").map((l) => l.stage)).toEqual(["started", "download", "verify"]);
    expect(outcome(download.stdout)).toMatchObject({ ok: true, result: { name: "acme-macros", version: "1.1.0", signed: true, size: pkg.length } });
    // The CLI waits for its reports before it exits: the last one is the result.
    expect(receiver.reports.at(-1)).toMatchObject({ event: "result", ok: true, target: `download ${server.url("/acme.zip")}`, status: { state: "verified" } });

    const status = await cli(["ota", "status", "--data", dir, "--json"]);
    expect(status.exitCode, status.stderr).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({
      state: "verified",
      url: server.url("/acme.zip"),
      package: { name: "acme-macros", version: "1.1.0", size: pkg.length },
      installed: null,
      running: null,
      last: [{ target: `download ${server.url("/acme.zip")}`, ok: true }],
    });

    const install = await cli(["ota", "install", "--data", dir]);
    expect(install.exitCode, install.stderr).toBe(0);
    expect(install.stdout).toMatch(/✓ acme-macros 1\.1\.0 installed: 2 file\(s\), 1 replaced, 1 new; probation passed in \d+\.\d s\. Old files: /);
    expect(await readFile(join(dir, "config", "macros.cfg"), "utf8")).toBe(MACROS);
    expect((await stat(join(dir, "config", "readme.txt"))).mode & 0o777).toBe(0o600);
    // A files module without a service stops nothing.
    expect(moonraker.serviceActions).toEqual([]);

    const [human, cancel] = await Promise.all([cli(["ota", "status", "--data", dir]), cli(["ota", "cancel", "--data", dir, "--json"])]);
    expect(human.exitCode, human.stderr).toBe(0);
    expect(human.stdout).toContain("state:     committed acme-macros 1.1.0");
    expect(human.stdout).toMatch(/installed: acme-macros 1\.1\.0 \(ota-/);
    expect(cancel.exitCode).toBe(1);
    expect(outcome(cancel.stdout)).toMatchObject({ ok: false, code: "NO_JOB" });

    const rollback = await cli(["ota", "rollback", "--data", dir]);
    expect(rollback.exitCode, rollback.stderr).toBe(0);
    expect(rollback.stdout).toContain("✓ acme-macros 1.1.0 rolled back: 1 file(s) restored, 1 removed");
    expect(await readFile(join(dir, "config", "macros.cfg"), "utf8")).toBe("[gcode_macro HELLO]\ngcode: M117 hello v1.0\n");

    // A package signed with another key is refused and discarded.
    const other = join(vendor, "other.zip");
    await packPackage({ manifest: MANIFEST, files: new Map([["macros.cfg", join(vendor, "src", "macros.cfg")], ["extra/readme.txt", join(vendor, "readme-v1.1.txt")]]), out: other, privateKey: keygen().privateKey });
    const forged = await readFile(other);
    server.setFile({ body: forged });
    const refused = await cli(["ota", "download", server.url("/forged.zip"), "--md5", md5(forged), "--data", dir]);
    expect(refused.exitCode).toBe(1);
    expect(refused.stderr).toMatch(/does not verify against \[ota\] public_key.*\[SIGNATURE_INVALID\]/);
    const after = JSON.parse((await cli(["ota", "status", "--data", dir, "--json"])).stdout) as { state: string; lastError: { code: string } };
    expect(after).toMatchObject({ state: "failed", lastError: { code: "SIGNATURE_INVALID" } });
  });

  it("refuses bad usage with exit code 2", async () => {
    const [noMd5, badSize, badMd5] = await Promise.all([
      cli(["ota", "download", "http://127.0.0.1:9/p.zip", "--data", dir]),
      cli(["ota", "download", "http://127.0.0.1:9/p.zip", "--md5", "0".repeat(32), "--size", "12k", "--data", dir]),
      cli(["ota", "download", "http://127.0.0.1:9/p.zip", "--md5", "nothex", "--data", join(dir, "no-printer")]),
    ]);
    expect(noMd5.exitCode).toBe(2);
    expect(noMd5.stderr).toContain("required option '--md5 <hex>' not specified");
    expect(badSize.exitCode).toBe(2);
    expect(badSize.stderr).toContain("--size expects a whole number of bytes, got '12k'");
    // Checked before Moonraker is asked for anything (there is none at that data dir).
    expect(badMd5.exitCode).toBe(2);
    expect(badMd5.stderr).toContain("moonflash: moonflash ota download: --md5: expected 32 hex digits (the package's MD5) [INVALID_PARAMS]");
  });
});
