// The OTA download engine against a real HTTP server on 127.0.0.1 (test/ota/support/http-server.ts) with real files
// in temp dirs: resume with Range/If-Range, every bad answer to a range request, retries, stalls, cancel, restarts of
// the process, hash mismatches, oversize and full disks. Scenario names follow the resume cases of Mender's
// http_resumer tests and the pull tests of OSTree (cut bodies, random 500s, a flipped byte restored).

import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it, onTestFinished } from "vitest";
import { downloadPackage, type DownloadOptions } from "../../src/ota/download.js";
import { checkPartialResponse, ifRangeValue, parseContentRange, retryAfterMs, validatorsChanged } from "../../src/ota/http-range.js";
import { TestHttpServer, type Behavior } from "./support/http-server.js";

const repoRoot = fileURLToPath(new URL("../../", import.meta.url));
const SIZE = 256 * 1024;
const HALF = SIZE / 2;

const md5Of = (data: Buffer): string => createHash("md5").update(data).digest("hex");
const sha256Of = (data: Buffer): string => createHash("sha256").update(data).digest("hex");

let dir: string;
let dest: string;
let body: Buffer;
let server: TestHttpServer;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-download-"));
  dest = join(dir, "pkg.zip");
  body = randomBytes(SIZE);
  server = await TestHttpServer.start({ body });
});

afterEach(async () => {
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

/** Options for a download of `body` from the test server, with short waits. */
function options(overrides: Partial<DownloadOptions> = {}): DownloadOptions {
  return { url: server.url(), dest, md5: md5Of(body), sha256: sha256Of(body), retries: 3, backoffMs: 5, backoffMaxMs: 20, stallTimeoutMs: 5000, progressIntervalMs: 0, ...overrides };
}

/** A logger whose lines the test can read (pino writes synchronously to a plain stream). */
function capturingLogger(onLine: (entry: Record<string, unknown>) => void = () => {}): { logger: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const logger = pino(
    { level: "info" },
    {
      write(line: string) {
        const entry = JSON.parse(line) as Record<string, unknown>;
        lines.push(entry);
        onLine(entry);
      },
    },
  );
  return { logger, lines };
}

const files = async (): Promise<string[]> => (await readdir(dir)).sort();
const readSidecar = async (): Promise<Record<string, unknown>> => JSON.parse(await readFile(`${dest}.part.json`, "utf8")) as Record<string, unknown>;

async function expectDownloaded(result: Awaited<ReturnType<typeof downloadPackage>>, data = body): Promise<void> {
  expect(result).toMatchObject({ path: dest, size: data.length, md5: md5Of(data), sha256: sha256Of(data) });
  expect((await readFile(dest)).equals(data)).toBe(true);
  expect(await files()).toEqual(["pkg.zip"]);
}

describe("downloadPackage: fresh download", () => {
  it("streams the file to dest, verifies MD5 and SHA-256, reports progress, and leaves no part or sidecar", async () => {
    const progress: Array<[number, number | null]> = [];
    const result = await downloadPackage(options({ onProgress: (done, total) => progress.push([done, total]) }));
    await expectDownloaded(result);
    expect(result).toMatchObject({ resumedFrom: 0, bytesDownloaded: SIZE, attempts: 1 });
    expect(server.requests).toHaveLength(1);
    expect(server.requests[0]).toMatchObject({ range: undefined, ifRange: undefined, acceptEncoding: "identity", status: 200, bytesSent: SIZE });
    expect(progress[0]).toEqual([0, null]);
    expect(progress.at(-1)).toEqual([SIZE, SIZE]);
    for (let i = 1; i < progress.length; i++) expect(progress[i]![0]).toBeGreaterThanOrEqual(progress[i - 1]![0]);
  });

  it("returns at once when dest already holds the file, and downloads again when it holds another one", async () => {
    await writeFile(dest, body);
    await expect(downloadPackage(options())).resolves.toMatchObject({ path: dest, size: SIZE, attempts: 0, bytesDownloaded: 0 });
    expect(server.requests).toHaveLength(0);

    await writeFile(dest, randomBytes(SIZE));
    await expectDownloaded(await downloadPackage(options()));
    expect(server.requests).toHaveLength(1);
  });

  it("follows a redirect, and a resume starts again from the configured URL", async () => {
    server.plan({ redirect: "/real/pkg.zip" }, { cutAfter: HALF }, { redirect: "/real/pkg.zip" });
    const result = await downloadPackage(options({ url: server.url("/latest") }));
    await expectDownloaded(result);
    expect(server.requests.map((r) => [r.path, r.status, r.range])).toEqual([
      ["/latest", 302, undefined],
      ["/real/pkg.zip", 200, undefined],
      ["/latest", 302, `bytes=${HALF}-`],
      ["/real/pkg.zip", 206, `bytes=${HALF}-`],
    ]);
    expect(result.attempts).toBe(2);
  });
});

describe("downloadPackage: resume", () => {
  it("resumes after the server closes the connection half way, with Range and If-Range, fetching only the missing bytes", async () => {
    server.plan({ cutAfter: HALF });
    const result = await downloadPackage(options());
    await expectDownloaded(result);
    expect(server.requests.map((r) => [r.range, r.ifRange, r.status, r.bytesSent])).toEqual([
      [undefined, undefined, 200, HALF],
      [`bytes=${HALF}-`, '"v1"', 206, SIZE - HALF],
    ]);
    expect(server.bytesSent()).toBe(SIZE);
    expect(result).toMatchObject({ resumedFrom: 0, bytesDownloaded: SIZE, attempts: 2 });
  });

  it("uses Last-Modified for If-Range when there is no ETag, and no If-Range with only a weak ETag", async () => {
    server.setFile({ body, etag: null });
    server.plan({ cutAfter: HALF });
    await expectDownloaded(await downloadPackage(options()));
    expect(server.requests[1]).toMatchObject({ range: `bytes=${HALF}-`, ifRange: "Wed, 21 Oct 2026 07:28:00 GMT", status: 206 });

    await rm(dest);
    server.setFile({ body, etag: 'W/"weak"' });
    server.plan({ cutAfter: HALF });
    await expectDownloaded(await downloadPackage(options()));
    expect(server.requests[3]).toMatchObject({ range: `bytes=${HALF}-`, ifRange: undefined, status: 206 });
  });

  it("retries while the server is down and resumes once it is back (ServerDownAndUp)", async () => {
    let stopped = false;
    let revived = false;
    const { logger, lines } = capturingLogger((entry) => {
      if (entry.msg !== "download: retrying") return;
      // After the cut the server goes down; after the first refused connection it comes back. Both happen before
      // the next attempt: pino writes synchronously and close() stops listening at once.
      if (!stopped) {
        stopped = true;
        void server.stop();
      } else if (!revived && String(entry.reason).includes("ECONNREFUSED")) {
        revived = true;
        void server.resume();
      }
    });
    server.plan({ cutAfter: HALF });
    const result = await downloadPackage(options({ logger, retries: 20 }));
    await expectDownloaded(result);
    expect(revived).toBe(true);
    expect(lines.filter((l) => String(l.reason).includes("ECONNREFUSED")).length).toBeGreaterThanOrEqual(1);
    expect(result.attempts).toBeGreaterThanOrEqual(3);
    expect(server.requests.map((r) => [r.range, r.status, r.bytesSent])).toEqual([
      [undefined, 200, HALF],
      [`bytes=${HALF}-`, 206, SIZE - HALF],
    ]);
    expect(server.requests[1]!.ifRange).toBe('"v1"');
  });

  it("restarts from zero, never appending, when a Range request is answered with 200 (NoPartialContentSupport)", async () => {
    server.plan({ cutAfter: HALF }, { ignoreRange: true });
    const result = await downloadPackage(options());
    await expectDownloaded(result);
    expect(server.requests.map((r) => [r.range, r.status])).toEqual([
      [undefined, 200],
      [`bytes=${HALF}-`, 200],
    ]);
    expect(result.bytesDownloaded).toBe(HALF + SIZE);
  });

  const rejected: Array<[string, string | null, Behavior?]> = [
    ["MissingContentRange", null],
    ["EmptyContentRange", ""],
    ["wrong unit", `items ${HALF}-${SIZE - 1}/${SIZE}`],
    ["MissingBytesContentRange", `${HALF}-${SIZE - 1}/${SIZE}`],
    ["EarlyRangeStart", `bytes ${HALF - 1}-${SIZE - 1}/${SIZE}`],
    ["LateRangeStart", `bytes ${HALF + 1}-${SIZE - 1}/${SIZE}`],
    ["InvalidEndRange (short of the last byte)", `bytes ${HALF}-${SIZE - 2}/${SIZE}`],
    ["ChangeContentLength (another total)", `bytes ${HALF}-${SIZE}/${SIZE + 1}`],
    ["end past the total", `bytes ${HALF}-${SIZE}/${SIZE}`],
    ["NegativeRange", `bytes -${HALF}-${SIZE - 1}/${SIZE}`],
    ["TooManyContentRanges", `bytes ${HALF}-${SIZE - 1}/${SIZE}, bytes 0-9/${SIZE}`],
    ["ImproperlyFormattedContentRange", `bytes ${HALF}-/${SIZE}`],
    ["GarbledContentStart", `bytes 1x${HALF}-${SIZE - 1}/${SIZE}`],
    ["garbage", "!!not a range!!"],
    ["unsatisfied range in a 206", `bytes */${SIZE}`],
    // Chunked, so no Content-Length disagrees with the range: the start alone must be checked.
    ["EarlyRangeStart without Content-Length", `bytes ${HALF - 1}-${SIZE - 1}/${SIZE}`, { chunked: true }],
    ["LateRangeStart without Content-Length", `bytes ${HALF + 1}-${SIZE - 1}/${SIZE}`, { chunked: true }],
  ];
  it.each(rejected)("discards the part and restarts from zero on a bad Content-Range: %s", async (_name, contentRange, extra) => {
    const { logger, lines } = capturingLogger();
    server.plan({ cutAfter: HALF }, { contentRange, ...extra });
    const result = await downloadPackage(options({ logger }));
    await expectDownloaded(result);
    expect(server.requests.map((r) => [r.range, r.status])).toEqual([
      [undefined, 200],
      [`bytes=${HALF}-`, 206],
      [undefined, 200],
    ]);
    expect(lines.some((l) => l.msg === "download: discarding the partial download")).toBe(true);
    // The rejected body is not read: the half kept from the first answer, then the whole file again.
    expect(result.bytesDownloaded).toBe(HALF + SIZE);
  });

  const accepted: Array<[string, string]> = [
    ["exact", `bytes ${HALF}-${SIZE - 1}/${SIZE}`],
    ["unit in capitals", `BYTES ${HALF}-${SIZE - 1}/${SIZE}`],
    ["UnknownContentLength (total *)", `bytes ${HALF}-${SIZE - 1}/*`],
  ];
  it.each(accepted)("continues on a correct Content-Range: %s", async (_name, contentRange) => {
    server.plan({ cutAfter: HALF }, { contentRange });
    const result = await downloadPackage(options());
    await expectDownloaded(result);
    expect(server.requests.map((r) => r.status)).toEqual([200, 206]);
    expect(result.bytesDownloaded).toBe(SIZE);
  });

  it("after repeated bad ranges, downloads whole files without asking for ranges", async () => {
    // Every answer is cut half way and every range answer is malformed: after two rejected ranges no Range is sent.
    server.fallback = (r) => (r.range ? { contentRange: "garbage" } : { cutAfter: HALF });
    await expect(downloadPackage(options({ retries: 4 }))).rejects.toMatchObject({ code: "DOWNLOAD_FAILED" });
    const ranged = server.requests.filter((r) => r.range !== undefined);
    expect(ranged).toHaveLength(2);
    expect(server.requests.at(-1)!.range).toBeUndefined();
  });

  it("restarts from zero when the ETag changed between attempts (server honours If-Range with 200)", async () => {
    const release2 = randomBytes(SIZE + 1000);
    server.plan({ cutAfter: HALF }, { onRequest: () => server.setFile({ body: release2, etag: '"v2"' }) });
    const result = await downloadPackage(options({ md5: md5Of(release2), sha256: sha256Of(release2) }));
    await expectDownloaded(result, release2);
    expect(server.requests.map((r) => [r.range, r.ifRange, r.status])).toEqual([
      [undefined, undefined, 200],
      [`bytes=${HALF}-`, '"v1"', 200],
    ]);
  });

  it("restarts from zero when a 206 carries another ETag (server ignores If-Range)", async () => {
    const release2 = randomBytes(SIZE);
    server.plan({ cutAfter: HALF }, { ignoreIfRange: true, onRequest: () => server.setFile({ body: release2, etag: '"v2"' }) });
    const result = await downloadPackage(options({ md5: md5Of(release2), sha256: sha256Of(release2) }));
    await expectDownloaded(result, release2);
    expect(server.requests.map((r) => [r.range, r.status])).toEqual([
      [undefined, 200],
      [`bytes=${HALF}-`, 206],
      [undefined, 200],
    ]);
  });

  it("takes 416 with bytes */size equal to the bytes held as 'already complete'", async () => {
    // A part holding the whole file whose size the sidecar never learnt (the first answer had no length).
    await writeFile(`${dest}.part`, body);
    await writeFile(`${dest}.part.json`, JSON.stringify({ format: 1, url: server.url(), md5: md5Of(body), etag: '"v1"', last_modified: null, total: null, committed: SIZE }));
    const result = await downloadPackage(options());
    await expectDownloaded(result);
    expect(server.requests.map((r) => [r.range, r.status])).toEqual([[`bytes=${SIZE}-`, 416]]);
    expect(result).toMatchObject({ resumedFrom: SIZE, bytesDownloaded: 0, attempts: 1 });
  });
});

describe("downloadPackage: faults", () => {
  it("gets through random 500s and dropped connections (OSTree --random-500s, RAUC sporadic)", async () => {
    const big = randomBytes(4 * SIZE);
    server.setFile({ body: big });
    // A fixed-seed generator, so the run is the same every time.
    let seed = 42;
    const next = (): number => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    server.fallback = (r): Behavior => {
      const roll = next();
      if (r.index % 2 === 1 || roll < 0.1) return { status: 500 };
      if (roll < 0.85) return { cutAfter: Math.floor(next() * 128 * 1024) };
      return {};
    };
    const result = await downloadPackage(options({ md5: md5Of(big), sha256: sha256Of(big), retries: 8 }));
    await expectDownloaded(result, big);
    const statuses = server.requests.map((r) => r.status);
    expect(statuses.filter((s) => s === 500).length).toBeGreaterThanOrEqual(3);
    expect(server.requests.filter((r) => r.status === 206).length).toBeGreaterThanOrEqual(2);
    // Resumes fetched only what was missing.
    expect(server.bytesSent()).toBe(big.length);
  });

  it("resumes a chunked body cut short (no Content-Length, truncation seen in the framing)", async () => {
    server.plan({ chunked: true, cutAfter: HALF });
    const result = await downloadPackage(options({ size: undefined }));
    await expectDownloaded(result);
    expect(server.requests.map((r) => [r.range, r.status])).toEqual([
      [undefined, 200],
      [`bytes=${HALF}-`, 206],
    ]);
  });

  it("resumes a close-delimited body cut short when the size is known", async () => {
    server.plan({ closeDelimited: true, cutAfter: HALF });
    const result = await downloadPackage(options({ size: SIZE }));
    await expectDownloaded(result);
    expect(server.requests.map((r) => [r.range, r.status])).toEqual([
      [undefined, 200],
      [`bytes=${HALF}-`, 206],
    ]);
  });

  it("fails with MD5_MISMATCH on a close-delimited body cut short when nothing tells the size, and keeps nothing", async () => {
    server.plan({ closeDelimited: true, cutAfter: HALF });
    await expect(downloadPackage(options())).rejects.toMatchObject({ code: "MD5_MISMATCH", details: { size: HALF, md5: md5Of(body.subarray(0, HALF)) } });
    expect(await files()).toEqual([]);
  });

  it("fails with MD5_MISMATCH on a flipped byte, removes the part, and the next call succeeds once the server is fixed", async () => {
    const corrupt = Buffer.from(body);
    corrupt[1000] = corrupt[1000]! ^ 0x01;
    server.setFile({ body: corrupt });
    const error = await downloadPackage(options()).catch((err: unknown) => err);
    expect(error).toMatchObject({ code: "MD5_MISMATCH", details: { md5: md5Of(corrupt), expectedMd5: md5Of(body) } });
    expect((error as Error).message).toMatch(/discarded.*Download again/);
    expect(await files()).toEqual([]);

    server.setFile({ body });
    await expectDownloaded(await downloadPackage(options()));
    expect(server.requests.map((r) => r.range)).toEqual([undefined, undefined]);
  });

  it("fails with SHA256_MISMATCH when the MD5 matches but the SHA-256 does not, keeping nothing", async () => {
    await expect(downloadPackage(options({ sha256: "0".repeat(64) }))).rejects.toMatchObject({ code: "SHA256_MISMATCH", details: { sha256: sha256Of(body) } });
    expect(await files()).toEqual([]);
  });

  it("refuses a file larger than the size given, from its Content-Length, before writing anything", async () => {
    const error = await downloadPackage(options({ size: SIZE - 1 })).catch((err: unknown) => err);
    expect(error).toMatchObject({ code: "DOWNLOAD_FAILED", details: { announced: SIZE, expected: SIZE - 1 } });
    expect((error as Error).message).toContain("larger than");
    expect(server.requests).toHaveLength(1);
    expect(await files()).toEqual([]);
  });

  it("refuses a file smaller than the size given", async () => {
    await expect(downloadPackage(options({ size: SIZE + 1 }))).rejects.toMatchObject({ code: "DOWNLOAD_FAILED", details: { announced: SIZE, expected: SIZE + 1 } });
    expect(await files()).toEqual([]);
  });

  it("stops a body without Content-Length once it exceeds the size given, keeping nothing", async () => {
    server.plan({ chunked: true });
    const error = await downloadPackage(options({ size: HALF })).catch((err: unknown) => err);
    expect(error).toMatchObject({ code: "DOWNLOAD_FAILED", details: { limit: HALF } });
    expect((error as Error).message).toContain("more than");
    expect(await files()).toEqual([]);
  });

  it("refuses a Content-Length over maxBytes when no size is given", async () => {
    await expect(downloadPackage(options({ maxBytes: SIZE - 1 }))).rejects.toMatchObject({ code: "DOWNLOAD_FAILED", details: { announced: SIZE, limit: SIZE - 1 } });
    expect(await files()).toEqual([]);
  });

  it("aborts a stalled body after stallTimeoutMs and resumes", async () => {
    server.plan({ stallAfter: HALF });
    const started = Date.now();
    const { logger, lines } = capturingLogger();
    const result = await downloadPackage(options({ stallTimeoutMs: 150, logger }));
    await expectDownloaded(result);
    expect(Date.now() - started).toBeGreaterThanOrEqual(150);
    expect(lines.find((l) => l.msg === "download: retrying")).toMatchObject({ reason: "no data for 150 ms", bytes: HALF });
    expect(server.requests.map((r) => [r.range, r.status])).toEqual([
      [undefined, 200],
      [`bytes=${HALF}-`, 206],
    ]);
  });

  it("aborts a request that gets no answer at all and tries again", async () => {
    server.plan({ noResponse: true });
    const result = await downloadPackage(options({ stallTimeoutMs: 100 }));
    await expectDownloaded(result);
    expect(server.requests.map((r) => r.status)).toEqual([null, 200]);
  });

  it("gives up with DOWNLOAD_FAILED and the last HTTP status when the server keeps answering 503", async () => {
    server.fallback = () => ({ status: 503 });
    const error = await downloadPackage(options({ retries: 2 })).catch((err: unknown) => err);
    expect(error).toMatchObject({ code: "DOWNLOAD_FAILED", details: { lastStatus: 503, attempts: 3, bytesKept: 0 } });
    expect((error as Error).message).toContain("last: HTTP 503");
    expect(server.requests).toHaveLength(3);
    expect(await files()).toEqual([]);
  });

  it("gives up with DOWNLOAD_FAILED when the server never answers", async () => {
    server.fallback = () => ({ noResponse: true });
    await expect(downloadPackage(options({ retries: 1, stallTimeoutMs: 100 }))).rejects.toMatchObject({
      code: "DOWNLOAD_FAILED",
      details: { lastStatus: null, lastError: "no data for 100 ms", attempts: 2 },
    });
  });

  it("gives up with DOWNLOAD_FAILED naming the network error when nothing listens", async () => {
    await server.stop();
    await expect(downloadPackage(options({ retries: 2 }))).rejects.toMatchObject({ code: "DOWNLOAD_FAILED", details: { lastStatus: null, lastError: expect.stringContaining("ECONNREFUSED"), attempts: 3 } });
    expect(await files()).toEqual([]);
  });

  it("fails at once on 404, without retrying", async () => {
    server.fallback = () => ({ status: 404 });
    await expect(downloadPackage(options())).rejects.toMatchObject({ code: "DOWNLOAD_FAILED", details: { lastStatus: 404 } });
    expect(server.requests).toHaveLength(1);
  });

  it("waits as long as Retry-After asks, within backoffMaxMs", async () => {
    server.plan({ status: 503, headers: { "retry-after": "1" } });
    const started = Date.now();
    await expectDownloaded(await downloadPackage(options({ backoffMs: 1, backoffMaxMs: 300 })));
    expect(Date.now() - started).toBeGreaterThanOrEqual(290);
    expect(Date.now() - started).toBeLessThan(1000);
  });
});

describe("downloadPackage: cancel and restart", () => {
  it("cancel keeps the part with its sidecar, and the next call resumes from it", async () => {
    server.plan({ stallAfter: HALF });
    const controller = new AbortController();
    const first = downloadPackage(options({ signal: controller.signal, onProgress: (done) => done >= HALF && controller.abort() }));
    const error = await first.catch((err: unknown) => err);
    expect(error).toMatchObject({ code: "CANCELLED", details: { bytesKept: HALF } });
    expect(await files()).toEqual(["pkg.zip.part", "pkg.zip.part.json"]);
    expect((await stat(`${dest}.part`)).size).toBe(HALF);
    expect(await readSidecar()).toMatchObject({ url: server.url(), etag: '"v1"', committed: HALF, total: SIZE });

    const result = await downloadPackage(options());
    await expectDownloaded(result);
    expect(result).toMatchObject({ resumedFrom: HALF, bytesDownloaded: SIZE - HALF, attempts: 1 });
    expect(server.requests[1]).toMatchObject({ range: `bytes=${HALF}-`, ifRange: '"v1"', status: 206, bytesSent: SIZE - HALF });
  });

  it("cancels during the wait between retries", async () => {
    server.fallback = () => ({ status: 503 });
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 100);
    const started = Date.now();
    await expect(downloadPackage(options({ signal: controller.signal, backoffMs: 10_000, backoffMaxMs: 10_000 }))).rejects.toMatchObject({ code: "CANCELLED" });
    expect(Date.now() - started).toBeLessThan(2000);
    expect(await files()).toEqual([]);
  });

  it("an already cancelled signal makes no request", async () => {
    await expect(downloadPackage(options({ signal: AbortSignal.abort() }))).rejects.toMatchObject({ code: "CANCELLED" });
    expect(server.requests).toHaveLength(0);
    expect(await files()).toEqual([]);
  });

  it("a new call with the part and sidecar of a failed one re-reads the part through the hashes and resumes", async () => {
    // Half the file, then the server fails: with no retries the call gives up, keeping the half.
    server.plan({ cutAfter: HALF });
    server.fallback = () => ({ status: 503 });
    await expect(downloadPackage(options({ retries: 0 }))).rejects.toMatchObject({ code: "DOWNLOAD_FAILED", details: { bytesKept: HALF, lastStatus: 503 } });
    server.fallback = null;
    expect(await readSidecar()).toMatchObject({ committed: HALF, total: SIZE });

    const result = await downloadPackage(options());
    await expectDownloaded(result);
    expect(result).toMatchObject({ resumedFrom: HALF, bytesDownloaded: SIZE - HALF });
    expect(server.requests[2]).toMatchObject({ range: `bytes=${HALF}-`, ifRange: '"v1"', status: 206, bytesSent: SIZE - HALF });
  });

  it("trusts only the committed bytes: bytes past the sidecar's count are cut off before resuming", async () => {
    // As after a power cut between checkpoints: more bytes on disk than recorded, the extra ones garbage, running
    // past the end of the file (so garbage left in place would survive the resume).
    const committed = SIZE - 1000;
    await writeFile(`${dest}.part`, Buffer.concat([body.subarray(0, committed), randomBytes(5000)]));
    await writeFile(`${dest}.part.json`, JSON.stringify({ format: 1, url: server.url(), md5: md5Of(body), etag: '"v1"', last_modified: null, total: SIZE, committed }));
    const result = await downloadPackage(options());
    await expectDownloaded(result);
    expect(result.resumedFrom).toBe(committed);
    expect(server.requests[0]!.range).toBe(`bytes=${committed}-`);
  });

  const unusable: Array<[string, (url: string) => Record<string, unknown> | string | null, number]> = [
    ["no sidecar", () => null, HALF],
    ["a sidecar for another URL", () => ({ format: 1, url: "http://127.0.0.1:1/other.zip", md5: md5Of(body), etag: '"v1"', last_modified: null, total: SIZE, committed: HALF }), HALF],
    ["a sidecar for another MD5", (url) => ({ format: 1, url, md5: "0".repeat(32), etag: '"v1"', last_modified: null, total: SIZE, committed: HALF }), HALF],
    ["a sidecar claiming more than the part holds", (url) => ({ format: 1, url, md5: md5Of(body), etag: '"v1"', last_modified: null, total: SIZE, committed: HALF + 1 }), HALF],
    ["a torn sidecar", () => '{"format":1,"url":', HALF],
  ];
  it.each(unusable)("starts from zero with a part and %s", async (_name, sidecar, partBytes) => {
    await writeFile(`${dest}.part`, body.subarray(0, partBytes));
    const content = sidecar(server.url());
    if (content !== null) await writeFile(`${dest}.part.json`, typeof content === "string" ? content : JSON.stringify(content));
    const result = await downloadPackage(options());
    await expectDownloaded(result);
    expect(result).toMatchObject({ resumedFrom: 0, bytesDownloaded: SIZE });
    expect(server.requests.map((r) => r.range)).toEqual([undefined]);
  });

  it("removes the sidecar temp file a process killed mid-checkpoint left behind", async () => {
    // writeFileDurable's temp name, with a pid above Linux's pid_max: no such process.
    await writeFile(join(dir, ".pkg.zip.part.json.99999999.0badc0de.tmp"), "{");
    await expectDownloaded(await downloadPackage(options()));
  });

  it("does not ask the server again when the sidecar says the part is complete", async () => {
    await writeFile(`${dest}.part`, body);
    await writeFile(`${dest}.part.json`, JSON.stringify({ format: 1, url: server.url(), md5: md5Of(body), etag: '"v1"', last_modified: null, total: SIZE, committed: SIZE }));
    await expect(downloadPackage(options())).resolves.toMatchObject({ resumedFrom: SIZE, bytesDownloaded: 0, attempts: 0 });
    expect(server.requests).toHaveLength(0);
  });

  it("resumes after the downloading process was killed (SIGKILL) from the last checkpoint, never trusting more", async () => {
    const big = randomBytes(2 * 1024 * 1024);
    server.setFile({ body: big });
    server.plan({ stallAfter: 1536 * 1024 });
    // .mts: an ES module whatever package.json (or none) the temp dir sees. Not in `dir`, which must end up clean.
    const scriptDir = await mkdtemp(join(tmpdir(), "moonflash-download-child-"));
    onTestFinished(() => rm(scriptDir, { recursive: true, force: true }));
    const script = join(scriptDir, "child.mts");
    const moduleUrl = new URL("src/ota/download.ts", `file://${repoRoot}`).href;
    await writeFile(
      script,
      `import { downloadPackage } from ${JSON.stringify(moduleUrl)};\n` +
        `await downloadPackage({ url: ${JSON.stringify(server.url())}, dest: ${JSON.stringify(dest)}, md5: ${JSON.stringify(md5Of(big))}, checkpointBytes: 64 * 1024, stallTimeoutMs: 60000 });\n`,
    );
    const child = spawn(process.execPath, ["--import", "tsx", script], { cwd: repoRoot, stdio: "ignore" });
    const exited = new Promise((resolve) => child.on("exit", resolve));
    let committed = 0;
    const deadline = Date.now() + 15_000;
    while (committed < 1024 * 1024 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      const sidecar = await readSidecar().catch(() => null);
      if (sidecar === null) continue;
      committed = sidecar.committed as number;
      // Whenever it is read, the sidecar claims no more than the part file holds.
      expect((await stat(`${dest}.part`)).size).toBeGreaterThanOrEqual(committed);
    }
    child.kill("SIGKILL");
    await exited;
    expect(committed).toBeGreaterThanOrEqual(1024 * 1024);
    const finalCommitted = (await readSidecar()).committed as number;

    const result = await downloadPackage(options({ md5: md5Of(big), sha256: sha256Of(big) }));
    await expectDownloaded(result, big);
    expect(result).toMatchObject({ resumedFrom: finalCommitted, bytesDownloaded: big.length - finalCommitted, attempts: 1 });
    expect(server.requests[1]).toMatchObject({ range: `bytes=${finalCommitted}-`, status: 206 });
  });
});

describe("downloadPackage: disk space and parameters", () => {
  it("refuses with DISK_FULL before any request when the size plus the margin does not fit", async () => {
    const error = await downloadPackage(options({ size: SIZE, freeSpaceMarginBytes: 2 ** 52 })).catch((err: unknown) => err);
    expect(error).toMatchObject({ code: "DISK_FULL", details: { path: dir } });
    expect((error as Error).message).toContain("Free some space");
    expect(server.requests).toHaveLength(0);
    expect(await files()).toEqual([]);
  });

  it("refuses with DISK_FULL once the Content-Length shows the file does not fit", async () => {
    await expect(downloadPackage(options({ freeSpaceMarginBytes: 2 ** 52 }))).rejects.toMatchObject({ code: "DISK_FULL" });
    expect(server.requests).toHaveLength(1);
    expect(await files()).toEqual([]);
  });

  it("turns ENOSPC while writing into DISK_FULL and keeps nothing (the part file is /dev/full, on every Linux)", async () => {
    // The part file is a link to /dev/full, where every write fails with ENOSPC.
    await symlink("/dev/full", `${dest}.part`);
    const error = await downloadPackage(options()).catch((err: unknown) => err);
    expect(error).toMatchObject({ code: "DISK_FULL" });
    expect((error as Error).message).toContain("partial download was removed");
    expect(await files()).toEqual([]);
  });

  const bad: Array<[string, Partial<DownloadOptions>]> = [
    ["an ftp URL", { url: "ftp://example.com/pkg.zip" }],
    ["a file URL", { url: "file:///etc/passwd" }],
    ["no URL at all", { url: "not a url" }],
    ["an MD5 of 31 digits", { md5: "0".repeat(31) }],
    ["an MD5 that is not hex", { md5: "z".repeat(32) }],
    ["a SHA-256 of the wrong length", { sha256: "0".repeat(63) }],
    ["a negative size", { size: -1 }],
    ["a fractional retry count", { retries: 1.5 }],
  ];
  it.each(bad)("rejects %s with INVALID_PARAMS", async (_name, overrides) => {
    await expect(downloadPackage(options(overrides))).rejects.toMatchObject({ code: "INVALID_PARAMS" });
    expect(server.requests).toHaveLength(0);
  });
});

describe("http-range", () => {
  it.each([
    ["bytes 0-9/10", { kind: "range", start: 0, end: 9, total: 10 }],
    ["bytes 5-9/*", { kind: "range", start: 5, end: 9, total: null }],
    ["Bytes 5-9/10", { kind: "range", start: 5, end: 9, total: 10 }],
    ["bytes */10", { kind: "unsatisfied", total: 10 }],
    ["bytes 9-5/10", null],
    ["bytes 0-10/10", null],
    ["bytes 0-9/10, bytes 0-1/10", null],
    ["bytes 0-9/10 ", { kind: "range", start: 0, end: 9, total: 10 }],
    ["bytes 0 - 9/10", null],
    ["bytes 0-9", null],
    ["bytes 0-9/1e3", null],
    ["bytes 0-9/12345678901234567890", null],
    ["", null],
  ])("parseContentRange(%j)", (value, expected) => {
    expect(parseContentRange(value)).toEqual(expected);
  });

  it("checkPartialResponse requires start, end, total and length to match", () => {
    const point = { offset: 5, total: 10 };
    expect(checkPartialResponse(point, "bytes 5-9/10", "5")).toEqual({ ok: true, total: 10 });
    expect(checkPartialResponse(point, "bytes 4-9/10", undefined)).toMatchObject({ ok: false, reason: expect.stringContaining("starts at 4") });
    expect(checkPartialResponse(point, "bytes 5-8/10", undefined)).toMatchObject({ ok: false, reason: expect.stringContaining("ends at 8") });
    expect(checkPartialResponse(point, "bytes 5-9/10", undefined)).toEqual({ ok: true, total: 10 });
    expect(checkPartialResponse(point, "bytes 5-9/10", "6")).toMatchObject({ ok: false, reason: expect.stringContaining("Content-Length") });
    expect(checkPartialResponse(point, "bytes 5-9/10", "five")).toMatchObject({ ok: false });
    expect(checkPartialResponse(point, undefined, "5")).toMatchObject({ ok: false });
    expect(checkPartialResponse({ offset: 5, total: null }, "bytes 5-9/*", undefined)).toMatchObject({ ok: false, reason: expect.stringContaining("no total") });
    expect(checkPartialResponse({ offset: 5, total: null }, "bytes 5-9/10", undefined)).toEqual({ ok: true, total: 10 });
    expect(checkPartialResponse(point, "bytes 5-10/11", undefined)).toMatchObject({ ok: false, reason: expect.stringContaining("changed from 10 to 11") });
  });

  it("If-Range uses a strong ETag, else Last-Modified when there is no ETag at all", () => {
    expect(ifRangeValue({ etag: '"a"', lastModified: "date" })).toBe('"a"');
    expect(ifRangeValue({ etag: 'W/"a"', lastModified: "date" })).toBeNull();
    expect(ifRangeValue({ etag: null, lastModified: "date" })).toBe("date");
    expect(ifRangeValue({ etag: null, lastModified: null })).toBeNull();
  });

  it("validatorsChanged compares ETags, else Last-Modified, and assumes nothing when the answer has none", () => {
    expect(validatorsChanged({ etag: '"a"', lastModified: null }, { etag: '"b"', lastModified: null })).toBe(true);
    expect(validatorsChanged({ etag: '"a"', lastModified: null }, { etag: '"a"', lastModified: "x" })).toBe(false);
    expect(validatorsChanged({ etag: '"a"', lastModified: null }, { etag: null, lastModified: null })).toBe(false);
    expect(validatorsChanged({ etag: null, lastModified: "x" }, { etag: null, lastModified: "y" })).toBe(true);
  });

  it("retryAfterMs reads seconds and HTTP dates", () => {
    expect(retryAfterMs("3")).toBe(3000);
    expect(retryAfterMs("Wed, 21 Oct 2026 07:28:10 GMT", Date.parse("Wed, 21 Oct 2026 07:28:00 GMT"))).toBe(10_000);
    expect(retryAfterMs("soon")).toBeNull();
    expect(retryAfterMs(undefined)).toBeNull();
  });
});
