// Katapult host session over a ByteLink: timeouts, retries, BUSY back-off, draining between tries, block
// write/read-back. Behaviour follows Katapult's scripts/flashtool.py (send_command, send_file, verify_file).
// Only the final failure of a command throws.

import { MoonflashError, isMoonflashError } from "../../core/errors.js";
import type { LogLevel } from "../../core/events.js";
import type { ByteLink } from "../link.js";
import {
  Command,
  FRAME_OVERHEAD,
  FrameDecoder,
  Response,
  VALID_BLOCK_SIZES,
  commandName,
  decodeConnect,
  encodeAddressFrame,
  encodeFrame,
  u32le,
  type ConnectInfo,
  type DecodeItem,
} from "./codec.js";
// node:crypto is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

/** Every number the session waits or retries by; defaults are flashtool.py's. Tests shrink them. */
export interface KatapultTimings {
  /** Tries per command (flashtool send_command default). */
  tries: number;
  /** Reply timeout per try, ms. */
  timeoutMs: number;
  /** Tries per SEND_BLOCK (flashing writes can be slow). */
  blockTries: number;
  /** Reply timeout per SEND_BLOCK try, ms. */
  blockTimeoutMs: number;
  /** How often a block is re-sent/re-read when the echoed address differs. */
  addressMismatchTries: number;
  /** Pause after an address mismatch, ms. */
  addressMismatchDelayMs: number;
  /** After a failed try, stale input is discarded for this long, ms. */
  drainMs: number;
  /** Then the session waits this long before the next try, ms. */
  retryDelayMs: number;
  /** Wait after a BUSY reply, ms. */
  busyDelayMs: number;
}

export const DEFAULT_KATAPULT_TIMINGS: Readonly<KatapultTimings> = Object.freeze({
  tries: 5,
  timeoutMs: 2000,
  blockTries: 3,
  blockTimeoutMs: 5000,
  addressMismatchTries: 3,
  addressMismatchDelayMs: 100,
  drainMs: 250,
  retryDelayMs: 500,
  busyDelayMs: 1500,
});

export type SessionLog = (level: LogLevel, message: string) => void;

export interface KatapultSessionOptions {
  timings?: Partial<KatapultTimings>;
  /** Aborting rejects the pending command with CANCELLED. */
  signal?: AbortSignal;
  /** Retries and protocol notes; the session never writes to the console. */
  log?: SessionLog;
}

export interface SendOptions {
  tries?: number;
  timeoutMs?: number;
}

/** A try already made with the next request sent ahead (pipelined): it counts as the first of the retries. */
interface FirstTry {
  outcome: TryOutcome;
  /** The request sent ahead is on the wire: its reply must not answer the retry. */
  aheadInFlight: boolean;
}

export interface WriteResult {
  blocks: number;
  /** Bytes written including the 0xFF padding of the last block. */
  paddedBytes: number;
  /** SHA-1 (lower-case hex) over the padded blocks, as flashtool computes it. */
  sha1: string;
}

export interface VerifyResult {
  blocks: number;
  sha1: string;
}

/** Reports progress after each block: blocks done, blocks total. */
export type BlockProgress = (done: number, total: number) => void;

type TryOutcome =
  | { ok: true; payload: Buffer }
  | { ok: false; kind: "timeout" | "busy" | "nack" | "error" | "bad-frame" | "wrong-echo"; text: string };
type FailedTry = Exclude<TryOutcome, { ok: true }>;

const CONNECT_HINT = "is the board in its bootloader, is Klipper stopped, is the baud right?";

/**
 * The smallest reply buffer in Katapult's firmware: transmit_buf[96] in src/generic/serial_irq.c (UART) and
 * canserial.c; USB CDC has 192. console_sendf silently drops a reply that does not fit beside the unsent rest.
 */
const DEVICE_TRANSMIT_BUFFER = 96;

/**
 * Read-back sends REQUEST_BLOCK n+1 while the tail of block n's reply is still on the wire, so the request's own
 * wire time and the host's turnaround overlap the reply instead of following it. It goes out once this many bytes
 * of reply n have arrived: the device has sent at least those, and at least as many again as the request has bytes
 * while the request crosses (a UART runs at one baud both ways), so when the request is in, what is left of reply n
 * fits beside reply n+1 in the device's transmit buffer (64-byte blocks: 52 = 2 x 80 - 96 - 12). Null when two
 * replies cannot share the buffer (blocks above 64 bytes): then read-back is strictly one at a time.
 * Never for writes: a UART bootloader loses bytes that arrive while its flash is being erased or programmed.
 */
export function readAheadLead(blockSize: number): number | null {
  const reply = FRAME_OVERHEAD + 8 + blockSize;
  const request = FRAME_OVERHEAD + 4;
  const lead = 2 * reply - DEVICE_TRANSMIT_BUFFER - request;
  return lead < reply ? lead : null;
}

/**
 * A write is acknowledged only after the bootloader has programmed the block (command_write_block answers after
 * flash_write_block returns, on every platform), so the first bytes of a success ACK mean its flash is idle again.
 * SEND_BLOCK n+1 goes out then, while the ACK's tail is still on the wire: the host still never transmits while
 * the board's flash is busy, which a UART bootloader could not survive, and the turnaround overlaps the ACK.
 */
function startsBlockAck(partial: Buffer): boolean {
  // 01 88 | ACK | LEN 2 (the echoed command and the address): anything else (NACK, ERROR, BUSY) waits.
  return partial.length >= 4 && partial[2] === Response.ACK && partial[3] === 2;
}

/** awaitReply's hook: send the next request once the partial reply makes `ready` true. */
interface SendAhead {
  ready(partial: Buffer): boolean;
  send(): Promise<void>;
}

export class KatapultSession {
  readonly timings: Readonly<KatapultTimings>;
  private readonly decoder = new FrameDecoder();
  private readonly items: DecodeItem[] = [];
  /** Resolves the one wait in progress (awaitReply, drain); notify() calls it. */
  private wake: (() => void) | null = null;
  /** While a request may be sent ahead: the test a partial reply must pass (SendAhead.ready). */
  private aheadReady: ((partial: Buffer) => boolean) | null = null;
  private closedError: Error | null = null;
  private readonly signal: AbortSignal | undefined;
  private readonly log: SessionLog;
  private readonly unsubscribe: Array<() => void>;
  private info: ConnectInfo | null = null;

  constructor(
    private readonly link: ByteLink,
    options: KatapultSessionOptions = {},
  ) {
    this.timings = Object.freeze({ ...DEFAULT_KATAPULT_TIMINGS, ...options.timings });
    this.signal = options.signal;
    this.log = options.log ?? (() => undefined);
    this.unsubscribe = [
      link.onData((chunk) => {
        this.decoder.push(chunk, this.items);
        // A UART reply arrives a few bytes at a time: the waiter wakes only for a whole frame (or a fault), or when
        // the request sent ahead may go, not once per chunk.
        if (this.items.length > 0 || this.aheadReady?.(this.decoder.partial)) this.notify();
      }),
      link.onClose((error) => {
        this.closedError = error ?? new Error("link closed");
        this.notify();
      }),
    ];
    // One abort listener for the session's life: one per wait cost an EventTarget listener per chunk.
    const signal = this.signal;
    if (signal) {
      signal.addEventListener("abort", this.notify, { once: true });
      this.unsubscribe.push(() => signal.removeEventListener("abort", this.notify));
    }
    if (!link.isOpen) this.closedError = new Error("link closed");
  }

  /** The CONNECT reply, once connect() succeeded. */
  get connectInfo(): ConnectInfo | null {
    return this.info;
  }

  /** Stops listening to the link (the link itself belongs to the caller). */
  dispose(): void {
    for (const off of this.unsubscribe) off();
  }

  /**
   * Sends one command and returns the ACK payload after the echoed command word. Retries on timeout, NACK,
   * ERROR, BUSY, corrupt frames and a wrong echoed id; throws DEVICE_TIMEOUT when no try got any reply,
   * PROTOCOL_ERROR otherwise, DEVICE_NOT_FOUND when the link closes, CANCELLED when the signal aborts.
   */
  async sendCommand(cmd: number, payload: Uint8Array = new Uint8Array(0), options: SendOptions = {}): Promise<Buffer> {
    return this.retryCommand(cmd, payload, options);
  }

  private async retryCommand(cmd: number, payload: Uint8Array, options: SendOptions, first?: FirstTry & { outcome: FailedTry }): Promise<Buffer> {
    const tries = options.tries ?? this.timings.tries;
    const timeoutMs = options.timeoutMs ?? this.timings.timeoutMs;
    const name = commandName(cmd);
    const frame = encodeFrame(cmd, payload);
    let last: FailedTry = { ok: false, kind: "timeout", text: "no reply" };
    let anyReply = false;
    for (let attempt = 1; attempt <= tries; attempt++) {
      let outcome: TryOutcome;
      if (attempt === 1 && first) {
        outcome = first.outcome;
      } else {
        this.throwIfAborted();
        await this.write(frame, name);
        outcome = await this.awaitReply(cmd, timeoutMs, name);
      }
      if (outcome.ok) return outcome.payload;
      last = outcome;
      if (outcome.kind !== "timeout") anyReply = true;
      const remaining = tries - attempt;
      this.log(outcome.kind === "timeout" ? "info" : "debug", `Katapult ${name}: ${outcome.text}, ${remaining} tries remaining`);
      if (remaining === 0) break;
      await this.pauseAfterFailedTry(outcome.kind, attempt === 1 && first?.aheadInFlight === true);
    }
    if (!anyReply) {
      const hint = cmd === Command.CONNECT ? CONNECT_HINT : "the board stopped answering; check the cable and power, then flash again.";
      throw new MoonflashError("DEVICE_TIMEOUT", `Katapult did not answer ${name} after ${tries} tries: ${hint}`, {
        command: name,
        tries,
        timeoutMs,
        device: this.link.description,
      });
    }
    // Once blocks were sent, a power-cycle would start whatever they left in flash (the flasher keeps the board in
    // Katapult then): only before that is it the advice.
    const advice = cmd === Command.CONNECT || cmd === Command.COMPLETE ? "Power-cycle the board and flash again." : "Flash again.";
    throw new MoonflashError(
      "PROTOCOL_ERROR",
      `Katapult refused ${name} ${tries} times (last: ${last.text}). ${advice}`,
      { command: name, tries, lastReply: last.kind, device: this.link.description },
    );
  }

  /** CONNECT: learns block size, application start and MCU type. */
  async connect(): Promise<ConnectInfo> {
    const payload = await this.sendCommand(Command.CONNECT);
    let info: ConnectInfo;
    try {
      info = decodeConnect(payload);
    } catch (err) {
      throw new MoonflashError("PROTOCOL_ERROR", `Katapult sent a malformed CONNECT reply (${(err as Error).message}). Update Katapult on the board.`, { device: this.link.description }, { cause: err });
    }
    if (!(VALID_BLOCK_SIZES as readonly number[]).includes(info.blockSize)) {
      throw new MoonflashError(
        "PROTOCOL_ERROR",
        `Katapult reported block size ${info.blockSize}; only ${VALID_BLOCK_SIZES.join(", ")} are valid. Rebuild Katapult with a supported block size.`,
        { blockSize: info.blockSize, device: this.link.description },
      );
    }
    this.info = info;
    return info;
  }

  /**
   * Writes the image block by block from the application start; the last block is padded with 0xFF. The next
   * block goes out as soon as the current one's ACK begins (startsBlockAck); anything unexpected discards the reply
   * to a block sent ahead and writes that block flashtool's way (a block the board already holds is acknowledged
   * again without programming: Katapult ignores identical retransmits).
   */
  async writeImage(image: Uint8Array, onBlock?: BlockProgress): Promise<WriteResult> {
    const { blockSize, appStartAddress } = this.requireInfo();
    const total = Math.ceil(image.length / blockSize);
    const sha = process.getBuiltinModule("node:crypto").createHash("sha1");
    /** Highest block index whose SEND_BLOCK is on the wire. */
    let sent = -1;
    const send = async (index: number): Promise<void> => {
      await this.write(encodeAddressFrame(Command.SEND_BLOCK, appStartAddress + index * blockSize, paddedBlock(image, index, blockSize)), "SEND_BLOCK");
      sent = index;
    };
    for (let index = 0; index < total; index++) {
      const block = paddedBlock(image, index, blockSize);
      sha.update(block);
      const address = appStartAddress + index * blockSize;
      const ahead = index + 1 < total ? { ready: startsBlockAck, send: () => send(index + 1) } : undefined;
      let outcome: TryOutcome;
      try {
        if (sent < index) await send(index);
        outcome = await this.awaitReply(Command.SEND_BLOCK, this.timings.blockTimeoutMs, "SEND_BLOCK", ahead);
      } catch (err) {
        throw asWriteFailure(err, address);
      }
      if (!(outcome.ok && outcome.payload.length >= 4 && outcome.payload.readUInt32LE(0) === address)) {
        await this.writeBlock(address, block, { outcome, aheadInFlight: sent > index });
        sent = index;
      }
      onBlock?.(index + 1, total);
    }
    return { blocks: total, paddedBytes: total * blockSize, sha1: sha.digest("hex") };
  }

  /** SEND_EOF: the bootloader flushes its page buffer and reports the number of flash pages written. */
  async sendEof(): Promise<number> {
    let reply: Buffer;
    try {
      reply = await this.sendCommand(Command.SEND_EOF);
    } catch (err) {
      throw asWriteFailure(err, null);
    }
    return reply.length >= 4 ? reply.readUInt32LE(0) : 0;
  }

  /**
   * Reads every block back and compares it with the padded image; VERIFY_FAILED names the first bad address.
   * Each block is requested ahead as readAheadLead() allows; anything unexpected (a timeout, NACK, BUSY, a corrupt
   * or misaddressed reply) discards the reply to the request sent ahead and reads that block flashtool's way.
   */
  async verify(image: Uint8Array, onBlock?: BlockProgress): Promise<VerifyResult> {
    const { blockSize, appStartAddress } = this.requireInfo();
    const total = Math.ceil(image.length / blockSize);
    const { createHash } = process.getBuiltinModule("node:crypto");
    const expectedSha = createHash("sha1");
    const receivedSha = createHash("sha1");
    let firstBadAddress: number | null = null;
    await this.readBlocks(total, (index, received) => {
      const expected = paddedBlock(image, index, blockSize);
      expectedSha.update(expected);
      receivedSha.update(received);
      if (firstBadAddress === null && !expected.equals(received)) firstBadAddress = appStartAddress + index * blockSize + firstDifference(expected, received);
      onBlock?.(index + 1, total);
      return true;
    });
    const expectedHex = expectedSha.digest("hex");
    const receivedHex = receivedSha.digest("hex");
    if (firstBadAddress !== null || expectedHex !== receivedHex) {
      throw new MoonflashError(
        "VERIFY_FAILED",
        `Read-back verification failed: expected SHA-1 ${expectedHex}, received ${receivedHex}, first difference at flash address ${hex(firstBadAddress ?? appStartAddress)}. The board's flash may be worn or the link noisy: flash again, and replace the board if it keeps failing.`,
        { expectedSha1: expectedHex, receivedSha1: receivedHex, firstBadAddress: firstBadAddress === null ? null : hex(firstBadAddress) },
      );
    }
    return { blocks: total, sha1: receivedHex };
  }

  /**
   * Reads the application the board holds now (a backup before it is overwritten): from the application start until
   * `erasedRun` bytes in a row read as erased flash (0xFF), or `maxBytes`. Returns what was read without the trailing
   * 0xFF bytes. Katapult erases only the pages it writes, so what follows an application may be the tail of an older,
   * longer one: the run of erased bytes ends the read, not the end of the data. A Klipper image holds no such run.
   */
  async readApplication(maxBytes: number, erasedRun: number, onBlock?: (bytesRead: number) => void): Promise<Buffer> {
    const { blockSize } = this.requireInfo();
    const total = Math.floor(maxBytes / blockSize);
    const blocks: Buffer[] = [];
    let erasedBytes = 0;
    await this.readBlocks(total, (index, block) => {
      blocks.push(Buffer.from(block));
      erasedBytes = block.every((byte) => byte === 0xff) ? erasedBytes + block.length : 0;
      onBlock?.((index + 1) * blockSize);
      return erasedBytes < erasedRun;
    });
    const data = Buffer.concat(blocks);
    let end = data.length;
    while (end > 0 && data[end - 1] === 0xff) end--;
    return data.subarray(0, end);
  }

  /**
   * Reads up to `total` blocks from the application start, in order, to `take`, which returns false to stop. Each
   * block is requested ahead as readAheadLead() allows; anything unexpected (a timeout, NACK, BUSY, a corrupt or
   * misaddressed reply) discards the reply to the request sent ahead and reads that block flashtool's way. Stopping
   * early with a request ahead on the wire drains its reply, so it answers nothing that follows.
   */
  private async readBlocks(total: number, take: (index: number, block: Buffer) => boolean): Promise<void> {
    const { blockSize, appStartAddress } = this.requireInfo();
    const lead = readAheadLead(blockSize);
    /** Highest block index whose REQUEST_BLOCK is on the wire. */
    let requested = -1;
    const request = async (index: number): Promise<void> => {
      await this.write(encodeAddressFrame(Command.REQUEST_BLOCK, appStartAddress + index * blockSize), "REQUEST_BLOCK");
      requested = index;
    };
    for (let index = 0; index < total; index++) {
      const address = appStartAddress + index * blockSize;
      if (requested < index) await request(index);
      const ahead = lead !== null && index + 1 < total ? { ready: (partial: Buffer) => partial.length >= lead, send: () => request(index + 1) } : undefined;
      const outcome = await this.awaitReply(Command.REQUEST_BLOCK, this.timings.timeoutMs, "REQUEST_BLOCK", ahead);
      let received: Buffer;
      if (outcome.ok && outcome.payload.length >= 4 && outcome.payload.readUInt32LE(0) === address) {
        received = outcome.payload.subarray(4);
      } else {
        received = await this.readBlock(address, index, { outcome, aheadInFlight: requested > index });
        requested = index;
      }
      if (!take(index, received)) {
        if (requested > index) await this.drain(this.timings.drainMs);
        return;
      }
    }
  }

  /** COMPLETE: the bootloader jumps to the application about 100 ms later. */
  async complete(): Promise<void> {
    await this.sendCommand(Command.COMPLETE);
  }

  /** SEND_BLOCK with flashtool's retries: block tries per send, inside a loop that re-sends on a wrong echoed address. */
  private async writeBlock(address: number, block: Buffer, first?: FirstTry): Promise<void> {
    let echoed = -1;
    for (let attempt = 1; attempt <= this.timings.addressMismatchTries; attempt++) {
      let reply: Buffer;
      try {
        reply = await this.replyFor(Command.SEND_BLOCK, Buffer.concat([u32le(address), block]), { tries: this.timings.blockTries, timeoutMs: this.timings.blockTimeoutMs }, attempt === 1 ? first : undefined);
      } catch (err) {
        throw asWriteFailure(err, address);
      }
      echoed = reply.length >= 4 ? reply.readUInt32LE(0) : -1;
      if (echoed === address) return;
      this.log("info", `Katapult SEND_BLOCK: expected address ${hex(address)}, bootloader echoed ${hex(echoed)}`);
      await this.sleep(this.timings.addressMismatchDelayMs);
    }
    throw new MoonflashError(
      "FLASH_FAILED",
      `Flash write failed, flash address ${hex(address)}: the bootloader kept acknowledging another address (${hex(echoed)}). Flash again.`,
      { address: hex(address), echoedAddress: hex(echoed) },
    );
  }

  /**
   * The reply of one retried command; a pipelined first try counts as its first try. An ACK from that try is
   * returned as it is (the caller checks its address), after the reply to the request sent ahead is discarded.
   */
  private async replyFor(cmd: number, payload: Uint8Array, options: SendOptions, first: FirstTry | undefined): Promise<Buffer> {
    if (!first) return this.retryCommand(cmd, payload, options);
    const { outcome, aheadInFlight } = first;
    if (outcome.ok) {
      if (aheadInFlight) await this.drain(this.timings.drainMs);
      return outcome.payload;
    }
    return this.retryCommand(cmd, payload, options, { outcome, aheadInFlight });
  }

  /** REQUEST_BLOCK with flashtool's retries, inside a loop that asks again on a wrong echoed address. */
  private async readBlock(address: number, index: number, first?: FirstTry): Promise<Buffer> {
    for (let attempt = 1; attempt <= this.timings.addressMismatchTries; attempt++) {
      const reply = await this.replyFor(Command.REQUEST_BLOCK, u32le(address), {}, attempt === 1 ? first : undefined);
      const echoed = reply.length >= 4 ? reply.readUInt32LE(0) : -1;
      if (echoed === address) return reply.subarray(4);
      this.log("info", `Katapult REQUEST_BLOCK: expected address ${hex(address)}, bootloader echoed ${hex(echoed)}`);
      await this.sleep(this.timings.addressMismatchDelayMs);
    }
    throw new MoonflashError("PROTOCOL_ERROR", `Block Request Error, block ${index} (flash address ${hex(address)}): the bootloader returned other blocks. Flash again.`, {
      block: index,
      address: hex(address),
    });
  }

  private requireInfo(): ConnectInfo {
    if (!this.info) throw new MoonflashError("INTERNAL", "Katapult session used before connect().");
    return this.info;
  }

  private async write(frame: Buffer, name: string): Promise<void> {
    if (this.closedError) throw this.closedLinkError(name);
    try {
      await this.link.write(frame);
    } catch (err) {
      throw this.closedLinkError(name, err);
    }
  }

  private closedLinkError(name: string, cause: unknown = this.closedError): MoonflashError {
    if (isMoonflashError(cause)) return cause;
    return new MoonflashError(
      "DEVICE_NOT_FOUND",
      `The link to ${this.link.description} closed during ${name}: the device disconnected or reset. Check the cable and power, then flash again.`,
      { command: name, device: this.link.description, disconnected: true },
      { cause },
    );
  }

  /**
   * Waits for the reply to `cmd`: the first whole frame decides; garbage before it is skipped. With `ahead`, the
   * next request goes out as soon as the part of this reply received so far satisfies `ahead.ready` (at most once).
   */
  private async awaitReply(cmd: number, timeoutMs: number, name: string, ahead?: SendAhead): Promise<TryOutcome> {
    let sentAhead = false;
    let timedOut = false;
    // One timer per reply, not one per wait: the reply arrives over several wake-ups.
    const timer = setTimeout(() => {
      timedOut = true;
      this.notify();
    }, timeoutMs);
    this.aheadReady = ahead ? ahead.ready : null;
    try {
      while (true) {
        const item = this.items.shift();
        if (item) {
          if ("fault" in item) {
            if (item.fault.kind === "garbage-skipped") continue;
            return { ok: false, kind: "bad-frame", text: `corrupt reply (${item.fault.kind})` };
          }
          const { frame } = item;
          switch (frame.cmd) {
            case Response.ACK: {
              const echoed = frame.payload.length >= 4 ? frame.payload.readUInt32LE(0) : -1;
              if (echoed !== cmd) return { ok: false, kind: "wrong-echo", text: `ACK for ${commandName(echoed)} instead of ${name}` };
              return { ok: true, payload: frame.payload.subarray(4) };
            }
            case Response.BUSY:
              return { ok: false, kind: "busy", text: "received busy signal" };
            case Response.NACK:
              return { ok: false, kind: "nack", text: "NACK (the bootloader saw a malformed frame)" };
            case Response.ERROR:
              return { ok: false, kind: "error", text: "ERROR reply (command failed)" };
            default:
              return { ok: false, kind: "bad-frame", text: `unexpected reply code ${commandName(frame.cmd)}` };
          }
        }
        if (this.closedError) throw this.closedLinkError(name);
        this.throwIfAborted();
        if (ahead && !sentAhead && ahead.ready(this.decoder.partial)) {
          sentAhead = true;
          this.aheadReady = null;
          await ahead.send();
          continue;
        }
        if (timedOut) return { ok: false, kind: "timeout", text: "response timed out" };
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    } finally {
      clearTimeout(timer);
      this.aheadReady = null;
    }
  }

  /**
   * flashtool's pause between tries: after BUSY a longer wait, otherwise discard late input, then wait. With a
   * request sent ahead still on the wire, its reply is discarded in any case.
   */
  private async pauseAfterFailedTry(kind: FailedTry["kind"], aheadInFlight = false): Promise<void> {
    if (kind === "busy") {
      await this.sleep(this.timings.busyDelayMs);
      if (aheadInFlight) await this.drain(this.timings.drainMs);
      return;
    }
    await this.drain(this.timings.drainMs);
    await this.sleep(this.timings.retryDelayMs);
  }

  /** Discards everything that arrives for `ms` (late replies to a failed try must not answer the next one). */
  private async drain(ms: number): Promise<void> {
    const deadline = Date.now() + ms;
    this.items.length = 0;
    this.decoder.reset();
    while (true) {
      const left = deadline - Date.now();
      if (left <= 0 || this.closedError) break;
      await this.waitForInput(left);
      this.items.length = 0;
    }
    this.decoder.reset();
  }

  /** Resolves on the next notify() (input, close, abort) or after `ms`. */
  private waitForInput(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(this.notify, ms);
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  private readonly notify = (): void => {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  };

  private async sleep(ms: number): Promise<void> {
    if (ms <= 0) return;
    await new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.signal?.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.signal?.addEventListener("abort", done, { once: true });
    });
    this.throwIfAborted();
  }

  private throwIfAborted(): void {
    if (this.signal?.aborted) throw new MoonflashError("CANCELLED", "The flash was cancelled before anything was written.");
  }
}

/** Block `index` of the image, padded to `blockSize` with 0xFF (erased flash): a view, a copy only for the last block. */
function paddedBlock(image: Uint8Array, index: number, blockSize: number): Buffer {
  const start = index * blockSize;
  if (start + blockSize <= image.length) return Buffer.from(image.buffer, image.byteOffset + start, blockSize);
  const block = Buffer.alloc(blockSize, 0xff);
  block.set(image.subarray(start, image.length));
  return block;
}

function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

function hex(value: number): string {
  return `0x${(value >>> 0).toString(16).toUpperCase()}`;
}

/** Writing failed: an exhausted ERROR/NACK becomes FLASH_FAILED, a vanished device keeps its cause; both carry the address. */
function asWriteFailure(err: unknown, address: number | null): unknown {
  if (!isMoonflashError(err) || err.code === "CANCELLED") return err;
  const where = address === null ? "at end of file" : `flash address ${hex(address)}`;
  const details = { ...err.details, ...(address === null ? {} : { address: hex(address) }) };
  if (err.code === "PROTOCOL_ERROR" || err.details.disconnected === true) {
    return new MoonflashError("FLASH_FAILED", `Flash write failed, ${where}: ${err.message}`, details, { cause: err });
  }
  return new MoonflashError(err.code, `${err.message} (${where})`, details, { cause: err });
}
