// The read-only live status page ([status_page]): while Klipper is stopped for a flash, Mainsail and Fluidd show
// nothing of moonflash, so this small node:http server shows the job, its progress, per-board rows, its log tail,
// the recent history and whether Klipper and Moonraker are connected, live over server-sent events.
//
//   GET /             the page (inline CSS and script, no external assets; may be framed: Mainsail shows it as an
//                     iframe webcam)
//   GET /events       SSE: a `snapshot` on connect, then `job` per job event, `history` after a result, `printer`
//                     per state change; a comment every 15 s keeps proxies from closing the stream
//   GET /status.json  the snapshot
//
// Nothing here starts, cancels or changes anything: GET and HEAD only. It listens on every address by default and
// has no login, so it passes on only redacted texts (src/status/view.ts). Loaded on demand (await import()): it is
// the only part of the agent that needs node:http at rest.

import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { Logger } from "pino";
import type { JobEvent } from "../core/events.js";
import type { JobRunner } from "../core/jobs.js";
import type { PrinterPort, PrinterState } from "../core/printer.js";
import type { Socket } from "node:net";
import { listenForPage, type ConnectionSink } from "./listener.js";
import { PAGE_SCRIPT, renderPage } from "./page-html.js";
import { HISTORY_ROWS, historyRows, JobTracker, pageJson, printerView, type Snapshot } from "./view.js";

export interface StatusPageOptions {
  runner: Pick<JobRunner, "on" | "current" | "history">;
  printer: Pick<PrinterPort, "state" | "onStateChange">;
  /** Address to listen on ([status_page] bind). */
  host: string;
  /** 0: any free port (tests). */
  port: number;
  logger: Logger;
  version?: string;
  /** Milliseconds between SSE keep-alive comments; 15 s by default. */
  heartbeatMs?: number;
}

export interface StatusPage {
  /** The port listened on. */
  readonly port: number;
  readonly host: string;
  close(): Promise<void>;
}

/** Open /events streams at most: each holds a socket and a buffer on a small printer. */
export const MAX_SSE_CLIENTS = 20;
const HEARTBEAT_MS = 15_000;
/** A viewer that reads slower than this much behind is dropped; its browser reconnects and gets a fresh snapshot. */
const MAX_BUFFERED_BYTES = 256 * 1024;
/** How long EventSource waits before reconnecting (the SSE `retry:` field). */
const RETRY_MS = 3_000;
/** How long close() lets open connections finish before it cuts them. */
const CLOSE_GRACE_MS = 200;

let csp: string | null = null;
/**
 * The page's Content-Security-Policy: its one inline script by hash, nothing from elsewhere. No frame-ancestors and
 * no X-Frame-Options: Mainsail and Fluidd frame the page. node:crypto is loaded when a browser first asks for the
 * page, not when the server starts (about 1 MB of RSS at rest).
 */
function pageCsp(): string {
  csp ??= [
    "default-src 'none'",
    `script-src 'sha256-${process.getBuiltinModule("node:crypto").createHash("sha256").update(PAGE_SCRIPT).digest("base64")}'`,
    "style-src 'unsafe-inline'",
    "connect-src 'self'",
    "img-src data:",
    "base-uri 'none'",
    "form-action 'none'",
  ].join("; ");
  return csp;
}

const COMMON_HEADERS = { "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer" };
const ROUTES = new Set(["/", "/events", "/status.json"]);

/** Listens on opts.host:opts.port and serves the page at once (tests, and any caller that wants it loaded now). */
export async function startStatusPage(opts: StatusPageOptions): Promise<StatusPage> {
  const page = createStatusPage(opts);
  try {
    const listener = await listenForPage({ host: opts.host, port: opts.port, logger: opts.logger, load: async () => page });
    await listener.load();
    return { port: listener.port, host: listener.host, close: () => listener.close() };
  } catch (err) {
    await page.close();
    throw err;
  }
}

/**
 * The page's HTTP server, not listening: it serves the sockets it is given (src/status/listener.ts holds the port).
 * It follows the runner and the printer from its creation on.
 */
export function createStatusPage(opts: Omit<StatusPageOptions, "host" | "port">): ConnectionSink {
  const { runner, printer } = opts;
  // A logger the caller already named keeps its name (pino would write "ns" twice).
  const logger = opts.logger.bindings().ns === undefined ? opts.logger.child({ ns: "status-page" }) : opts.logger;
  const version = opts.version ?? null;
  const tracker = new JobTracker();
  logger.debug("status page loaded");
  const clients = new Set<ServerResponse>();
  let lastPrinter = pageJson(printerView(printer.state()));

  const snapshot = (): Snapshot => {
    const { job, log } = tracker.view(runner.current());
    return { version, time: new Date().toISOString(), printer: printerView(printer.state()), job, log, history: historyRows(runner.history(undefined, HISTORY_ROWS)) };
  };

  const send = (res: ServerResponse, chunk: string): void => {
    if (res.writableLength > MAX_BUFFERED_BYTES) {
      logger.debug("dropping a status page viewer that does not keep up");
      clients.delete(res);
      res.destroy();
      return;
    }
    res.write(chunk);
  };
  const broadcast = (event: string, data: string): void => {
    const chunk = `event: ${event}\ndata: ${data}\n\n`;
    for (const res of clients) send(res, chunk);
  };

  const onJobEvent = (event: JobEvent): void => {
    const update = tracker.apply(event);
    if (clients.size === 0) return;
    if (update) broadcast("job", pageJson(update));
    // The runner records the job in history before it tells the result.
    if (event.type === "result") broadcast("history", pageJson(historyRows(runner.history(undefined, HISTORY_ROWS))));
  };
  const onPrinterState = (state: PrinterState): void => {
    const view = pageJson(printerView(state));
    if (view === lastPrinter) return;
    lastPrinter = view;
    broadcast("printer", view);
  };

  const openStream = (req: IncomingMessage, res: ServerResponse): void => {
    if (clients.size >= MAX_SSE_CLIENTS) {
      res.writeHead(503, { ...COMMON_HEADERS, "Content-Type": "text/plain; charset=utf-8", "Retry-After": "10" });
      res.end(`Too many status pages are open (${MAX_SSE_CLIENTS}); close one and reload.\n`);
      return;
    }
    res.writeHead(200, {
      ...COMMON_HEADERS,
      "Content-Type": "text/event-stream; charset=utf-8",
      Connection: "keep-alive",
      // nginx (Mainsail's, a reverse proxy) would hold events back in its buffer.
      "X-Accel-Buffering": "no",
    });
    req.socket.setNoDelay(true);
    clients.add(res);
    res.on("close", () => clients.delete(res));
    res.write(`retry: ${RETRY_MS}\nevent: snapshot\ndata: ${pageJson(snapshot())}\n\n`);
  };

  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    // The body of a request is never read; drain it so the socket can be reused or closed.
    req.resume();
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { ...COMMON_HEADERS, Allow: "GET, HEAD", "Content-Type": "text/plain; charset=utf-8" });
      res.end("The moonflash status page only shows; it takes GET and HEAD.\n");
      return;
    }
    const path = new URL(req.url ?? "/", "http://localhost").pathname;
    if (!ROUTES.has(path)) {
      res.writeHead(404, { ...COMMON_HEADERS, "Content-Type": "text/plain; charset=utf-8" });
      res.end(`No ${path} here; the status page is /, /events and /status.json.\n`);
      return;
    }
    const head = req.method === "HEAD";
    if (path === "/events") {
      if (!head) return openStream(req, res);
      res.writeHead(200, { ...COMMON_HEADERS, "Content-Type": "text/event-stream; charset=utf-8" });
      res.end();
      return;
    }
    const body =
      path === "/"
        ? renderPage(pageJson(snapshot()), version)
        : JSON.stringify(snapshot());
    const type = path === "/" ? "text/html; charset=utf-8" : "application/json; charset=utf-8";
    res.writeHead(200, {
      ...COMMON_HEADERS,
      "Content-Type": type,
      "Content-Length": Buffer.byteLength(body),
      ...(path === "/" ? { "Content-Security-Policy": pageCsp() } : {}),
    });
    res.end(head ? undefined : body);
  };

  const server = createServer((req, res) => {
    try {
      handle(req, res);
    } catch (err) {
      logger.error({ err }, "status page request failed");
      if (res.headersSent) return void res.destroy();
      res.writeHead(500, { ...COMMON_HEADERS, "Content-Type": "text/plain; charset=utf-8" });
      res.end("The status page failed; see moonflash.log.\n");
    }
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  // Streams, a few page loads and nothing more: the page must not be a way to exhaust the printer's sockets.
  server.maxConnections = MAX_SSE_CLIENTS + 20;
  server.on("clientError", (_err, socket) => socket.destroy());

  const unsubscribeJobs = runner.on(onJobEvent);
  const unsubscribePrinter = printer.onStateChange(onPrinterState);
  const heartbeat = setInterval(() => {
    for (const res of clients) send(res, ": keep-alive\n\n");
  }, opts.heartbeatMs ?? HEARTBEAT_MS);
  heartbeat.unref();

  // http.Server tracks connections (closeIdleConnections, closeAllConnections) only once it listens itself, and
  // this one is handed its sockets: it keeps them here.
  const sockets = new Set<Socket>();
  let closing: Promise<void> | null = null;
  return {
    accept: (socket) => {
      if (closing) return void socket.destroy();
      sockets.add(socket);
      socket.once("close", () => sockets.delete(socket));
      server.emit("connection", socket);
    },
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        clearInterval(heartbeat);
        unsubscribeJobs();
        unsubscribePrinter();
        // Ended streams let browsers reconnect at once (to the next server, after a restart); whatever is still
        // open a moment later is cut.
        for (const res of clients) res.end();
        clients.clear();
        for (const socket of sockets) socket.end();
        setTimeout(() => {
          for (const socket of sockets) socket.destroy();
          resolve();
        }, CLOSE_GRACE_MS);
      })),
  };
}
