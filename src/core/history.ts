// The last jobs, kept in <data>/moonflash/history.json. Durable writes; a corrupt file is moved aside and
// logged, never fatal, because history is informational.

import { readFileSync, renameSync } from "node:fs";
import type { Logger } from "pino";
import * as z from "zod/mini";
import "./zod.js";
import { writeFileDurable } from "./durable.js";
import { ERROR_CODES, type ErrorCode } from "./errors.js";
import type { JobKind } from "./events.js";

export const HISTORY_LIMIT = 50;

export interface JobRecord {
  id: string;
  kind: JobKind;
  target: string;
  params?: unknown;
  /** ISO 8601. */
  startedAt: string;
  finishedAt: string;
  ok: boolean;
  code?: ErrorCode;
  message?: string;
  result?: unknown;
}

const recordSchema = z.object({
  id: z.string(),
  kind: z.enum(["flash", "ota"]),
  target: z.string(),
  params: z.optional(z.unknown()),
  startedAt: z.string(),
  finishedAt: z.string(),
  ok: z.boolean(),
  code: z.optional(z.enum(Object.keys(ERROR_CODES) as [ErrorCode, ...ErrorCode[]])),
  message: z.optional(z.string()),
  result: z.optional(z.unknown()),
});

const fileSchema = z.object({ version: z.literal(1), jobs: z.array(recordSchema) });

// Appends in this process run one after another, so none reads the file while another is rewriting it.
// Across processes the job lock serialises them: a record is appended before the lock is released.
const appendQueues = new Map<string, Promise<void>>();

function compactTimestamp(date: Date): string {
  return date.toISOString().replace(/[-:]/g, "").replace(".", "");
}

/** All records, oldest first. Sync because the file is small and the runner's history() is sync. */
function readRecords(path: string, logger: Logger): JobRecord[] {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    logger.warn({ err, path }, "cannot read the job history; showing none");
    return [];
  }
  let parsed: z.infer<typeof fileSchema> | undefined;
  try {
    const result = fileSchema.safeParse(JSON.parse(text));
    if (result.success) parsed = result.data;
  } catch {
    // Not JSON: handled below like any other corrupt content.
  }
  if (parsed) return parsed.jobs as JobRecord[];
  const aside = `${path}.corrupt-${compactTimestamp(new Date())}`;
  try {
    renameSync(path, aside);
    logger.warn({ path, movedTo: aside }, "job history was corrupt; moved it aside and started a new one");
  } catch (err) {
    logger.warn({ err, path }, "job history is corrupt and could not be moved aside; it will be overwritten");
  }
  return [];
}

/** Recent jobs, newest first. */
export function listJobs(path: string, logger: Logger): JobRecord[] {
  return readRecords(path, logger).reverse();
}

/** Adds a record and keeps the newest `limit` ones. */
export function appendJob(path: string, record: JobRecord, logger: Logger, limit = HISTORY_LIMIT): Promise<void> {
  const previous = appendQueues.get(path) ?? Promise.resolve();
  const next = previous.then(async () => {
    const jobs = readRecords(path, logger);
    jobs.push(record);
    const kept = jobs.slice(-limit);
    await writeFileDurable(path, JSON.stringify({ version: 1, jobs: kept }, null, 1) + "\n");
  });
  const settled = next.catch(() => undefined);
  appendQueues.set(path, settled);
  void settled.then(() => {
    if (appendQueues.get(path) === settled) appendQueues.delete(path);
  });
  return next;
}
