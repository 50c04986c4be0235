import { once } from "node:events";
import { lstat, mkdtemp, readlink, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { execa } from "execa";
import { SerialPort } from "serialport";
import { afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  Command,
  FrameDecoder,
  Response,
  SERIAL_BOOTLOADER_REQUEST,
  decodeConnect,
  encodeComplete,
  encodeConnect,
  encodeRequestBlock,
  encodeSendBlock,
  encodeSendEof,
  u32le,
  type Frame,
} from "../../src/flash/katapult/codec.js";
import { startVirtualDevice, type VirtualDevice, type VirtualDeviceOptions } from "../../src/sim/virtual-device.js";
import type { BlockEvent } from "../../src/sim/katapult-device.js";

const START = 0x8002000;

let dir: string;
let python: string;
const devices: VirtualDevice[] = [];
const hosts: SerialPort[] = [];

beforeAll(async () => {
  // The real interpreter behind python3, so a version-manager shim does not slow every start.
  python = (await execa("python3", ["-c", "import sys; print(sys.executable)"], { timeout: 10_000 })).stdout.trim();
});

beforeEach(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "moonflash-vdev-"));
});

afterEach(async () => {
  await Promise.all(hosts.splice(0).filter((p) => p.isOpen).map((p) => new Promise((resolve) => p.close(resolve))));
  await Promise.all(devices.splice(0).map((d) => d.stop()));
  await rm(dir, { recursive: true, force: true });
});

async function device(options: Partial<VirtualDeviceOptions> = {}): Promise<VirtualDevice> {
  const dev = await startVirtualDevice({ path: path.join(dir, "ttyKlipper"), python, reappearDelayMs: 50, ...options });
  devices.push(dev);
  return dev;
}

/** A bare Katapult host over node-serialport: one request, one decoded reply. */
class Host {
  private readonly decoder = new FrameDecoder();
  private readonly frames: Frame[] = [];
  private waiter: (() => void) | undefined;

  private constructor(readonly port: SerialPort) {
    port.on("data", (chunk: Buffer) => {
      for (const item of this.decoder.push(chunk)) if ("frame" in item) this.frames.push(item.frame);
      this.waiter?.();
    });
  }

  static async open(linkPath: string, baudRate = 250000): Promise<Host> {
    const port = new SerialPort({ path: linkPath, baudRate, autoOpen: false });
    await new Promise<void>((resolve, reject) => port.open((err) => (err ? reject(err) : resolve())));
    hosts.push(port);
    return new Host(port);
  }

  async request(bytes: Buffer, timeoutMs = 3000): Promise<Frame> {
    this.port.write(bytes);
    const deadline = Date.now() + timeoutMs;
    while (this.frames.length === 0) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    return this.frames.shift()!;
  }

  send(bytes: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      this.port.write(bytes);
      this.port.drain((err) => (err ? reject(err) : resolve()));
    });
  }

  setBaud(baudRate: number): Promise<void> {
    return new Promise((resolve, reject) => this.port.update({ baudRate }, (err) => (err ? reject(err) : resolve())));
  }

  close(): Promise<void> {
    return new Promise((resolve, reject) => this.port.close((err) => (err ? reject(err) : resolve())));
  }
}

const exists = (p: string): Promise<boolean> => lstat(p).then(
  () => true,
  () => false,
);

async function until(check: () => Promise<boolean>, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function image(size: number): Buffer {
  return Buffer.from(Array.from({ length: size }, (_, i) => (i * 7 + 3) & 0xff));
}

describe("startVirtualDevice", () => {
  it("flashes and verifies an image through a real pty, then jumps to the app", async () => {
    const dev = await device();
    const blocks: BlockEvent[] = [];
    dev.on("block", (b) => blocks.push(b));
    const host = await Host.open(dev.path);

    const connect = await host.request(encodeConnect());
    expect(connect.cmd).toBe(Response.ACK);
    const info = decodeConnect(connect.payload.subarray(4));
    expect(info).toMatchObject({ protocolVersion: "1.1.0", appStartAddress: START, blockSize: 64, mcuType: "stm32f103xe", softwareVersion: "v0.13.0-virtual" });

    const firmware = image(2000);
    const padded = Buffer.concat([firmware, Buffer.alloc(64 - (firmware.length % 64), 0xff)]);
    for (let offset = 0; offset < padded.length; offset += 64) {
      const reply = await host.request(encodeSendBlock(START + offset, padded.subarray(offset, offset + 64)));
      expect(reply.payload).toEqual(u32le(Command.SEND_BLOCK, START + offset));
    }
    expect((await host.request(encodeSendEof())).payload).toEqual(u32le(Command.SEND_EOF, 2));
    for (let offset = 0; offset < padded.length; offset += 64) {
      const reply = await host.request(encodeRequestBlock(START + offset));
      expect(reply.payload.subarray(8)).toEqual(padded.subarray(offset, offset + 64));
    }
    const completed = once(dev, "complete");
    expect((await host.request(encodeComplete())).payload).toEqual(u32le(Command.COMPLETE));
    await completed;

    expect(dev.model.flash.subarray(0, padded.length)).toEqual(padded);
    expect(dev.model.mode).toBe("app");
    expect(blocks.map((b) => b.index)).toEqual(Array.from({ length: padded.length / 64 }, (_, i) => i));
    expect(blocks[1]).toEqual({ address: START + 64, index: 1 });
  });

  it("app mode: a 1200-baud open/close enters Katapult on the same path", async () => {
    const dev = await device({ mode: "app" });
    const entered = once(dev, "bootloader");
    const host = await Host.open(dev.path, 115200);
    await host.setBaud(1200);
    await host.close();
    await entered;
    expect(dev.model.mode).toBe("katapult");
    const again = await Host.open(dev.path);
    expect((await again.request(encodeConnect())).cmd).toBe(Response.ACK);
  });

  it("app mode: the serial request string enters Katapult", async () => {
    const dev = await device({ mode: "app" });
    const host = await Host.open(dev.path);
    await expect(host.request(encodeConnect(), 300)).rejects.toThrow(/no reply/);
    const entered = once(dev, "bootloader");
    await host.send(SERIAL_BOOTLOADER_REQUEST);
    await entered;
    expect((await host.request(encodeConnect())).cmd).toBe(Response.ACK);
  });

  it("reappearPath: after the bootloader request the device comes back as a new pty at the new path (simulated USB)", async () => {
    const klipperPath = path.join(dir, "usb-Klipper_stm32f103xe_1234-if00");
    const katapultPath = path.join(dir, "usb-katapult_stm32f103xe_1234-if00");
    const dev = await device({ mode: "app", path: klipperPath, reappearPath: katapultPath });
    const host = await Host.open(klipperPath, 115200);
    await host.setBaud(1200);
    await host.close();
    await until(async () => dev.path === katapultPath, "the device to re-appear");
    expect(await exists(klipperPath)).toBe(false);
    expect(await readlink(katapultPath)).toBe(dev.slavePath);

    const katapult = await Host.open(katapultPath);
    expect((await katapult.request(encodeConnect())).cmd).toBe(Response.ACK);
    expect((await katapult.request(encodeComplete())).cmd).toBe(Response.ACK);
    await katapult.close();
    await until(async () => dev.path === klipperPath, "the device to come back in the app");
    expect(await readlink(klipperPath)).toBe(dev.slavePath);
    expect(await exists(katapultPath)).toBe(false);
  });

  it("the disconnect fault closes the pty and removes the link", async () => {
    const dev = await device({ faults: [{ kind: "disconnect", afterBlocks: 1 }] });
    const host = await Host.open(dev.path);
    expect((await host.request(encodeSendBlock(START, image(64)))).cmd).toBe(Response.ACK);
    const gone = once(dev, "disconnect");
    host.port.write(encodeSendBlock(START + 64, image(64)));
    await gone;
    expect(await exists(path.join(dir, "ttyKlipper"))).toBe(false);
    expect(dev.model.written).toBe(64);
  });

  it("a throttled device still flashes correctly", async () => {
    const dev = await device({ baud: 250000 });
    const host = await Host.open(dev.path);
    const block = image(64);
    expect((await host.request(encodeSendBlock(START, block))).payload).toEqual(u32le(Command.SEND_BLOCK, START));
    expect((await host.request(encodeRequestBlock(START))).payload.subarray(8)).toEqual(block);
  });

  it("a throttled device has Katapult's 96-byte transmit buffer: a second read-back reply sent too early is lost", async () => {
    const dev = await device({ baud: 250000 });
    const host = await Host.open(dev.path);
    expect((await host.request(encodeConnect())).cmd).toBe(Response.ACK);
    // Two REQUEST_BLOCKs back to back: the second 80-byte reply does not fit beside the first, which is still unsent.
    await host.send(Buffer.concat([encodeRequestBlock(START), encodeRequestBlock(START + 64)]));
    expect((await host.request(Buffer.alloc(0))).payload.readUInt32LE(4)).toBe(START);
    await expect(host.request(Buffer.alloc(0), 300)).rejects.toThrow(/no reply/);
    expect(dev.model.frames.filter((f) => f.name === "REQUEST_BLOCK")).toHaveLength(2);
  });

  it("stop() removes the link", async () => {
    const dev = await device();
    const linkPath = dev.path;
    expect(await exists(linkPath)).toBe(true);
    await dev.stop();
    expect(await exists(linkPath)).toBe(false);
  });
});
