// The vendor HTTP API on a real node:http server (127.0.0.1, port 0) over a real OtaEngine with the fake Moonraker:
// POST /download and POST /update answer 202 at once and run in the background, GET /progress shows them to
// verified and committed; bad JSON, bad params, wrong paths and methods, oversized bodies and a second download
// while one runs are refused with their status and {error: {code, message}}.

import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { OtaEngine, type OtaStatus } from "../../src/ota/engine.js";
import { MAX_BODY_BYTES, startOtaHttpApi, type OtaHttpApi } from "../../src/ota/http-api.js";
import { startRig, waitUntil, type PrinterRig } from "../fixtures/engine/rig.js";
import { TestHttpServer } from "./support/http-server.js";
import { buildPackage, fileFirmwarePort, layoutIn, md5Of, otaConfig, SERVICES, sha256Of, writeOldTree } from "./support/ota-fixture.js";

let base: string;
let pkg: Buffer;
let server: TestHttpServer;

beforeAll(async () => {
  base = await mkdtemp(join(tmpdir(), "moonflash-ota-http-"));
  await chmod(base, 0o755);
  pkg = await buildPackage(join(base, "pkg.zip"));
  server = await TestHttpServer.start({ body: pkg });
});
afterAll(async () => {
  await server.close();
  await rm(base, { recursive: true, force: true });
});

let rig: PrinterRig | null = null;
let api: OtaHttpApi | null = null;
let engine: OtaEngine;
afterEach(async () => {
  server.fallback = null;
  await api?.close();
  api = null;
  await rig?.close();
  rig = null;
});

let counter = 0;
async function setup(): Promise<void> {
  rig = await startRig({ services: SERVICES });
  const layout = layoutIn(join(base, `printer-${++counter}`));
  await writeOldTree(layout);
  engine = new OtaEngine({
    dataDir: rig.dataDir,
    config: otaConfig(layout),
    printer: rig.session,
    runner: rig.runner,
    logger: rig.logger,
    firmware: fileFirmwarePort(layout.mcu),
    serviceTimeoutMs: 5000,
    pollMs: 20,
    download: { retries: 2, backoffMs: 10, progressIntervalMs: 0 },
  });
  api = await startOtaHttpApi({ engine, port: 0, host: "127.0.0.1", logger: rig.logger });
}

const apiUrl = () => `http://127.0.0.1:${api!.port}`;
const post = (path: string, body?: unknown) =>
  fetch(`${apiUrl()}${path}`, { method: "POST", headers: { "Content-Type": "application/json" }, ...(body === undefined ? {} : { body: typeof body === "string" ? body : JSON.stringify(body) }) });
const progress = async (): Promise<OtaStatus> => {
  const res = await fetch(`${apiUrl()}/progress`);
  expect(res.status).toBe(200);
  return (await res.json()) as OtaStatus;
};
const downloadBody = (url = server.url()) => ({ url, md5: md5Of(pkg), sha256: sha256Of(pkg), size: pkg.length });
const errorOf = async (res: Response) => ((await res.json()) as { error: { code: string; message: string } }).error;

async function until(state: OtaStatus["state"], timeoutMs = 10_000): Promise<OtaStatus> {
  let last: OtaStatus | null = null;
  await waitUntil(async () => (last = await progress()).state === state && last.job === null, `state ${state}`, timeoutMs);
  return last!;
}

describe("vendor HTTP API", () => {
  it("POST /download and POST /update answer 202 and run in the background; GET /progress follows them to committed", { timeout: 30_000 }, async () => {
    await setup();
    expect(await progress()).toMatchObject({ state: "idle", job: null });

    const res = await post("/download", downloadBody());
    expect(res.status).toBe(202);
    expect(await res.json()).toMatchObject({ accepted: true });
    expect(await until("verified")).toMatchObject({ percent: 100, package: { name: "acme-printer", version: "2.0.0" }, lastError: null });

    const update = await post("/update");
    expect(update.status).toBe(202);
    expect(await update.json()).toMatchObject({ accepted: true });
    expect(await until("committed", 20_000)).toMatchObject({ installed: { name: "acme-printer", version: "2.0.0" }, lastError: null });

    // Nothing to install any more: refused at once with its status.
    const again = await post("/update");
    expect(again.status).toBe(404);
    expect(await errorOf(again)).toMatchObject({ code: "NO_PACKAGE" });
  });

  it("a failure after the job started is the state's lastError in GET /progress", async () => {
    await setup();
    const res = await post("/download", { ...downloadBody(), md5: "0".repeat(32) });
    expect(res.status).toBe(202);
    expect((await until("failed")).lastError).toMatchObject({ code: "MD5_MISMATCH" });
  });

  it("answers 400 INVALID_PARAMS for bad JSON and bad params", async () => {
    await setup();
    const bad = await post("/download", "{not json");
    expect(bad.status).toBe(400);
    expect(await errorOf(bad)).toMatchObject({ code: "INVALID_PARAMS" });

    const md5 = await post("/download", { ...downloadBody(), md5: "xyz" });
    expect(md5.status).toBe(400);
    expect(await errorOf(md5)).toMatchObject({ code: "INVALID_PARAMS", message: expect.stringContaining("md5") });

    const extra = await post("/download", { ...downloadBody(), channel: "beta" });
    expect(extra.status).toBe(400);
    const url = await post("/download", { ...downloadBody(), url: "ftp://example.invalid/pkg.zip" });
    expect(url.status).toBe(400);
    expect((await progress()).state).toBe("idle");
  });

  it("answers 404 for an unknown path, 405 with Allow for a wrong method, 413 for a body over 64 KiB", async () => {
    await setup();
    const missing = await fetch(`${apiUrl()}/nope`);
    expect(missing.status).toBe(404);
    expect(await errorOf(missing)).toMatchObject({ code: "NOT_FOUND" });

    const getDownload = await fetch(`${apiUrl()}/download`);
    expect(getDownload.status).toBe(405);
    expect(getDownload.headers.get("allow")).toBe("POST");
    const postProgress = await post("/progress", {});
    expect(postProgress.status).toBe(405);
    expect(postProgress.headers.get("allow")).toBe("GET");

    const big = await post("/download", JSON.stringify({ ...downloadBody(), pad: "x".repeat(MAX_BODY_BYTES) }));
    expect(big.status).toBe(413);
    expect((await progress()).state).toBe("idle");
  });

  it("a second POST /download with another URL while one runs answers 409 BUSY; the same one again joins it", { timeout: 20_000 }, async () => {
    await setup();
    // The first download stalls halfway until it is cancelled.
    server.plan({ stallAfter: 1000 });
    const first = await post("/download", downloadBody());
    expect(first.status).toBe(202);
    await waitUntil(async () => (await progress()).state === "downloading", "the download to run");

    const other = await post("/download", downloadBody(server.url("/other.zip")));
    expect(other.status).toBe(409);
    expect(await errorOf(other)).toMatchObject({ code: "BUSY" });
    const same = await post("/download", downloadBody());
    expect(same.status).toBe(202);

    engine.cancel();
    await waitUntil(async () => (await progress()).job === null, "the download to stop");
  });
});
