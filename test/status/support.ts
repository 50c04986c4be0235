// What the status page tests share: a real JobRunner on a temp data dir, a printer whose state the test sets, the
// page on 127.0.0.1:0, and a small server-sent-events reader on node:http (what a browser's EventSource does).

import { mkdtemp, rm } from "node:fs/promises";
import { request, type IncomingHttpHeaders } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { JobRunner } from "../../src/core/jobs.js";
import { initialPrinterState, type PrinterState } from "../../src/core/printer.js";
import { startStatusPage, type StatusPage, type StatusPageOptions } from "../../src/status/page-server.js";

export class TestPrinter {
  private current: PrinterState = { ...initialPrinterState(), moonrakerConnected: true, klippyConnected: true, klippyState: "ready", printState: "standby" };
  private readonly listeners = new Set<(state: PrinterState) => void>();

  state(): PrinterState {
    return this.current;
  }

  onStateChange(listener: (state: PrinterState) => void): () => void {
    this.listeners.add(listener);
    return () => void this.listeners.delete(listener);
  }

  set(change: Partial<PrinterState>): void {
    this.current = { ...this.current, ...change };
    for (const listener of this.listeners) listener(this.current);
  }

  get listenerCount(): number {
    return this.listeners.size;
  }
}

export interface PageFixture {
  dataDir: string;
  runner: JobRunner;
  printer: TestPrinter;
  page: StatusPage;
  url: (path: string) => string;
  cleanup: () => Promise<void>;
}

export async function startFixture(extra: Partial<StatusPageOptions> = {}): Promise<PageFixture> {
  const dataDir = await mkdtemp(join(tmpdir(), "moonflash-status-"));
  const logger = pino({ level: "silent" });
  const runner = new JobRunner({ dataDir, logger });
  const printer = new TestPrinter();
  const page = await startStatusPage({ runner, printer, host: "127.0.0.1", port: 0, logger, version: "0.1.0-test", ...extra });
  return {
    dataDir,
    runner,
    printer,
    page,
    url: (path) => `http://127.0.0.1:${page.port}${path}`,
    cleanup: async () => {
      await page.close();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

export interface HttpResult {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

export function fetchText(url: string, method = "GET", body?: string): Promise<HttpResult> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

export interface SseMessage {
  event: string;
  data: string;
}

/** One /events stream, parsed as EventSource parses it: messages, comments and the retry field. */
export class SseReader {
  readonly messages: SseMessage[] = [];
  readonly comments: string[] = [];
  raw = "";
  status = 0;
  headers: IncomingHttpHeaders = {};
  /** Resolves when the server ends or cuts the stream. */
  readonly ended: Promise<void>;
  private buffer = "";
  private waiters: Array<() => void> = [];
  private readonly req;

  constructor(url: string) {
    let ended!: () => void;
    this.ended = new Promise((resolve) => (ended = resolve));
    this.req = request(url, { agent: false, headers: { Accept: "text/event-stream" } });
    this.req.on("response", (res) => {
      this.status = res.statusCode ?? 0;
      this.headers = res.headers;
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => this.feed(chunk));
      res.on("close", ended);
      this.wake();
    });
    this.req.on("error", () => ended());
    this.req.on("close", ended);
    this.req.end();
  }

  /** Waits until a message satisfies `match` (looking at those already received too); returns it. */
  async next(match: (m: SseMessage) => boolean, timeoutMs = 5_000): Promise<SseMessage> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.messages.find(match);
      if (found) return found;
      if (Date.now() > deadline) throw new Error(`no such SSE message within ${timeoutMs} ms; got ${this.messages.map((m) => m.event).join(", ")}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 50);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** The parsed data of every message of this event name, in order. */
  data<T = unknown>(event: string): T[] {
    return this.messages.filter((m) => m.event === event).map((m) => JSON.parse(m.data) as T);
  }

  async response(): Promise<void> {
    while (this.status === 0) await new Promise((resolve) => setTimeout(resolve, 10));
  }

  close(): void {
    this.req.destroy();
  }

  private feed(chunk: string): void {
    this.raw += chunk;
    this.buffer += chunk;
    let end: number;
    while ((end = this.buffer.indexOf("\n\n")) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      let event = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) this.comments.push(line.slice(1).trim());
        else if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length > 0) this.messages.push({ event, data: data.join("\n") });
    }
    this.wake();
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }
}

export function deferred<T = void>() {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}
