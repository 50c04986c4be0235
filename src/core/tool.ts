// The one runner for external tools (flashtool.py, make, wchisp; later the OTA steps): one execa call with an
// argument array and a timeout, output streamed line by line (and as raw chunks for byte-level progress), a tail kept
// for error details, and spawn/timeout/cancel failures turned into MoonflashErrors.

import { constants as fsConstants } from "node:fs";
import { access, stat } from "node:fs/promises";
import path from "node:path";
import { StringDecoder } from "node:string_decoder";
import type { Readable } from "node:stream";
import { MoonflashError } from "./errors.js";

export interface RunToolOptions {
  /** Executable: a path or a name looked up on PATH. */
  command: string;
  args: readonly string[];
  cwd?: string;
  /** Kills the tool (and what it started) after this many milliseconds ⇒ TOOL_TIMEOUT. */
  timeoutMs: number;
  /** Aborting kills the tool ⇒ CANCELLED; already aborted ⇒ nothing is started. */
  signal?: AbortSignal;
  /** Each complete stdout line, without the line ending. */
  onStdoutLine?: (line: string) => void;
  onStderrLine?: (line: string) => void;
  /** Raw decoded stdout chunks as they arrive, for progress written without newlines. */
  onStdoutChunk?: (chunk: string) => void;
  /** How many trailing lines of each stream to keep for error details. Default 40. */
  tailLines?: number;
}

export interface ToolRunResult {
  exitCode: number;
  durationMs: number;
  stdoutTail: string[];
  stderrTail: string[];
}

/** Details every tool error carries, so a failure can be acted on without the log. */
export function toolErrorDetails(
  options: Pick<RunToolOptions, "command" | "args">,
  result: { exitCode?: number; durationMs: number; stderrTail: readonly string[] },
): Record<string, unknown> {
  return {
    command: options.command,
    args: [...options.args],
    exitCode: result.exitCode ?? null,
    durationMs: Math.round(result.durationMs),
    stderrTail: [...result.stderrTail],
  };
}

/** Splits a stream into lines (LF or CRLF), calling back per line and per raw chunk, keeping the last lines. */
function followStream(
  stream: Readable | null,
  tail: string[],
  tailLines: number,
  onLine: ((line: string) => void) | undefined,
  onChunk?: (chunk: string) => void,
): Promise<void> {
  if (!stream) return Promise.resolve();
  const decoder = new StringDecoder("utf8");
  let pending = "";
  const emit = (line: string): void => {
    tail.push(line);
    if (tail.length > tailLines) tail.shift();
    onLine?.(line);
  };
  const take = (text: string): void => {
    if (text.length === 0) return;
    onChunk?.(text);
    pending += text;
    let newline = pending.indexOf("\n");
    while (newline !== -1) {
      emit(pending.slice(0, newline).replace(/\r$/, ""));
      pending = pending.slice(newline + 1);
      newline = pending.indexOf("\n");
    }
  };
  return new Promise((resolve) => {
    stream.on("data", (chunk: Buffer) => take(decoder.write(chunk)));
    stream.on("error", () => resolve());
    stream.on("close", () => {
      take(decoder.end());
      if (pending.length > 0) emit(pending.replace(/\r$/, ""));
      pending = "";
      resolve();
    });
  });
}

function formatDuration(ms: number): string {
  return ms < 10_000 ? `${ms} ms` : `${Math.round(ms / 1000)} s`;
}

/**
 * Runs one external tool to completion. A non-zero exit is returned, not thrown: each flasher knows what
 * its tool's exit codes and output mean. Throws TOOL_NOT_FOUND, TOOL_TIMEOUT or CANCELLED.
 */
export async function runTool(options: RunToolOptions): Promise<ToolRunResult> {
  const tailLines = options.tailLines ?? 40;
  const name = path.basename(options.command);
  if (options.signal?.aborted) {
    throw new MoonflashError("CANCELLED", `Cancelled before ${name} was started; nothing was written.`, {
      command: options.command,
      args: [...options.args],
    });
  }
  const stdoutTail: string[] = [];
  const stderrTail: string[] = [];
  // Loaded on first use: an idle agent does not need execa (docs/BENCHMARKS.md).
  const { execa } = await import("execa");
  const subprocess = execa(options.command, [...options.args], {
    cwd: options.cwd,
    timeout: options.timeoutMs,
    cancelSignal: options.signal,
    reject: false,
    buffer: false,
    stdin: "ignore",
    // Own process group, so what the tool started (make's recipe shell, flash_usb.py, dfu-util) can be
    // stopped with it instead of lingering and holding our pipes open.
    detached: true,
  });
  const pid = subprocess.pid;
  subprocess.once("exit", () => {
    if (pid === undefined) return;
    try {
      process.kill(-pid, "SIGKILL");
    } catch {
      // The group is already gone: nothing was left behind.
    }
  });
  const streams = Promise.all([
    followStream(subprocess.stdout, stdoutTail, tailLines, options.onStdoutLine, options.onStdoutChunk),
    followStream(subprocess.stderr, stderrTail, tailLines, options.onStderrLine),
  ]);
  const result = await subprocess;
  await streams;
  const durationMs = result.durationMs;
  const details = toolErrorDetails(options, { exitCode: result.exitCode, durationMs, stderrTail });
  if (result.code === "ENOENT") {
    throw new MoonflashError(
      "TOOL_NOT_FOUND",
      `${options.command} was not found. Install it or set its path in moonflash.conf.`,
      details,
      { cause: result },
    );
  }
  if (result.code === "EACCES") {
    throw new MoonflashError(
      "TOOL_NOT_FOUND",
      `${options.command} is not executable. Fix its permissions (chmod +x) or set another path in moonflash.conf.`,
      details,
      { cause: result },
    );
  }
  if (result.timedOut) {
    throw new MoonflashError(
      "TOOL_TIMEOUT",
      `${name} did not finish within ${formatDuration(options.timeoutMs)} and was stopped. ` +
        "Check the board and its connection, or raise the MCU's timeout in moonflash.conf.",
      details,
    );
  }
  if (result.isCanceled) {
    throw new MoonflashError("CANCELLED", `${name} was stopped because the job was cancelled.`, details);
  }
  if (result.exitCode === undefined) {
    const cause = result.signal ? `was killed by ${result.signal}` : `could not be run (${result.shortMessage})`;
    throw new MoonflashError("FLASH_FAILED", `${name} ${cause}. See moonflash.log for its output.`, details, {
      cause: result,
    });
  }
  return { exitCode: result.exitCode, durationMs, stdoutTail, stderrTail };
}

/** Where `command` would be run from: itself if it contains a slash, else the first executable match on PATH. */
export async function findExecutable(command: string, envPath = process.env.PATH ?? ""): Promise<string | null> {
  const candidates = command.includes("/")
    ? [command]
    : envPath
        .split(path.delimiter)
        .filter((dir) => dir.length > 0)
        .map((dir) => path.join(dir, command));
  for (const candidate of candidates) {
    try {
      if ((await stat(candidate)).isFile()) {
        await access(candidate, fsConstants.X_OK);
        return candidate;
      }
    } catch {
      // Not here; try the next PATH entry.
    }
  }
  return null;
}
