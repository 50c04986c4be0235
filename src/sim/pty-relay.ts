// A pseudo-terminal whose slave side is linked at a path of our choice, for the host under test to open like a
// serial port; this process talks to the master through a small Python helper (see pty-relay-script.ts for why
// and for the wire format). The helper exits when its stdin closes, so it never outlives this process.

import { EventEmitter } from "node:events";
import type { ResultPromise } from "execa";
import type { Logger } from "pino";
import { MoonflashError } from "../core/errors.js";
import { PTY_RELAY_EXIT_NOT_A_LINK, PTY_RELAY_SCRIPT } from "./pty-relay-script.js";

export interface PtyRelayOptions {
  /** Python 3 interpreter. Default "python3". */
  python?: string;
  /** Emulate a UART at this baud (baud/10 bytes per second each way); default: bytes move as fast as the pty. */
  baud?: number;
  /**
   * With `baud`: the device's transmit buffer in bytes. A write that does not fit beside the bytes still unsent
   * when the device answered is dropped whole, as Katapult's firmware drops a reply. Default: unlimited.
   */
  transmitBuffer?: number;
  /** How long the helper may take to create the pty and the link. Default 5000 ms. */
  readyTimeoutMs?: number;
  logger?: Logger;
}

/** Events of a relay, as listener argument lists. 'open'/'close' are about the slave (host) side. */
export interface PtyRelayEvents {
  data: [bytes: Buffer];
  baud: [baud: number];
  open: [];
  close: [];
  exit: [code: number | undefined];
}

export interface PtyRelay extends EventEmitter<PtyRelayEvents> {
  /** The symlink the host opens. */
  readonly linkPath: string;
  /** The pty slave it points to, e.g. /dev/pts/3. */
  readonly slavePath: string;
  /** Process id of the helper. */
  readonly pid: number;
  /** True while some process has the slave open. */
  readonly hostOpen: boolean;
  /** Last line speed the host set on the slave. */
  readonly baud: number | undefined;
  /**
   * Sends bytes to the host; dropped while nobody has the slave open, as on a real line. On a throttled relay they
   * leave no earlier than every host byte received so far has crossed the wire (they answer those bytes).
   */
  write(bytes: Uint8Array): void;
  /** Ends the helper (it removes the link) and waits for it to exit. */
  close(): Promise<void>;
}

const HEADER_SIZE = 5;
/** The W payload starts with the count of host bytes received when it was written (u64 BE). */
const ANSWERED_SIZE = 8;

class PythonPtyRelay extends EventEmitter<PtyRelayEvents> implements PtyRelay {
  slavePath = "";
  hostOpen = false;
  baud: number | undefined;
  private exited = false;
  private received = 0;
  private inbox: Buffer = Buffer.alloc(0);
  private onLinked: (() => void) | undefined;
  private readonly exitPromise: Promise<void>;

  constructor(
    readonly linkPath: string,
    private readonly child: ResultPromise<{ stdin: "pipe"; stdout: "pipe"; stderr: "pipe"; encoding: "buffer"; buffer: { stdout: false; stderr: true }; reject: false }>,
    private readonly logger: Logger | undefined,
  ) {
    super();
    child.stdout.on("data", (chunk: Buffer) => this.parse(chunk));
    // A closed pipe surfaces as EPIPE on stdin; the 'exit' event reports the end.
    child.stdin.on("error", () => {});
    this.exitPromise = child.then((result) => {
      this.exited = true;
      this.hostOpen = false;
      this.emit("exit", result.exitCode);
    });
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  write(bytes: Uint8Array): void {
    if (this.exited || bytes.length === 0) return;
    const header = Buffer.alloc(HEADER_SIZE + ANSWERED_SIZE);
    header[0] = 0x57; // "W"
    header.writeUInt32BE(ANSWERED_SIZE + bytes.length, 1);
    header.writeBigUInt64BE(BigInt(this.received), HEADER_SIZE);
    this.child.stdin.write(Buffer.concat([header, bytes]));
  }

  async close(): Promise<void> {
    if (!this.exited) this.child.stdin.end();
    await this.exitPromise;
  }

  /** Resolves once the helper reports the link, rejects if it exits first or takes too long. */
  ready(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        settle();
        this.child.stdin.end();
        reject(new MoonflashError("INTERNAL", `The pty helper did not create ${this.linkPath} within ${timeoutMs} ms.`, { linkPath: this.linkPath }));
      }, timeoutMs);
      const onExit = (): void => {
        settle();
        this.child.then((result) => reject(helperFailure(this.linkPath, result)), reject);
      };
      const settle = (): void => {
        clearTimeout(timer);
        this.onLinked = undefined;
        this.off("exit", onExit);
      };
      this.onLinked = () => {
        settle();
        resolve();
      };
      this.once("exit", onExit);
    });
  }

  private parse(chunk: Buffer): void {
    this.inbox = this.inbox.length ? Buffer.concat([this.inbox, chunk]) : chunk;
    while (this.inbox.length >= HEADER_SIZE) {
      const size = this.inbox.readUInt32BE(1);
      if (this.inbox.length < HEADER_SIZE + size) break;
      const kind = String.fromCharCode(this.inbox[0]!);
      const payload = this.inbox.subarray(HEADER_SIZE, HEADER_SIZE + size);
      this.inbox = this.inbox.subarray(HEADER_SIZE + size);
      this.dispatch(kind, payload);
    }
  }

  private dispatch(kind: string, payload: Buffer): void {
    switch (kind) {
      case "R":
        this.slavePath = payload.toString("utf8");
        this.logger?.debug({ linkPath: this.linkPath, slavePath: this.slavePath }, "pty linked");
        this.onLinked?.();
        return;
      case "D":
        this.received += payload.length;
        this.emit("data", Buffer.from(payload));
        return;
      case "B":
        this.baud = payload.readUInt32BE(0);
        this.emit("baud", this.baud);
        return;
      case "O":
        this.hostOpen = true;
        this.emit("open");
        return;
      case "C":
        this.hostOpen = false;
        this.emit("close");
        return;
    }
  }
}

function helperFailure(linkPath: string, result: { exitCode?: number; stderr: unknown; originalMessage?: string; code?: string }): MoonflashError {
  const stderr = Buffer.isBuffer(result.stderr) ? result.stderr.toString("utf8") : String(result.stderr ?? "");
  const tail = stderr.trim().split("\n").slice(-3).join(" | ");
  if (result.code === "ENOENT") {
    return new MoonflashError("TOOL_NOT_FOUND", "python3 was not found; install Python 3 (the virtual device's pty helper needs it) or pass another interpreter.", { linkPath });
  }
  if (result.exitCode === PTY_RELAY_EXIT_NOT_A_LINK) {
    return new MoonflashError("PATH_REJECTED", `${linkPath} exists and is not a symlink; pick a path that is free or a stale link.`, { linkPath });
  }
  return new MoonflashError("INTERNAL", `The pty helper failed to create ${linkPath}: ${tail || result.originalMessage || `exit ${result.exitCode}`}. Check that its folder exists and is writable.`, { linkPath, exitCode: result.exitCode, stderr: tail });
}

/**
 * Creates a pty, links its slave at `linkPath` (replacing a stale link) and relays its bytes and line events.
 * No execa `timeout`: the helper lives as long as the relay, and it exits on its own when our end of its stdin
 * closes (close(), or this process dying).
 */
export async function openPtyRelay(linkPath: string, options: PtyRelayOptions = {}): Promise<PtyRelay> {
  const { execa } = await import("execa");
  if (options.baud !== undefined && !(options.baud > 0)) {
    throw new MoonflashError("INVALID_PARAMS", `Virtual device: baud must be positive, got ${options.baud}.`, { baud: options.baud });
  }
  if (options.transmitBuffer !== undefined && !(Number.isInteger(options.transmitBuffer) && options.transmitBuffer > 0)) {
    throw new MoonflashError("INVALID_PARAMS", `Virtual device: transmitBuffer must be a positive whole number, got ${options.transmitBuffer}.`, { transmitBuffer: options.transmitBuffer });
  }
  const rate = options.baud === undefined ? [] : [String(options.baud / 10), String(options.transmitBuffer ?? 0)];
  const child = execa(options.python ?? "python3", ["-c", PTY_RELAY_SCRIPT, linkPath, ...rate], {
    stdin: "pipe",
    stdout: "pipe",
    stderr: "pipe",
    encoding: "buffer",
    buffer: { stdout: false, stderr: true },
    reject: false,
  });
  const relay = new PythonPtyRelay(linkPath, child, options.logger);
  await relay.ready(options.readyTimeoutMs ?? 5000);
  return relay;
}
