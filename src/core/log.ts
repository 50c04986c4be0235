// pino logger writing JSON lines to <data>/logs/moonflash.log, rotated in-process by rotating-file-stream.
// No pino worker-thread transport: a worker costs ~11 MB RSS and the agent targets <= 45 MB in total.

import { mkdirSync } from "node:fs";
import { basename, dirname } from "node:path";
import { pino, type DestinationStream, type Level, type Logger, type StreamEntry } from "pino";
import { createRequire } from "node:module";
import { createStream, type RotatingFileStream } from "rotating-file-stream";
import { dataPaths } from "./paths.js";

export interface LoggerOptions {
  dataDir: string;
  level: Level | "silent";
  /** Also write human-readable lines to stdout (use when stdout is a TTY). Default false. */
  pretty?: boolean;
  /** Write <data>/logs/moonflash.log. Default true. */
  file?: boolean;
  /** Rotate when the file reaches this size, in rotating-file-stream syntax ("10M", "64K"). Default "10M". */
  rotateSize?: string;
  /** Rotated files kept (moonflash.log.1 … .N). Default 3. */
  keep?: number;
}

// Streams each logger owns, so closeLogger can flush and close them on shutdown.
const ownedStreams = new WeakMap<Logger, RotatingFileStream[]>();

/** Opens a size-rotated log file: `path`, `path.1` … `path.<keep>` (logrotate style, oldest dropped). */
export function openRotatingLog(path: string, rotateSize = "10M", keep = 3): RotatingFileStream {
  mkdirSync(dirname(path), { recursive: true });
  const stream = createStream(basename(path), { path: dirname(path), size: rotateSize, rotate: keep });
  // Without a listener a failing log disk would crash the agent; losing log lines is the lesser harm.
  stream.on("error", (err) => process.stderr.write(`moonflash: log file ${path}: ${err.message}\n`));
  stream.on("warning", (err) => process.stderr.write(`moonflash: log file ${path}: ${err.message}\n`));
  return stream;
}

/** Creates the process logger: rotated JSON file and/or pretty stdout, ISO 8601 times, level labels. */
export function createLogger(opts: LoggerOptions): Logger {
  const level = opts.level;
  const streams: StreamEntry[] = [];
  const files: RotatingFileStream[] = [];
  if (opts.file !== false) {
    const file = openRotatingLog(dataPaths(opts.dataDir).log, opts.rotateSize, opts.keep);
    files.push(file);
    streams.push({ level: "trace", stream: file });
  }
  if (opts.pretty) {
    // In-process pino-pretty stream writing synchronously to fd 1, again to avoid a worker thread.
    // Required only here: the service logs to its file, and pino-pretty costs memory (docs/BENCHMARKS.md).
    const pretty = (createRequire(import.meta.url)("pino-pretty") as typeof import("pino-pretty")).build;
    streams.push({ level: "trace", stream: pretty({ destination: 1, sync: true, colorize: true, translateTime: "SYS:HH:MM:ss.l" }) });
  }
  const destination: DestinationStream =
    streams.length > 0 ? pino.multistream(streams) : pino.destination({ dest: 1, sync: true });
  const logger = pino(
    {
      level,
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      base: { pid: process.pid },
    },
    destination,
  );
  ownedStreams.set(logger, files);
  return logger;
}

/** Flushes and closes the log files of a logger made by createLogger; later log calls are dropped. */
export async function closeLogger(logger: Logger): Promise<void> {
  const files = ownedStreams.get(logger) ?? [];
  ownedStreams.delete(logger);
  logger.level = "silent";
  await Promise.all(
    files.map(
      (file) =>
        new Promise<void>((resolve) => {
          if (file.writableFinished) return resolve();
          file.once("finish", () => resolve());
          file.once("error", () => resolve());
          file.end();
        }),
    ),
  );
}
