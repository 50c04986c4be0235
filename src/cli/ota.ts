// `moonflash ota …`: the OTA engine from the command line, and the vendor's tools. download, install and rollback
// run the same engine as the service, in this process and under the same job lock (a second job gets BUSY), with
// services stopped and started through Moonraker; cancel asks the service, whose job it usually is; status reads
// the state on disk. pack, sign and keygen make and sign packages and need no printer.

import { readFile, stat } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { writeFileDurable } from "../core/durable.js";
import { MoonflashError, toMoonflashError } from "../core/errors.js";
import { isProcessAlive, readJobLock } from "../core/lock.js";
import { dataPaths, expandHome } from "../core/paths.js";
import { connectPrinter, createFlashEngine, createOtaEngine, createRuntime } from "../app.js";
import type { OtaEngine } from "../ota/engine.js";
import { MANIFEST_FILE, SIGNATURE_FILE, parseManifest } from "../ota/manifest.js";
import { packPackage, type ManifestInput } from "../ota/pack.js";
import { keygen, publicKeyOf, sign, verify } from "../ota/signing.js";
import type { AgentSession } from "../moonraker/session.js";
import { otaDownloadParams } from "../agent/methods.js";
import { parseParams } from "../agent/params.js";
import { AGENT_NAME } from "../version.js";
import { offlinePrinter, runPrinterJob } from "./offline.js";
import { reportFailure } from "./render.js";

const out = (line: string): void => void process.stdout.write(`${line}\n`);

/**
 * Ctrl-C (or SIGTERM) during an OTA job cancels it while it may be cancelled (download, verify, checks); once files
 * are being replaced the engine finishes or rolls back by itself, and only a second signal ends the process (the
 * service's next start then rolls the update back).
 */
function cancelOnSignal(ota: OtaEngine): () => void {
  const off = (): void => {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  };
  const onSignal = (): void => {
    off();
    try {
      process.stderr.write(`moonflash: cancelling OTA job ${ota.cancel().id}\n`);
    } catch (err) {
      process.stderr.write(`moonflash: ${toMoonflashError(err).message} (a second Ctrl-C ends moonflash anyway)\n`);
    }
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  return off;
}

/** An OTA job on the printer: runtime, Moonraker session, flash engine, OTA engine, progress, exit code. */
function runOtaJob(opts: { dataDir: string; json: boolean }, work: (ota: OtaEngine) => Promise<unknown>): Promise<number> {
  return runPrinterJob(opts, async (ctx, flash, printer, renderer) => {
    const ota = await createOtaEngine(ctx, printer, flash);
    const off = cancelOnSignal(ota);
    try {
      renderer.done(await work(ota));
    } finally {
      off();
    }
  });
}

export async function runOtaDownload(opts: { dataDir: string; url: string; md5: string; sha256?: string; size?: number; json: boolean }): Promise<number> {
  let params;
  try {
    // The remote method's checks, in the words of the command line, before Moonraker is asked for anything.
    params = parseParams(
      "ota.download",
      otaDownloadParams,
      { url: opts.url, md5: opts.md5, ...(opts.sha256 === undefined ? {} : { sha256: opts.sha256 }), ...(opts.size === undefined ? {} : { size: opts.size }) },
      { method: "moonflash ota download", param: (key) => (key === "url" ? "<url>" : `--${key}`) },
    );
  } catch (err) {
    return reportFailure(err, opts.json);
  }
  return runOtaJob(opts, (ota) =>
    ota.download({ url: params.url, md5: params.md5, ...(params.sha256 ? { sha256: params.sha256 } : {}), ...(params.size === undefined ? {} : { size: params.size }) }),
  );
}

export function runOtaInstall(opts: { dataDir: string; json: boolean }): Promise<number> {
  return runOtaJob(opts, (ota) => ota.install());
}

export function runOtaRollback(opts: { dataDir: string; json: boolean }): Promise<number> {
  return runOtaJob(opts, (ota) => ota.rollback());
}

/**
 * `moonflash ota cancel`: the running OTA job belongs to another process, usually the service, which is asked
 * through Moonraker (ota.cancel). A job of another CLI run is cancelled with Ctrl-C there.
 */
export async function runOtaCancel(opts: { dataDir: string; json: boolean }): Promise<number> {
  let session: AgentSession | null = null;
  try {
    const ctx = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    const lock = await readJobLock(dataPaths(ctx.config.dataDir).lock);
    const running = lock && isProcessAlive(lock.pid) ? lock : null;
    if (!running || running.kind !== "ota") {
      const other = running ? ` (a ${running.kind} job on ${running.target} runs, which moonflash flash's Ctrl-C or flash.cancel stops)` : "";
      throw new MoonflashError("NO_JOB", `No OTA job is running, so there is nothing to cancel${other}.`, { kind: "ota", running });
    }
    session = await connectPrinter(ctx, 10_000);
    let answer: unknown;
    try {
      answer = await session.agentRequest(AGENT_NAME, "ota.cancel");
    } catch (err) {
      const e = toMoonflashError(err);
      if (e.code !== "NO_JOB") throw e;
      throw new MoonflashError(
        "NO_JOB",
        `The OTA job ${running.jobId} (${running.target}) runs in moonflash process ${running.pid}, not in the service; press Ctrl-C where it runs to cancel it.`,
        { running },
      );
    }
    if (opts.json) out(JSON.stringify({ ok: true, result: answer }));
    else out(`✓ cancelling the OTA job ${running.jobId} (${running.target})`);
    return 0;
  } catch (err) {
    return reportFailure(err, opts.json);
  } finally {
    await session?.stop();
  }
}

/** `moonflash ota status`: the update's state from <data>/moonflash/ota/state.json, the running job, the last OTA jobs. */
export async function runOtaStatus(opts: { dataDir: string; json: boolean }): Promise<number> {
  try {
    const ctx = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    const printer = offlinePrinter();
    const ota = await createOtaEngine(ctx, printer, createFlashEngine(ctx, printer));
    await ota.load();
    const lock = await readJobLock(dataPaths(ctx.config.dataDir).lock);
    const running = lock && isProcessAlive(lock.pid) ? lock : null;
    const { job: _none, ...status } = ota.status();
    const result = { ...status, running, last: ctx.runner.history("ota", 10) };
    if (opts.json) {
      out(JSON.stringify(result));
      return 0;
    }
    const pkg = status.package?.name ? ` ${status.package.name} ${status.package.version ?? ""}`.trimEnd() : "";
    out(`state:     ${status.state.replace("_", " ")}${pkg}${status.package?.size ? ` (${status.package.size} bytes)` : ""}`);
    if (status.url) out(`url:       ${status.url}`);
    out(`installed: ${status.installed ? `${status.installed.name} ${status.installed.version} (${status.installed.updateId})` : "nothing moonflash installed"}`);
    out(`running:   ${running ? `${running.kind} job ${running.jobId} on ${running.target} (pid ${running.pid}, since ${running.startedAt})` : "nothing"}`);
    if (status.lastError) out(`error:     [${status.lastError.code}] ${status.lastError.message}`);
    for (const job of result.last) {
      out(`${job.finishedAt ?? job.startedAt}  ${job.target.padEnd(24)} ${job.ok ? "ok" : `FAILED ${job.code}: ${job.message}`}`);
    }
    return 0;
  } catch (err) {
    return reportFailure(err, opts.json);
  }
}

/** Every `src` a manifest names (files and firmware images). */
function sourcesOf(manifest: ManifestInput): string[] {
  return (manifest.modules ?? []).flatMap((m) => [...(m.files ?? []).map((f) => f.src), ...(m.image ? [m.image.src] : [])]);
}

async function readJsonFile(path: string, what: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    throw new MoonflashError("INVALID_PARAMS", `Cannot read ${what} ${path} (${(err as NodeJS.ErrnoException).code ?? String(err)}).`, { path }, { cause: err });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new MoonflashError("INVALID_MANIFEST", `${path} is not valid JSON: ${(err as Error).message}`, { path }, { cause: err });
  }
}

async function readKey(path: string): Promise<string> {
  try {
    return await readFile(path, "utf8");
  } catch (err) {
    throw new MoonflashError("INVALID_PARAMS", `Cannot read the key ${path} (${(err as NodeJS.ErrnoException).code ?? String(err)}).`, { path }, { cause: err });
  }
}

/**
 * `moonflash ota pack <manifest.json | directory> --out <zip>`: the files a manifest names are found relative to
 * the manifest's directory (a directory argument holds manifest.json), unless `--file src=path` says otherwise.
 */
export async function runOtaPack(opts: { input: string; out: string; key?: string; files: string[]; json: boolean }): Promise<number> {
  try {
    const input = resolve(opts.input);
    const isDir = await stat(input).then((s) => s.isDirectory(), () => false);
    const manifestPath = isDir ? join(input, MANIFEST_FILE) : input;
    const base = dirname(manifestPath);
    const manifest = (await readJsonFile(manifestPath, "the manifest")) as ManifestInput;
    if (manifest === null || typeof manifest !== "object" || !Array.isArray(manifest.modules)) {
      throw new MoonflashError("INVALID_MANIFEST", `${manifestPath}: expected an object with "name", "version" and a "modules" list.`, { path: manifestPath });
    }
    const overrides = new Map<string, string>();
    for (const spec of opts.files) {
      const at = spec.indexOf("=");
      if (at <= 0 || at === spec.length - 1) throw new MoonflashError("INVALID_PARAMS", `--file expects src=path, got '${spec}'.`, { file: spec });
      overrides.set(spec.slice(0, at), resolve(expandHome(spec.slice(at + 1))));
    }
    const files = new Map<string, string>();
    for (const src of sourcesOf(manifest)) files.set(src, overrides.get(src) ?? join(base, src));
    // A --file for a src the manifest does not list is refused by packPackage, naming it.
    for (const [src, path] of overrides) if (!files.has(src)) files.set(src, path);
    const privateKey = opts.key ? await readKey(resolve(opts.key)) : undefined;
    const packed = await packPackage({ manifest, files, out: resolve(opts.out), ...(privateKey ? { privateKey } : {}) });
    const bytes = await readFile(packed.out);
    const crypto = process.getBuiltinModule("node:crypto");
    const result = {
      out: packed.out,
      name: packed.manifest.name,
      version: packed.manifest.version,
      modules: packed.manifest.modules.length,
      files: packed.manifest.modules.reduce((n, m) => n + m.files.length + (m.type === "firmware" ? 1 : 0), 0),
      signed: packed.signature !== null,
      size: bytes.length,
      md5: crypto.createHash("md5").update(bytes).digest("hex"),
      sha256: crypto.createHash("sha256").update(bytes).digest("hex"),
    };
    if (opts.json) out(JSON.stringify({ ok: true, result }));
    else {
      out(`✓ ${result.out}: ${result.name} ${result.version}, ${result.modules} module(s), ${result.files} file(s), ${result.signed ? "signed" : "not signed"}, ${result.size} bytes`);
      out(`  md5 ${result.md5}`);
      out(`  sha256 ${result.sha256}`);
      out(`  install on a printer: moonflash ota download <url> --md5 ${result.md5} --sha256 ${result.sha256} --size ${result.size}`);
    }
    return 0;
  } catch (err) {
    return reportFailure(err, opts.json);
  }
}

/**
 * `moonflash ota sign <manifest.json> --key <private.pem>`: writes manifest.sig (beside the manifest, or --out) for
 * those exact bytes. The manifest must be complete (every sha256 and size given), as the one inside a package is.
 */
export async function runOtaSign(opts: { manifest: string; key: string; out?: string; json: boolean }): Promise<number> {
  try {
    const manifestPath = resolve(opts.manifest);
    let bytes: Buffer;
    try {
      bytes = await readFile(manifestPath);
    } catch (err) {
      throw new MoonflashError("INVALID_PARAMS", `Cannot read the manifest ${manifestPath} (${(err as NodeJS.ErrnoException).code ?? String(err)}).`, { path: manifestPath }, { cause: err });
    }
    // A printer checks the signed manifest completely; an incomplete one is refused here, before it is signed.
    const manifest = parseManifest(bytes);
    const privateKey = await readKey(resolve(opts.key));
    const signature = sign(bytes, privateKey);
    if (!verify(bytes, signature, publicKeyOf(privateKey))) throw new MoonflashError("INTERNAL", "The signature just made does not verify.", {});
    const target = resolve(opts.out ?? join(dirname(manifestPath), SIGNATURE_FILE));
    await writeFileDurable(target, `${signature}\n`);
    const result = { manifest: manifestPath, signature: target, name: manifest.name, version: manifest.version };
    if (opts.json) out(JSON.stringify({ ok: true, result }));
    else out(`✓ ${target}: signature of ${manifest.name} ${manifest.version} (${manifestPath})`);
    return 0;
  } catch (err) {
    return reportFailure(err, opts.json);
  }
}

/** `moonflash ota keygen --out <dir>`: an Ed25519 pair, private.pem (mode 0600) and public.pem; never overwrites. */
export async function runOtaKeygen(opts: { out: string; json: boolean }): Promise<number> {
  try {
    const dir = resolve(opts.out);
    const privatePath = join(dir, "private.pem");
    const publicPath = join(dir, "public.pem");
    for (const path of [privatePath, publicPath]) {
      if (await stat(path).then(() => true, () => false)) {
        throw new MoonflashError("INVALID_PARAMS", `${path} exists; moonflash does not overwrite a key. Choose another --out directory.`, { path });
      }
    }
    const pair = keygen();
    await writeFileDurable(privatePath, pair.privateKey, 0o600);
    await writeFileDurable(publicPath, pair.publicKey, 0o644);
    const result = { private_key: privatePath, public_key: publicPath, public_key_base64: pair.publicKeyBase64 };
    if (opts.json) out(JSON.stringify({ ok: true, result }));
    else {
      out(`✓ ${privatePath} (keep it secret: it signs packages) and ${publicPath}`);
      out(`  on each printer, in moonflash.conf: [ota] public_key: ${pair.publicKeyBase64}`);
    }
    return 0;
  } catch (err) {
    return reportFailure(err, opts.json);
  }
}
