// Runs one job (flash or OTA) at a time across processes: an in-process slot plus the job lock file,
// typed events to listeners, durable history, cancellation through the JobContext's AbortSignal.

import type { Logger } from "pino";
import { isMoonflashError, MoonflashError, toMoonflashError } from "./errors.js";
import type { JobBoard, JobContext, JobEvent, JobKind, LogLevel, ProgressUnit } from "./events.js";
import { appendJob, HISTORY_LIMIT, listJobs, type JobRecord } from "./history.js";
import { acquireJobLock, busyError, type JobLock, type JobLockInfo } from "./lock.js";
import { dataPaths, type DataPaths } from "./paths.js";
// node:crypto is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

export type { JobRecord } from "./history.js";

export interface JobSpec {
  kind: JobKind;
  /** What the job acts on, e.g. "mcu toolhead". */
  target: string;
  /** Recorded in history as given; keep it plain JSON. */
  params?: unknown;
}

export interface JobProgress {
  done: number;
  total: number;
  unit: ProgressUnit;
  phase?: string;
}

export interface CurrentJob {
  id: string;
  kind: JobKind;
  target: string;
  stage: string;
  progress: JobProgress | null;
  startedAt: string;
  cancellable: boolean;
  /** Why cancel is refused right now, when it is. */
  cancelReason?: string;
}

/** A job that was running when the process died, found by an engine's crash journal. */
export interface InterruptedJob {
  id: string;
  kind: JobKind;
  target: string;
  params?: unknown;
  startedAt: string;
  message?: string;
}

export type JobListener = (event: JobEvent) => void;

interface ActiveJob {
  info: JobLockInfo;
  stage: string;
  progress: JobProgress | null;
  cancellable: boolean;
  cancelReason: string | undefined;
  controller: AbortController;
}

function compactUtc(date: Date): string {
  return date.toISOString().slice(0, 19).replace(/[-:]/g, "");
}

/** Short ids that sort by start time: flash-20261123T124500-ab12 (UTC). */
export function makeJobId(kind: JobKind, at: Date): string {
  return `${kind}-${compactUtc(at)}-${process.getBuiltinModule("node:crypto").randomBytes(2).toString("hex")}`;
}

function cancelledError(jobId: string, cause?: unknown): MoonflashError {
  return new MoonflashError(
    "CANCELLED",
    "The job was cancelled before anything was written; start it again when ready.",
    { jobId },
    cause === undefined ? undefined : { cause },
  );
}

export class JobRunner {
  private readonly logger: Logger;
  private readonly now: () => Date;
  private readonly paths: DataPaths;
  private readonly listeners = new Set<JobListener>();
  private active: ActiveJob | null = null;
  /** The running job's progress throttle: its held-back value goes out before any other event of that job. */
  private progressThrottle: { jobId: string; throttle: ProgressThrottle<JobProgress> } | null = null;

  constructor(opts: { dataDir: string; logger: Logger; now?: () => Date }) {
    this.logger = opts.logger;
    this.now = opts.now ?? (() => new Date());
    this.paths = dataPaths(opts.dataDir);
  }

  /** Runs `work` as the one job of this machine; throws BUSY when another job runs here or in another process. */
  async run<T>(spec: JobSpec, work: (ctx: JobContext) => Promise<T>): Promise<T> {
    if (this.active) throw busyError(this.active.info);
    const startedAt = this.now();
    const info: JobLockInfo = {
      jobId: makeJobId(spec.kind, startedAt),
      kind: spec.kind,
      target: spec.target,
      pid: process.pid,
      startedAt: startedAt.toISOString(),
    };
    // Claimed before the first await so a second run() in the same tick sees it.
    const job: ActiveJob = {
      info,
      stage: "starting",
      progress: null,
      cancellable: true,
      cancelReason: undefined,
      controller: new AbortController(),
    };
    this.active = job;

    let lock: JobLock;
    try {
      lock = await acquireJobLock(this.paths.lock, info);
    } catch (err) {
      this.active = null;
      throw toMoonflashError(err);
    }

    const log = this.logger.child({ jobId: info.jobId, kind: info.kind, target: info.target });
    let finished = false;
    // An engine reports progress per block (thousands per flash): the event is built only when the throttle lets
    // one out. Building one per call, each with its own timestamp string, made up most of what a flash allocated
    // and kept V8's young generation growing (docs/BENCHMARKS.md).
    const throttle = new ProgressThrottle<JobProgress>(
      1000 / PROGRESS_PER_SECOND,
      (progress) => this.deliver({ ...this.base(info), type: "progress", ...progress }),
      (err) => this.logger.error({ err }, "job event listener failed"),
    );
    this.progressThrottle = { jobId: info.jobId, throttle };
    const ctx: JobContext = {
      jobId: info.jobId,
      kind: info.kind,
      target: info.target,
      signal: job.controller.signal,
      stage: (stage, message, board) => {
        if (finished) return;
        job.stage = stage;
        log.info({ stage }, message ?? `stage ${stage}`);
        this.emit({ ...this.base(info), type: "stage", stage, ...(message === undefined ? {} : { message }), ...(board === undefined ? {} : { board }) });
      },
      progress: (done, total, unit, phase) => {
        if (finished) return;
        const progress = job.progress;
        // Updated in place within a phase (status and the throttle read the latest); a new phase gets a new object,
        // so the value the throttle still holds for the old phase stays that phase's last.
        if (progress && progress.unit === unit && progress.phase === phase) {
          progress.done = done;
          progress.total = total;
        } else {
          job.progress = { done, total, unit, ...(phase === undefined ? {} : { phase }) };
        }
        throttle.offer(phase ?? "", job.progress!);
      },
      log: (level: LogLevel, message: string, board?: JobBoard) => {
        if (finished) return;
        log[level](message);
        this.emit({ ...this.base(info), type: "log", level, message, ...(board === undefined ? {} : { board }) });
      },
      setCancellable: (cancellable, reason) => {
        job.cancellable = cancellable;
        job.cancelReason = cancellable ? undefined : reason;
      },
    };

    log.info({ params: spec.params }, "job started");
    ctx.stage("started");

    let outcome: { ok: true; value: T } | { ok: false; error: MoonflashError };
    try {
      if (job.controller.signal.aborted) throw cancelledError(info.jobId);
      outcome = { ok: true, value: await work(ctx) };
    } catch (err) {
      // Whatever an engine throws after a cancel (AbortError, a stream error) means "cancelled".
      const error = job.controller.signal.aborted && !isMoonflashError(err) ? cancelledError(info.jobId, err) : toMoonflashError(err);
      outcome = { ok: false, error };
    }
    finished = true;

    const record: JobRecord = {
      id: info.jobId,
      kind: info.kind,
      target: info.target,
      ...(spec.params === undefined ? {} : { params: spec.params }),
      startedAt: info.startedAt,
      finishedAt: this.now().toISOString(),
      ok: outcome.ok,
      ...(outcome.ok
        ? outcome.value === undefined ? {} : { result: outcome.value }
        : { code: outcome.error.code, message: outcome.error.message }),
    };
    try {
      await appendJob(this.paths.history, record, this.logger);
    } catch (err) {
      log.error({ err }, "could not record the job in history");
    }
    try {
      await lock.release();
    } catch (err) {
      log.error({ err, path: lock.path }, "could not remove the job lock; the next job will find it stale");
    }
    // The slot is free before listeners hear the result, so a listener may start the next job at once.
    this.active = null;
    throttle.flush();
    this.progressThrottle = null;

    if (outcome.ok) {
      log.info("job succeeded");
      this.emit({ ...this.base(info), type: "result", ok: true, ...(outcome.value === undefined ? {} : { details: outcome.value }) });
      return outcome.value;
    }
    const { error } = outcome;
    log.warn({ code: error.code, details: error.details }, `job failed: ${error.message}`);
    this.emit({ ...this.base(info), type: "result", ok: false, code: error.code, message: error.message, details: error.details });
    throw error;
  }

  /** The running job of this process, or null. */
  current(): CurrentJob | null {
    const job = this.active;
    if (!job) return null;
    return {
      id: job.info.jobId,
      kind: job.info.kind,
      target: job.info.target,
      stage: job.stage,
      progress: job.progress && { ...job.progress },
      startedAt: job.info.startedAt,
      cancellable: job.cancellable,
      ...(job.cancelReason === undefined ? {} : { cancelReason: job.cancelReason }),
    };
  }

  /** Aborts the running job's signal. NO_JOB when none (of that kind) runs; CANCEL_REFUSED while not cancellable. */
  cancel(kind?: JobKind): { id: string } {
    const job = this.active;
    if (!job || (kind !== undefined && job.info.kind !== kind)) {
      throw new MoonflashError("NO_JOB", `No ${kind ?? "flash or OTA"} job is running, so there is nothing to cancel.`, { kind: kind ?? null });
    }
    if (!job.cancellable) {
      const reason = job.cancelReason ?? "the job is at a step that must finish";
      throw new MoonflashError(
        "CANCEL_REFUSED",
        `The ${job.info.kind} job on ${job.info.target} cannot be cancelled now: ${reason}. Wait for it to finish.`,
        { jobId: job.info.jobId, reason },
      );
    }
    if (!job.controller.signal.aborted) {
      this.logger.info({ jobId: job.info.jobId }, "job cancel requested");
      job.controller.abort(cancelledError(job.info.jobId));
    }
    return { id: job.info.jobId };
  }

  /** Recent jobs (also those run by other moonflash processes), newest first. */
  history(kind?: JobKind, limit = HISTORY_LIMIT): JobRecord[] {
    const jobs = listJobs(this.paths.history, this.logger);
    return (kind === undefined ? jobs : jobs.filter((job) => job.kind === kind)).slice(0, Math.max(0, limit));
  }

  /** Subscribes to every job event; returns the unsubscribe function. */
  on(listener: JobListener): () => void {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  /**
   * Records a job the previous process did not finish (it died) as failed with INTERRUPTED, and tells listeners
   * through a result event, as if the job had ended now.
   */
  async interrupted(record: InterruptedJob): Promise<void> {
    const message =
      record.message ?? "moonflash stopped while this job ran; check the device and run the job again.";
    await appendJob(
      this.paths.history,
      {
        id: record.id,
        kind: record.kind,
        target: record.target,
        ...(record.params === undefined ? {} : { params: record.params }),
        startedAt: record.startedAt,
        finishedAt: this.now().toISOString(),
        ok: false,
        code: "INTERRUPTED",
        message,
      },
      this.logger,
    );
    this.logger.warn({ jobId: record.id, kind: record.kind, target: record.target }, `interrupted job recorded: ${message}`);
    this.emit({ ...this.base({ jobId: record.id, kind: record.kind, target: record.target }), type: "result", ok: false, code: "INTERRUPTED", message });
  }

  /** Tells listeners something about a job that has ended (e.g. Klipper started again later). */
  notice(job: { id: string; kind: JobKind; target: string }, message: string): void {
    this.logger.info({ jobId: job.id, kind: job.kind, target: job.target }, message);
    this.emit({ ...this.base({ jobId: job.id, kind: job.kind, target: job.target }), type: "notice", message });
  }

  private base(info: Pick<JobLockInfo, "jobId" | "kind" | "target">): { jobId: string; kind: JobKind; target: string; ts: string } {
    return { jobId: info.jobId, kind: info.kind, target: info.target, ts: this.now().toISOString() };
  }

  /**
   * Progress is throttled here, once, for every adapter: at most PROGRESS_PER_SECOND events per job and phase,
   * each phase's first and last always (ctx.progress). Adapters translate; none throttles again. (job.progress,
   * which flash.status reads, always holds the latest value.) Any other event of the running job first lets out the
   * progress held back, so the last value is never lost.
   */
  private emit(event: JobEvent): void {
    if (this.progressThrottle?.jobId === event.jobId) this.progressThrottle.throttle.flush();
    this.deliver(event);
  }

  // One failing adapter must not stop the others or the job (moonraker's send_event, zigbee2mqtt's eventBus).
  private deliver(event: JobEvent): void {
    for (const listener of [...this.listeners]) {
      try {
        const returned: unknown = listener(event);
        if (returned instanceof Promise) {
          returned.catch((err: unknown) => this.logger.error({ err, event: event.type }, "job event listener failed"));
        }
      } catch (err) {
        this.logger.error({ err, event: event.type }, "job event listener failed");
      }
    }
  }
}

/** Progress events per second and job that listeners get: a bar, a status page or agent events all read well at 5. */
export const PROGRESS_PER_SECOND = 5;

/**
 * The progress throttle of one job: the first value of a phase passes at once, then at most one per
 * `intervalMs`; a value held back goes out when its slot comes or at flush(). Values are whatever the caller
 * sends later: a held value may be updated in place until it goes out.
 */
class ProgressThrottle<T> {
  private phase: string | null = null;
  private lastSent = 0;
  private held: T | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;

  constructor(
    private readonly intervalMs: number,
    private readonly send: (value: T) => void,
    private readonly onError: (err: unknown) => void,
  ) {}

  offer(phase: string, value: T): void {
    if (this.phase !== phase) {
      this.flush();
      this.phase = phase;
      this.deliver(value);
      return;
    }
    const now = Date.now();
    if (now - this.lastSent >= this.intervalMs) {
      this.held = null;
      this.clearTimer();
      this.deliver(value);
      return;
    }
    this.held = value;
    this.timer ??= setTimeout(this.onTimer, this.lastSent + this.intervalMs - now);
  }

  /** Sends the value held back, if any, now. */
  flush(): void {
    this.clearTimer();
    const held = this.held;
    this.held = null;
    if (held !== null) this.deliver(held);
  }

  private deliver(value: T): void {
    this.lastSent = Date.now();
    this.send(value);
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private readonly onTimer = (): void => {
    this.timer = null;
    try {
      this.flush();
    } catch (err) {
      this.onError(err);
    }
  };
}
