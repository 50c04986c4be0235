// `[ota] callback_url`: every OTA job event (stage, progress, warnings and errors, result with its code) POSTed as
// JSON to the vendor's device API, the way the vendor's service reported to http://127.0.0.1:9080/api/v1.0/ota/report.
//
// An adapter like the agent events: it subscribes to the job runner and never blocks a job. Reports go one at a
// time, in order; a report that fails (no answer, a timeout, 5xx, 408 or 429) is retried with backoff while later
// ones wait, and dropped with a warning after the last attempt. While one waits, newer progress replaces older
// progress, so a slow or absent receiver costs a bounded queue, never memory that grows with the download.
//
// Body: {source, seq, ts, job_id, target, event, ...the event's fields, status}, where status is ota.status at the
// time of the event. A 4xx other than 408 and 429 says the receiver will never take this body: not retried.

import type { Logger } from "pino";
import type { JobEvent } from "../core/events.js";

export interface CallbackReporterOptions {
  url: string;
  logger: Logger;
  /** ota.status() when the event happens. */
  status: () => unknown;
  /** Attempts per report, the first included. Default 6 (about a minute of retries with the defaults). */
  attempts?: number;
  /** First wait before a retry, doubled each time up to maxBackoffMs. Defaults 500 and 30 000. */
  backoffMs?: number;
  maxBackoffMs?: number;
  /** One POST's limit. Default 5000. */
  timeoutMs?: number;
  /** Reports kept while the receiver is away; the oldest progress, then the oldest reports, go first. Default 100. */
  maxQueued?: number;
  /** `User-Agent`. */
  userAgent?: string;
}

interface Report {
  body: string;
  progress: boolean;
}

class PostFailure extends Error {
  constructor(
    message: string,
    readonly retry: boolean,
  ) {
    super(message);
  }
}

export class CallbackReporter {
  private readonly queue: Report[] = [];
  private sending = false;
  private seq = 0;
  private dropped = 0;
  private closed = false;
  private wake: (() => void) | null = null;
  private inFlight: import("node:http").ClientRequest | null = null;
  private idle: Array<() => void> = [];
  private readonly attempts: number;
  private readonly backoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly timeoutMs: number;
  private readonly maxQueued: number;
  /** Where the URL is said in logs: no credentials, no query. */
  private readonly where: string;

  constructor(private readonly opts: CallbackReporterOptions) {
    this.attempts = opts.attempts ?? 6;
    this.backoffMs = opts.backoffMs ?? 500;
    this.maxBackoffMs = opts.maxBackoffMs ?? 30_000;
    this.timeoutMs = opts.timeoutMs ?? 5000;
    this.maxQueued = opts.maxQueued ?? 100;
    const url = new URL(opts.url);
    this.where = `${url.protocol}//${url.host}${url.pathname}`;
  }

  /** The runner listener: OTA events only; returns at once. */
  readonly onJobEvent = (event: JobEvent): void => {
    if (event.kind !== "ota" || this.closed) return;
    if (event.type === "log" && event.level !== "warn" && event.level !== "error") return;
    const { jobId, target, ts, type, kind: _kind, ...fields } = event;
    let status: unknown = null;
    try {
      status = this.opts.status();
    } catch {
      status = null;
    }
    const body = JSON.stringify({ source: "moonflash", seq: ++this.seq, ts, job_id: jobId, target, event: type, ...fields, status });
    this.enqueue({ body, progress: type === "progress" });
  };

  /** Waits until every queued report is sent or given up, at most `timeoutMs`; a CLI run calls it before it exits. */
  async flush(timeoutMs: number): Promise<void> {
    if (!this.sending && this.queue.length === 0) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      new Promise<void>((resolve) => this.idle.push(resolve)),
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, timeoutMs);
        timer.unref();
      }),
    ]);
    clearTimeout(timer);
  }

  /** Stops taking events, ends the retry wait and the POST in flight; what is still queued is dropped. */
  close(): void {
    this.closed = true;
    this.queue.length = 0;
    this.wake?.();
    this.inFlight?.destroy(new PostFailure("the reporter was closed", false));
  }

  private enqueue(report: Report): void {
    // Newer progress replaces progress still waiting: the receiver wants where the job is, not where it was.
    const last = this.queue.at(-1);
    if (report.progress && last?.progress && (this.queue.length > 1 || !this.sending)) {
      this.queue[this.queue.length - 1] = report;
    } else {
      this.queue.push(report);
    }
    while (this.queue.length > this.maxQueued) {
      const oldestProgress = this.queue.findIndex((r, i) => r.progress && (i > 0 || !this.sending));
      this.queue.splice(oldestProgress >= 0 ? oldestProgress : this.sending ? 1 : 0, 1);
      this.dropped += 1;
    }
    if (!this.sending) void this.drain();
  }

  private async drain(): Promise<void> {
    this.sending = true;
    try {
      while (this.queue.length > 0 && !this.closed) {
        await this.deliver(this.queue[0]!);
        this.queue.shift();
      }
    } finally {
      this.sending = false;
      for (const resolve of this.idle.splice(0)) resolve();
    }
  }

  private async deliver(report: Report): Promise<void> {
    let wait = this.backoffMs;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.post(report.body);
        if (this.dropped > 0) {
          this.opts.logger.warn({ url: this.where, dropped: this.dropped }, `OTA reports: ${this.dropped} report(s) dropped while ${this.where} did not answer`);
          this.dropped = 0;
        }
        return;
      } catch (err) {
        const failure = err instanceof PostFailure ? err : new PostFailure(String(err), true);
        if (!failure.retry || attempt >= this.attempts || this.closed) {
          this.opts.logger.warn({ url: this.where, attempts: attempt }, `OTA report not delivered to ${this.where}: ${failure.message}`);
          return;
        }
        this.opts.logger.debug({ url: this.where, attempt }, `OTA report to ${this.where} failed (${failure.message}); retrying in ${wait} ms`);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, wait);
          this.wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.wake = null;
        wait = Math.min(wait * 2, this.maxBackoffMs);
      }
    }
  }

  private post(body: string): Promise<void> {
    const url = new URL(this.opts.url);
    const http = process.getBuiltinModule(url.protocol === "https:" ? "node:https" : "node:http") as typeof import("node:http");
    return new Promise<void>((resolve, reject) => {
      const req = http.request(url, {
        method: "POST",
        headers: {
          "Content-Type": "application/json; charset=utf-8",
          "Content-Length": Buffer.byteLength(body),
          ...(this.opts.userAgent ? { "User-Agent": this.opts.userAgent } : {}),
        },
        timeout: this.timeoutMs,
      });
      this.inFlight = req;
      req.on("close", () => {
        if (this.inFlight === req) this.inFlight = null;
      });
      req.on("timeout", () => req.destroy(new PostFailure(`no answer within ${this.timeoutMs} ms`, true)));
      req.on("error", (err) => reject(err instanceof PostFailure ? err : new PostFailure((err as NodeJS.ErrnoException).code ?? err.message, true)));
      req.on("response", (res) => {
        res.resume();
        const status = res.statusCode ?? 0;
        if (status >= 200 && status < 300) resolve();
        else reject(new PostFailure(`HTTP ${status}`, status >= 500 || status === 408 || status === 429));
      });
      req.end(body);
    });
  }
}
