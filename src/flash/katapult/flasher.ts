// The "katapult" flash method: our own Katapult host over a serial link (USB CDC, UART, pty). Bootloader entry
// follows Katapult's scripts/flashtool.py serial mode: the requests live in bootloader-request.ts, what runs on a
// device (Klipper, Katapult, by usb-ids.ts) comes from discovery.ts, the protocol lives in session.ts.

import { stat } from "node:fs/promises";
import type { Logger } from "pino";
import { MoonflashError, isMoonflashError, toMoonflashError } from "../../core/errors.js";
import type { JobContext, LogLevel } from "../../core/events.js";
import { identifyDevice, reenumerationCandidates, type DiscoveredDevice, type IdentifyOptions } from "../discovery.js";
import { openSerialLink, type ByteLink } from "../link.js";
import { mcuFlash } from "../mcu-flash.js";
import { flashCommandsFor } from "../mcu-name.js";
import type { FlashJobTarget, FlashOutcome, FlashTarget, Flasher } from "../types.js";
import { requestUsbBootloader, sendSerialBootloaderRequest } from "./bootloader-request.js";
import { detectImageMcu } from "./image.js";
import type { ConnectInfo } from "./codec.js";
import { KatapultSession, type KatapultTimings } from "./session.js";
// node:timers/promises is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

export const NOT_CANCELLABLE_WHILE_WRITING = "writing flash: stopping now would leave the board without firmware";
/** A read-back for a backup ends after this much erased flash in a row (Klipper images hold no such run). */
export const BACKUP_ERASED_RUN = 4096;
/** How far a backup reads when neither flash_size nor the MCU type's flash is known. */
const BACKUP_LIMIT_UNKNOWN_FLASH = 1024 * 1024;

export interface KatapultFlasherOptions {
  logger?: Logger;
  /** Protocol timings (session.ts defaults are flashtool's). */
  timings?: Partial<KatapultTimings>;
  /** How long to wait for a USB board to come back in Katapult after the 1200-baud request, ms. Default 8000. */
  bootloaderTimeoutMs?: number;
  /** Poll interval while waiting for the board to come back, ms. Default 100. */
  bootloaderPollMs?: number;
  /** Wait after the serial bootloader request string (flashtool waits 1 s). Default 1000. */
  serialRequestSettleMs?: number;
  /** `auto` on a non-USB device first tries one CONNECT with this timeout, ms. Default 500. */
  autoProbeTimeoutMs?: number;
  /** Where discovery reads /dev/serial links; tests point it at a fake tree. Default "/dev". */
  devRoot?: string;
  /** Where discovery reads USB ids; tests point it at a fake tree. Default "/sys". */
  sysRoot?: string;
  /** Serial links treat the binding's internals as missing and use its public API (link.ts): the test seam. */
  ignoreBindingInternals?: boolean;
}

/** Where Katapult is to be found, and whether this attempt brought the board there from its application. */
interface Entered {
  path: string;
  fromApplication: boolean;
}

export class KatapultFlasher implements Flasher {
  readonly name = "katapult" as const;
  private readonly options: Required<Pick<KatapultFlasherOptions, "bootloaderTimeoutMs" | "bootloaderPollMs" | "serialRequestSettleMs" | "autoProbeTimeoutMs">>;
  private readonly discoveryRoots: IdentifyOptions;

  constructor(private readonly config: KatapultFlasherOptions = {}) {
    this.options = {
      bootloaderTimeoutMs: config.bootloaderTimeoutMs ?? 8000,
      bootloaderPollMs: config.bootloaderPollMs ?? 100,
      serialRequestSettleMs: config.serialRequestSettleMs ?? 1000,
      autoProbeTimeoutMs: config.autoProbeTimeoutMs ?? 500,
    };
    this.discoveryRoots = { devRoot: config.devRoot, sysRoot: config.sysRoot };
  }

  async preflight(target: FlashTarget): Promise<void> {
    const device = requireDevice(target);
    try {
      await stat(device);
    } catch (err) {
      throw new MoonflashError(
        "DEVICE_NOT_FOUND",
        `No serial device at ${device}. Check the cable and the [${target.mcu}] serial setting (ls /dev/serial/by-id/).`,
        { device },
        { cause: err },
      );
    }
  }

  async flash(target: FlashJobTarget, ctx: JobContext): Promise<FlashOutcome> {
    const device = requireDevice(target);
    throwIfCancelled(ctx.signal);
    const image = target.image;
    const embedded = detectImageMcu(image);
    if (embedded) this.note(ctx, "info", `Image built for ${embedded.mcu} (Klipper ${embedded.version})`);

    ctx.stage("bootloader", `Entering Katapult on ${device} (${target.bootloader})`);
    const { path, fromApplication } = await this.enterBootloader(target, device, ctx);

    ctx.stage("connect", `Connecting to Katapult on ${path}`);
    const link = await this.openWithRetry(path, target.baud, ctx.signal);
    // Cancellation may stop the job only until the first block is sent.
    const cancel = new AbortController();
    /** Set just before the first SEND_BLOCK: from then on the application area may hold part of the new image. */
    let writing = false;
    let verified = false;
    let answered = false;
    const onAbort = (): void => {
      if (!writing) cancel.abort();
    };
    ctx.signal.addEventListener("abort", onAbort, { once: true });
    const session = new KatapultSession(link, { timings: this.config.timings, signal: cancel.signal, log: (level, text) => this.note(ctx, level, text) });
    try {
      // Checked here, with the link open, so that a board just asked into Katapult is sent back (leaveBootloader).
      throwIfCancelled(ctx.signal);
      const info = await session.connect();
      answered = true;
      this.note(ctx, "info", `Katapult ${info.softwareVersion} (protocol ${info.protocolVersion}) on ${path}: MCU ${info.mcuType}, block size ${info.blockSize}, application at 0x${info.appStartAddress.toString(16)}`);
      checkMcu(embedded?.mcu, info.mcuType, "The image was built for", "its Klipper dictionary");
      checkMcu(target.expectedMcuType, info.mcuType, "This board is expected to be", "moonflash.conf mcu_type, or the MCU Klipper reported");
      checkSize(image.length, info, target.flashSize ?? null, target.mcu);
      throwIfCancelled(ctx.signal);
      if (target.backupApplication) await this.backUp(session, info, target, ctx);
      throwIfCancelled(ctx.signal);

      writing = true;
      ctx.setCancellable(false, NOT_CANCELLABLE_WHILE_WRITING);
      ctx.stage("write", `Writing ${image.length} bytes`);
      const blockBytes = (done: number): number => Math.min(done * info.blockSize, image.length);
      const written = await session.writeImage(image, (done) => ctx.progress(blockBytes(done), image.length, "bytes", "write"));
      const pages = await session.sendEof();
      this.note(ctx, "info", `Write complete: ${pages} pages`);
      ctx.stage("verify", `Verifying ${written.blocks} blocks`);
      const readBack = await session.verify(image, (done) => ctx.progress(blockBytes(done), image.length, "bytes", "verify"));
      verified = true;
      this.note(ctx, "info", `Verification complete: SHA-1 ${readBack.sha1}`);
      return {
        bytes: image.length,
        verified: true,
        device: path,
        details: {
          blockSize: info.blockSize,
          appStart: `0x${info.appStartAddress.toString(16)}`,
          mcuType: info.mcuType,
          softwareVersion: info.softwareVersion,
          protocolVersion: info.protocolVersion,
          pages,
          sha1: written.sha1,
        },
      };
    } catch (err) {
      const error = toMoonflashError(err, "FLASH_FAILED");
      throw writing ? incompleteImageError(error, !link.isOpen || error.details.disconnected === true, target.mcu) : error;
    } finally {
      ctx.signal.removeEventListener("abort", onAbort);
      session.dispose();
      await this.leaveBootloader(link, ctx, { verified, writing, fromApplication, answered });
      await link.close();
    }
  }

  /**
   * Reads the application the board holds back and hands it to the engine (backup_before_flash), before anything is
   * written: so even the first flash of a board can be rolled back. Costs one read-back of the old application.
   */
  private async backUp(session: KatapultSession, info: ConnectInfo, target: FlashJobTarget, ctx: JobContext): Promise<void> {
    const limit = applicationRoom(info, target.flashSize ?? null)?.available ?? BACKUP_LIMIT_UNKNOWN_FLASH;
    ctx.stage("backup", `Reading the current application back (up to ${limit} bytes) before it is replaced`);
    const started = performance.now();
    const application = await session.readApplication(limit, BACKUP_ERASED_RUN, (bytes) => ctx.progress(Math.min(bytes, limit), limit, "bytes", "backup"));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (application.length === 0) {
      this.note(ctx, "info", `Nothing to back up: the application area is erased (${seconds} s)`);
      return;
    }
    await target.backupApplication!(application);
    this.note(ctx, "info", `Backed up the current application: ${application.length} bytes in ${seconds} s`);
  }

  /**
   * COMPLETE makes Katapult start whatever the application area holds (Katapult src/flashcmd.c command_complete).
   * flashtool.py sends it in a `finally`, after failures too; we send it only when what it starts is known sound:
   * - after a verified write;
   * - after a failure before the first SEND_BLOCK (no answer to CONNECT, MCU_MISMATCH, FIRMWARE_TOO_LARGE, a
   *   cancel) when this attempt brought the board from its application into Katapult: that application is
   *   untouched, and a refused flash should change nothing. A board reached through a wrong serial path (the usual
   *   MCU_MISMATCH) goes back to work instead of sitting in its bootloader.
   * Never once a block was sent and the image did not verify (write, EOF or read-back failed): the application area
   * holds part of the new image. Staying in Katapult lets a retry, or the next method, write it whole (Klipper's
   * `make flash` hands a board in Katapult to flashtool.py, scripts/flash_usb.py). Nor for a board that was, or may
   * have been, in Katapult already: what its flash holds is unknown, e.g. the rest of an earlier failed write.
   * Katapult has no timeout: it stays until COMPLETE or a reset (src/sched.c, src/bootentry.c), and a reset starts
   * any application whose first word is programmed (src/generic/armcm_canboot.c application_check_valid).
   * COMPLETE's own failure is only logged: it must never replace the error that ended the flash. When CONNECT
   * never got an answer, one try is enough (flashtool spends another ~14 s retrying COMPLETE to a silent device).
   */
  private async leaveBootloader(
    link: ByteLink,
    ctx: JobContext,
    state: { verified: boolean; writing: boolean; fromApplication: boolean; answered: boolean },
  ): Promise<void> {
    if (!state.verified && state.writing) {
      this.note(ctx, "warn", "Not sending COMPLETE: the new image was not written and verified whole, so the board stays in Katapult");
      return;
    }
    if (!state.verified && !state.fromApplication) {
      this.note(ctx, "info", "Not sending COMPLETE: the board was in Katapult before this flash began, so it stays there");
      return;
    }
    if (!link.isOpen) {
      this.note(ctx, "warn", "Not sending COMPLETE: the device is gone");
      return;
    }
    // A fresh session without the cancel signal: a cancelled job still sends the board back to its application.
    const timings = state.answered ? this.config.timings : { ...this.config.timings, tries: 1 };
    const session = new KatapultSession(link, { timings, log: (level, text) => this.note(ctx, level, text) });
    try {
      await session.complete();
    } catch (err) {
      this.note(ctx, "warn", `COMPLETE failed (${(err as Error).message}); the board may stay in Katapult until it is reset`);
    } finally {
      session.dispose();
    }
  }

  /**
   * Puts the board into Katapult as `target.bootloader` says. `fromApplication` (see leaveBootloader) is true when
   * this attempt asked a running application into Katapult: bootloader serial, usb with the re-enumeration seen, or
   * auto finding Klipper's USB id or a UART board that does not answer CONNECT. It is false when the board was, or
   * may have been, in Katapult already: none, Katapult's USB id, a board answering the probe CONNECT, or a USB
   * request after which no re-enumeration was seen.
   */
  private async enterBootloader(target: FlashTarget, device: string, ctx: JobContext): Promise<Entered> {
    switch (target.bootloader) {
      case "none":
        return { path: device, fromApplication: false };
      case "serial":
        return this.enterViaSerialRequest(device, target.baud, ctx);
      case "usb":
        return this.enterViaUsb(device, await identifyDevice(device, this.discoveryRoots), ctx);
      case "auto": {
        const identity = await identifyDevice(device, this.discoveryRoots);
        if (identity?.kind === "klipper") {
          this.note(ctx, "info", `${device} is a USB device running Klipper (${identity.label})`);
          return this.enterViaUsb(device, identity, ctx);
        }
        if (identity?.kind === "katapult") {
          this.note(ctx, "info", `${device} is a USB device running Katapult (${identity.label})`);
          return { path: device, fromApplication: false };
        }
        if (await this.answersConnect(device, target.baud, ctx)) return { path: device, fromApplication: false };
        return this.enterViaSerialRequest(device, target.baud, ctx);
      }
    }
  }

  private async enterViaSerialRequest(device: string, baud: number, ctx: JobContext): Promise<Entered> {
    this.note(ctx, "info", `Sending the serial bootloader request to ${device} at ${baud} baud`);
    await sendSerialBootloaderRequest(device, baud);
    await abortableSleep(this.options.serialRequestSettleMs, ctx.signal);
    return { path: device, fromApplication: true };
  }

  /**
   * 1200-baud request, then waits for the board to re-enumerate under one of the names discovery expects it
   * back under (reenumerationCandidates): the same path, the by-id name renamed usb-Klipper_ → usb-katapult_, or
   * the stable by-path link.
   */
  private async enterViaUsb(device: string, identity: DiscoveredDevice | null, ctx: JobContext): Promise<Entered> {
    const candidates = reenumerationCandidates(device, identity);
    const before = new Map<string, number | null>();
    for (const candidate of candidates) before.set(candidate, await inodeOf(candidate));
    const vanished = new Set<string>();

    this.note(ctx, "info", `Requesting the USB bootloader on ${device}`);
    await requestUsbBootloader(device);
    const deadline = Date.now() + this.options.bootloaderTimeoutMs;
    while (Date.now() < deadline) {
      await abortableSleep(this.options.bootloaderPollMs, ctx.signal);
      for (const candidate of candidates) {
        const inode = await inodeOf(candidate);
        if (inode === null) {
          vanished.add(candidate);
          continue;
        }
        // A node that existed before counts only once it was replaced: until then it is still the Klipper device.
        const initial = before.get(candidate) ?? null;
        if (initial === null || vanished.has(candidate) || inode !== initial) {
          this.note(ctx, "info", `Katapult detected on ${candidate}`);
          return { path: candidate, fromApplication: true };
        }
      }
    }
    // flashtool also carries on with the old path when it sees no change: some boards re-enumerate too fast to
    // notice. Then the board may as well have been in Katapult already: not known to come from its application.
    for (const candidate of candidates) {
      if ((await inodeOf(candidate)) !== null) {
        this.note(ctx, "warn", `No USB re-enumeration seen within ${this.options.bootloaderTimeoutMs} ms; trying ${candidate}`);
        return { path: candidate, fromApplication: false };
      }
    }
    throw new MoonflashError(
      "BOOTLOADER_TIMEOUT",
      `The board did not come back after the USB bootloader request on ${device} within ${this.options.bootloaderTimeoutMs} ms. Check that Katapult is installed; power-cycle the board (double-tap reset enters Katapult on most boards) and flash again.`,
      { device, candidates, timeoutMs: this.options.bootloaderTimeoutMs },
    );
  }

  /** One short CONNECT: a UART board already sitting in Katapult answers, one running Klipper does not. */
  private async answersConnect(device: string, baud: number, ctx: JobContext): Promise<boolean> {
    const link = await this.openLink(device, baud);
    const session = new KatapultSession(link, { timings: { ...this.config.timings, tries: 1, timeoutMs: this.options.autoProbeTimeoutMs }, signal: ctx.signal });
    try {
      await session.connect();
      this.note(ctx, "info", `${device} already answers as Katapult`);
      return true;
    } catch (err) {
      if (isMoonflashError(err) && err.code === "CANCELLED") throw err;
      this.note(ctx, "debug", `${device} does not answer CONNECT (${(err as Error).message})`);
      return false;
    } finally {
      session.dispose();
      await link.close();
    }
  }

  /** A freshly enumerated tty can be missing, or exist before udev has given it its permissions; retry until the deadline. */
  private async openWithRetry(path: string, baud: number, signal: AbortSignal): Promise<ByteLink> {
    const deadline = Date.now() + this.options.bootloaderTimeoutMs;
    while (true) {
      try {
        return await this.openLink(path, baud);
      } catch (err) {
        const retriable = isMoonflashError(err) && (err.code === "DEVICE_NOT_FOUND" || err.code === "DEVICE_PERMISSION");
        if (!retriable || Date.now() >= deadline) throw err;
        await abortableSleep(this.options.bootloaderPollMs, signal);
      }
    }
  }

  private openLink(path: string, baud: number): Promise<ByteLink> {
    return openSerialLink(path, baud, { logger: this.config.logger, ignoreBindingInternals: this.config.ignoreBindingInternals });
  }

  private note(ctx: JobContext, level: LogLevel, message: string): void {
    this.config.logger?.[level]({ target: ctx.target }, message);
    if (level !== "debug") ctx.log(level, message);
  }
}

function requireDevice(target: FlashTarget): string {
  if (!target.device) {
    throw new MoonflashError(
      "DEVICE_NOT_FOUND",
      `[${target.mcu}] has no serial device; the katapult method flashes serial and USB boards only. Use the flashtool method for CAN.`,
      { mcu: target.mcu },
    );
  }
  return target.device;
}

function checkMcu(expectedMcu: string | undefined, bootloaderMcu: string, what: string, source: string): void {
  if (!expectedMcu || expectedMcu.toLowerCase() === bootloaderMcu.toLowerCase()) return;
  throw new MoonflashError(
    "MCU_MISMATCH",
    `${what} ${expectedMcu} (${source}) but Katapult on this device reports ${bootloaderMcu}. Nothing was written; check the device path and build the firmware for this board (make menuconfig), then flash again.`,
    { expectedMcu, bootloaderMcu, source },
  );
}

/**
 * Refuses, before the first block, an image that cannot fit after the bootloader: the board would take every block
 * up to the end of its flash, fail there and hold a truncated application. The flash is moonflash.conf's
 * flash_size (the chip's whole flash) when given, else what mcu-flash.ts knows of the MCU type the bootloader
 * reports. The room after the bootloader is that size less the application start's offset into flash when the
 * size covers the bootloader (flash_size, wholeFlash entries); otherwise all that is known is Klipper's link
 * limit, which already counts from the application start (mcu-flash.ts).
 */
function checkSize(imageBytes: number, info: ConnectInfo, configured: number | null, section: string): void {
  const room = applicationRoom(info, configured);
  if (!room || imageBytes <= room.available) return;
  const { available, flashSize, limit, source } = room;
  const fix = configured
    ? `or correct flash_size in [${section}] of moonflash.conf`
    : `or, if the chip really has room for this image, set flash_size: in [${section}] of moonflash.conf`;
  throw new MoonflashError(
    "FIRMWARE_TOO_LARGE",
    `The image is ${imageBytes} bytes but ${limit}. Nothing was written. Build the firmware for this board (make menuconfig: processor model, bootloader offset), ${fix}.`,
    { imageBytes, available, flashSize, mcuType: info.mcuType, appStart: `0x${info.appStartAddress.toString(16)}`, source },
  );
}

/** The bytes an application may take after the bootloader, and how that is known; null when nothing is known. */
function applicationRoom(info: ConnectInfo, configured: number | null): { available: number; flashSize: number; limit: string; source: string } | null {
  const appStart = info.appStartAddress;
  const appStartHex = `0x${appStart.toString(16)}`;
  const chip = mcuFlash(info.mcuType);
  let available: number;
  let flashSize: number;
  let limit: string;
  let source: string;
  if (configured) {
    // A type the table does not know: flash starts 1 MiB-aligned on every Katapult target (stm32 0x08000000,
    // rp2040 0x10000000, lpc176x 0).
    const base = chip?.flashBase ?? appStart - (appStart % 0x100000);
    available = Math.max(0, configured - (appStart - base));
    flashSize = configured;
    source = "moonflash.conf flash_size";
    limit = `only ${available} bytes of flash follow the bootloader (flash_size ${configured} in moonflash.conf, application at ${appStartHex})`;
  } else if (chip) {
    const offset = appStart - chip.flashBase;
    flashSize = chip.flashSize;
    source = chip.source;
    // An application start outside the flash the table describes says the table does not fit this board: then only
    // the whole size is held against the image.
    if (chip.wholeFlash && offset >= 0 && offset < chip.flashSize) {
      available = chip.flashSize - offset;
      limit = `${info.mcuType} has ${chip.flashSize} bytes of flash (FLASH_SIZE in ${chip.source}) and only ${available} follow the bootloader (application at ${appStartHex})`;
    } else {
      available = chip.flashSize;
      limit = `a Klipper build for ${info.mcuType}, the MCU this bootloader reports, holds at most ${chip.flashSize} bytes (FLASH_SIZE in ${chip.source})`;
    }
  } else {
    return null;
  }
  return { available, flashSize, limit, source };
}

/**
 * A failure once writing began. The error keeps its code; the message says where the board is and what to do,
 * since COMPLETE was not sent (leaveBootloader).
 */
function incompleteImageError(error: MoonflashError, disconnected: boolean, section: string): MoonflashError {
  const again = `run the flash again (${flashCommandsFor(section)})`;
  const next = disconnected
    ? `The board disconnected and may hold an incomplete image: reconnect it, enter Katapult if it does not come back in it (double-tap reset on most boards), then ${again}.`
    : `COMPLETE was not sent, so the board stays in Katapult instead of starting an incomplete image: ${again}. A reset or power-cycle before that would start the incomplete image.`;
  return new MoonflashError(error.code, `${error.message} ${next}`, { ...error.details, leftInBootloader: !disconnected }, { cause: error });
}

function throwIfCancelled(signal: AbortSignal): void {
  if (signal.aborted) throw new MoonflashError("CANCELLED", "The flash was cancelled before anything was written.");
}

async function abortableSleep(ms: number, signal: AbortSignal): Promise<void> {
  try {
    await process.getBuiltinModule("node:timers/promises").setTimeout(ms, undefined, { signal });
  } catch {
    throwIfCancelled(signal);
  }
}

async function inodeOf(path: string): Promise<number | null> {
  try {
    return (await stat(path)).ino;
  } catch {
    return null;
  }
}
