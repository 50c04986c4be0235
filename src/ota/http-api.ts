// The vendor HTTP API ([ota] http_port, off by default): the three calls a printer vendor's existing tools make,
// on node:http alone, bound to [ota] http_bind (127.0.0.1 by default). It adds nothing to the engine: each call is
// an OtaEngine call, its params checked with ota.download's own zod schema.
//
//   POST /download  {url, md5, sha256?, size?}  → 202 {accepted: true, state}; the download runs in the background
//   POST /update                                 → 202 {accepted: true, state}; the install runs in the background
//   GET  /progress                               → 200 engine.status()
//
// A refusal the engine makes before its job starts (BUSY, PRINTER_BUSY, NO_PACKAGE, INVALID_PARAMS…) is answered
// with its code's HTTP status and {error: {code, message}}; a failure later is the state's lastError in /progress.

import { once } from "node:events";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import type { Logger } from "pino";
import { MoonflashError, toMoonflashError } from "../core/errors.js";
import type { DownloadParams, OtaEngine } from "./engine.js";
import { otaDownloadParams } from "./download-params.js";

/** Largest request body read. */
export const MAX_BODY_BYTES = 64 * 1024;

/** How long a call waits for its job to be under way (or refused) before it answers 202 anyway. */
const START_WAIT_MS = 2_000;

export interface OtaHttpApiOptions {
  engine: OtaEngine;
  /** 0: any free port (tests). */
  port: number;
  /** Address to listen on; 127.0.0.1 by default. */
  host?: string;
  logger: Logger;
}

export interface OtaHttpApi {
  /** The port listened on. */
  port: number;
  close(): Promise<void>;
}

const ROUTES: Record<string, string> = { "/download": "POST", "/update": "POST", "/progress": "GET" };

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const data = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json; charset=utf-8", "Content-Length": Buffer.byteLength(data), "Cache-Control": "no-store", ...headers });
  res.end(data);
}

function sendError(res: ServerResponse, err: unknown, headers: Record<string, string> = {}): void {
  if (err instanceof HttpError) return send(res, err.status, { error: { code: err.code, message: err.message } }, headers);
  const e = toMoonflashError(err);
  send(res, e.status, { error: { code: e.code, message: e.message } }, headers);
}

/** The body as text, at most MAX_BODY_BYTES (413 beyond). */
async function readBody(req: IncomingMessage): Promise<string> {
  const declared = Number(req.headers["content-length"]);
  if (Number.isFinite(declared) && declared > MAX_BODY_BYTES) throw new HttpError(413, "PAYLOAD_TOO_LARGE", `The request body is over ${MAX_BODY_BYTES} bytes.`);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new HttpError(413, "PAYLOAD_TOO_LARGE", `The request body is over ${MAX_BODY_BYTES} bytes.`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

function parseDownload(text: string): DownloadParams {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw new MoonflashError("INVALID_PARAMS", "The body must be a JSON object {url, md5, sha256?, size?}.");
  }
  const result = otaDownloadParams.safeParse(raw);
  if (!result.success) {
    const problems = result.error.issues.map((i) => (i.code === "unrecognized_keys" ? `unknown field(s) ${i.keys.join(", ")}` : `${i.path.length ? i.path.join(".") : "body"}: ${i.message}`));
    throw new MoonflashError("INVALID_PARAMS", problems.join("; "), { issues: result.error.issues.map((i) => ({ path: i.path.map(String), message: i.message })) });
  }
  const { url, md5, sha256, size } = result.data;
  return { url, md5, ...(sha256 === undefined ? {} : { sha256 }), ...(size === undefined ? {} : { size }) };
}

/**
 * Starts `work` in the background and resolves once it is refused (rejects with the refusal) or under way: a new
 * OTA job of the engine has left its "starting" stage, or the work finished, or START_WAIT_MS passed.
 */
async function startInBackground(engine: OtaEngine, work: () => Promise<unknown>, onLateError: (err: unknown) => void): Promise<void> {
  const before = engine.status().job?.id ?? null;
  let settled: { error: unknown } | { ok: true } | null = null;
  const running = work().then(
    () => void (settled = { ok: true }),
    (error: unknown) => void (settled = { error }),
  );
  const deadline = Date.now() + START_WAIT_MS;
  for (;;) {
    const outcome = settled as { error: unknown } | { ok: true } | null;
    if (outcome) {
      if ("error" in outcome) throw outcome.error;
      return;
    }
    const job = engine.status().job;
    if ((job && job.id !== before && job.stage !== "starting") || Date.now() >= deadline) break;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  void running.then(() => {
    const outcome = settled as { error: unknown } | { ok: true } | null;
    if (outcome && "error" in outcome) onLateError(outcome.error);
  });
}

export async function startOtaHttpApi(opts: OtaHttpApiOptions): Promise<OtaHttpApi> {
  const { engine } = opts;
  const logger = opts.logger.child({ ns: "ota-http" });
  // A download of the same params while this API's download runs joins it (202) instead of answering BUSY, as
  // ota.download does: a vendor tool that lost its answer asks again.
  let downloading: string | null = null;
  const keyOf = (p: DownloadParams) => JSON.stringify([p.url, p.md5.toLowerCase(), p.sha256?.toLowerCase() ?? null, p.size ?? null]);
  const lateError = (what: string) => (err: unknown) => {
    const e = toMoonflashError(err);
    logger.warn({ code: e.code }, `${what} failed: ${e.message}`);
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const path = new URL(req.url ?? "/", "http://localhost").pathname;
    const allowed = ROUTES[path];
    if (!allowed) throw new HttpError(404, "NOT_FOUND", `No ${path} here; the OTA API has POST /download, POST /update and GET /progress.`);
    if (req.method !== allowed && !(allowed === "GET" && req.method === "HEAD")) {
      req.resume();
      return sendError(res, new HttpError(405, "METHOD_NOT_ALLOWED", `${path} takes ${allowed}.`), { Allow: allowed });
    }
    if (path === "/progress") return send(res, 200, engine.status());
    const body = await readBody(req);
    if (path === "/download") {
      const params = parseDownload(body);
      const key = keyOf(params);
      if (downloading !== key) {
        const u = new URL(params.url);
        logger.info({ url: `${u.origin}${u.pathname}` }, "POST /download");
        await startInBackground(
          engine,
          async () => {
            // Only while nothing else of ours runs: a refused download must not forget the running one.
            const mine = downloading === null;
            if (mine) downloading = key;
            try {
              await engine.download(params);
            } finally {
              if (mine) downloading = null;
            }
          },
          lateError("the download"),
        );
      }
    } else {
      logger.info("POST /update");
      await startInBackground(engine, () => engine.install(), lateError("the update"));
    }
    send(res, 202, { accepted: true, state: engine.status().state });
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (res.headersSent) return void res.destroy();
      if (err instanceof HttpError && err.status === 413) res.setHeader("Connection", "close");
      sendError(res, err);
    });
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  server.listen(opts.port, opts.host ?? "127.0.0.1");
  await Promise.race([once(server, "listening"), once(server, "error").then(([err]) => Promise.reject(err as Error))]);
  const address = server.address() as AddressInfo;
  return {
    port: address.port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
