import { execFile } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import pino from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { openSerialLink, type ByteLink, type SerialOpenOptions } from "../../src/flash/link.js";
import { openPtyRelay, type PtyRelay } from "../../src/sim/pty-relay.js";
import { rejection } from "./support/rejection.js";

let dir: string;
let relay: PtyRelay | undefined;
const links: ByteLink[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-link-"));
});

afterEach(async () => {
  for (const link of links.splice(0)) await link.close();
  await relay?.close();
  relay = undefined;
  await rm(dir, { recursive: true, force: true });
});

async function startRelay(): Promise<PtyRelay> {
  relay = await openPtyRelay(join(dir, "ttyVIRT0"));
  return relay;
}

/** Collects bytes from an emitter-style source until `length` bytes arrived. */
function collect(subscribe: (listener: (chunk: Buffer) => void) => void, length: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    subscribe((chunk) => {
      chunks.push(chunk);
      size += chunk.length;
      if (size >= length) resolve(Buffer.concat(chunks));
    });
  });
}

/** A pino logger whose lines land in `lines`. */
function capturingLogger(lines: Array<Record<string, unknown>>): pino.Logger {
  return pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) });
}

describe.each([
  ["straight on the binding's fd", {}],
  ["through the binding's public read/write (its internals treated as missing)", { ignoreBindingInternals: true }],
] as Array<[string, SerialOpenOptions]>)("serial ByteLink over a real pty, %s", (_io, options) => {
  async function open(path: string, baud = 250000): Promise<ByteLink> {
    const link = await openSerialLink(path, baud, options);
    links.push(link);
    return link;
  }

  it("moves bytes both ways and sets the line speed", async () => {
    const pty = await startRelay();
    const link = await open(pty.linkPath);
    const toDevice = collect((l) => pty.on("data", l), 5);
    await link.write(Buffer.from("hello"));
    expect(await toDevice).toEqual(Buffer.from("hello"));
    const toHost = collect((l) => link.onData(l), 4);
    pty.write(Buffer.from([1, 2, 3, 4]));
    expect(await toHost).toEqual(Buffer.from([1, 2, 3, 4]));
    expect(pty.baud).toBe(250000);
  });

  it("keeps the order of writes issued without waiting, and of 64 KiB each way", async () => {
    const pty = await startRelay();
    const link = await open(pty.linkPath);
    const out = Buffer.from(Array.from({ length: 65536 }, (_, i) => (i * 7) % 256));
    const toDevice = collect((l) => pty.on("data", l), out.length);
    await Promise.all([0, 1, 2, 3].map((quarter) => link.write(out.subarray(quarter * 16384, (quarter + 1) * 16384))));
    expect(await toDevice).toEqual(out);
    const back = Buffer.from(out).reverse();
    const toHost = collect((l) => link.onData(l), back.length);
    pty.write(back);
    expect(await toHost).toEqual(back);
  });

  it("locks the device: a second opener gets DEVICE_IN_USE", async () => {
    const pty = await startRelay();
    await open(pty.linkPath);
    const err = await rejection(openSerialLink(pty.linkPath, 250000, options));
    expect(err.code).toBe("DEVICE_IN_USE");
  });

  it("notices the device vanishing: the next write fails and onClose fires", async () => {
    const pty = await startRelay();
    const link = await open(pty.linkPath);
    const closed = new Promise<Error | undefined>((resolve) => link.onClose(resolve));
    await pty.close();
    const err = await rejection(link.write(Buffer.from("x")));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.details.disconnected).toBe(true);
    expect(await closed).toBeInstanceOf(Error);
    expect(link.isOpen).toBe(false);
  });

  it("closes cleanly: onClose fires without an error and writes are refused", async () => {
    const pty = await startRelay();
    const link = await open(pty.linkPath);
    const closed = new Promise<Error | undefined>((resolve) => link.onClose(resolve));
    await link.close();
    expect(await closed).toBeUndefined();
    expect((await rejection(link.write(Buffer.from("x")))).code).toBe("DEVICE_NOT_FOUND");
  });
});

describe("serial ByteLink: choosing how bytes move", () => {
  it("says nothing when the binding's internals are there", async () => {
    const pty = await startRelay();
    const lines: Array<Record<string, unknown>> = [];
    links.push(await openSerialLink(pty.linkPath, 250000, { logger: capturingLogger(lines) }));
    expect(lines).toEqual([]);
  });

  it("warns once, naming the reason and the fix, when it falls back to the public API", async () => {
    const pty = await startRelay();
    const lines: Array<Record<string, unknown>> = [];
    const logger = capturingLogger(lines);
    for (let i = 0; i < 2; i++) {
      const link = await openSerialLink(pty.linkPath, 250000, { logger, ignoreBindingInternals: true });
      await link.close();
    }
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({ level: 40, device: pty.linkPath, reason: "ignored by the caller" });
    expect(lines[0]!.msg).toContain("Run npm ci in the moonflash directory");
  });
});

describe("serial open errors", () => {
  it("reports a missing device as DEVICE_NOT_FOUND", async () => {
    const err = await rejection(openSerialLink(join(dir, "nothing-here"), 250000));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.message).toContain("nothing-here");
  });

  it("reports a pty this user may not open as DEVICE_PERMISSION with the dialout fix (opened by an unprivileged child process)", async () => {
    const pty = await startRelay();
    // Root opens anything, so as root the child drops to nobody (node's uid/gid spawn options, which also clear
    // the supplementary groups); any other user cannot open its own pty once it is mode 000.
    await chmod(pty.slavePath, 0o000);
    const asNobody = process.getuid?.() === 0 ? { uid: 65534, gid: 65534 } : {};
    const child = resolve(import.meta.dirname, "support/open-serial-child.ts");
    const { stdout } = await promisify(execFile)(process.execPath, ["--import", "tsx", child, pty.slavePath], {
      cwd: resolve(import.meta.dirname, "../.."),
      ...asNobody,
    });
    expect(JSON.parse(stdout)).toEqual({
      code: "DEVICE_PERMISSION",
      device: pty.slavePath,
      message:
        `moonflash may not open ${pty.slavePath} (permission denied): add the user moonflash runs as to the dialout group ` +
        "(sudo usermod -aG dialout $USER, then log in again or restart the service).",
    });
  });
});
