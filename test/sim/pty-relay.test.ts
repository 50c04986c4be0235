import { once } from "node:events";
import { lstat, mkdtemp, readlink, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { execa } from "execa";
import { SerialPort } from "serialport";
import { afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { isMoonflashError } from "../../src/core/errors.js";
import { openPtyRelay, type PtyRelay } from "../../src/sim/pty-relay.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

let dir: string;
let python: string;
const relays: PtyRelay[] = [];

beforeAll(async () => {
  // The real interpreter behind python3, so a version-manager shim does not slow every start.
  python = (await execa("python3", ["-c", "import sys; print(sys.executable)"], { timeout: 10_000 })).stdout.trim();
});

beforeEach(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "moonflash-pty-"));
});

afterEach(async () => {
  await Promise.all(relays.splice(0).map((relay) => relay.close()));
  await rm(dir, { recursive: true, force: true });
});

async function relayAt(name: string): Promise<PtyRelay> {
  const relay = await openPtyRelay(path.join(dir, name), { python, readyTimeoutMs: 5000 });
  relays.push(relay);
  return relay;
}

async function openHost(linkPath: string, baudRate = 250000): Promise<SerialPort> {
  const port = new SerialPort({ path: linkPath, baudRate, autoOpen: false });
  await new Promise<void>((resolve, reject) => port.open((err) => (err ? reject(err) : resolve())));
  return port;
}

const closeHost = (port: SerialPort): Promise<void> =>
  new Promise((resolve, reject) => port.close((err) => (err ? reject(err) : resolve())));

/** Collects bytes from an emitter until `expected` bytes arrived. */
function readBytes(emitter: NodeJS.EventEmitter, expected: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const onData = (chunk: Buffer): void => {
      chunks.push(chunk);
      if (Buffer.concat(chunks).length >= expected) {
        emitter.off("data", onData);
        resolve(Buffer.concat(chunks));
      }
    };
    emitter.on("data", onData);
  });
}

const exists = (p: string): Promise<boolean> => lstat(p).then(
  () => true,
  () => false,
);

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function until(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe("openPtyRelay", () => {
  it("links the pty slave at the requested path", async () => {
    const relay = await relayAt("ttyV0");
    expect(relay.linkPath).toBe(path.join(dir, "ttyV0"));
    expect(relay.slavePath).toMatch(/^\/dev\/pts\/\d+$/);
    expect(await readlink(relay.linkPath)).toBe(relay.slavePath);
    expect(relay.hostOpen).toBe(false);
    expect(relay.baud).toBeGreaterThan(0);
  });

  it("relays bytes both ways and reports open/baud/close, across several opens (EIO means idle)", async () => {
    const relay = await relayAt("ttyV0");
    const events: string[] = [];
    relay.on("open", () => events.push("open"));
    relay.on("close", () => events.push("close"));
    relay.on("baud", (baud) => events.push(`baud ${baud}`));
    for (let round = 0; round < 3; round++) {
      const opened = once(relay, "open");
      const host = await openHost(relay.linkPath);
      await opened;
      const fromHost = readBytes(relay, 5);
      host.write(Buffer.from(`ping${round}`));
      expect((await fromHost).toString()).toBe(`ping${round}`);
      const toHost = readBytes(host, 5);
      relay.write(Buffer.from(`pong${round}`));
      expect((await toHost).toString()).toBe(`pong${round}`);
      const closed = once(relay, "close");
      await closeHost(host);
      await closed;
      expect(relay.hostOpen).toBe(false);
    }
    expect(events.filter((e) => e === "open")).toHaveLength(3);
    expect(events.filter((e) => e === "close")).toHaveLength(3);
    expect(events).toContain("baud 250000");
  });

  it("drops bytes written while nobody has the port open", async () => {
    const relay = await relayAt("ttyV0");
    relay.write(Buffer.from("stale"));
    await new Promise((resolve) => setTimeout(resolve, 100));
    const opened = once(relay, "open");
    const host = await openHost(relay.linkPath);
    await opened;
    const fromHost = readBytes(relay, 2);
    host.write(Buffer.from("hi"));
    await fromHost;
    const toHost = readBytes(host, 5);
    relay.write(Buffer.from("fresh"));
    expect((await toHost).toString()).toBe("fresh");
    await closeHost(host);
  });

  it("reports a 1200-baud change before the close that follows it", async () => {
    const relay = await relayAt("ttyV0");
    const events: string[] = [];
    relay.on("baud", (baud) => events.push(`baud ${baud}`));
    relay.on("close", () => events.push("close"));
    const host = await openHost(relay.linkPath, 115200);
    await new Promise<void>((resolve, reject) => host.update({ baudRate: 1200 }, (err) => (err ? reject(err) : resolve())));
    const closed = once(relay, "close");
    await closeHost(host);
    await closed;
    expect(events.slice(-2)).toEqual(["baud 1200", "close"]);
  });

  it("replaces a stale link", async () => {
    const linkPath = path.join(dir, "ttyV0");
    await symlink("/dev/pts/does-not-exist", linkPath);
    const relay = await relayAt("ttyV0");
    expect(await readlink(linkPath)).toBe(relay.slavePath);
  });

  it("refuses to replace a file that is not a symlink", async () => {
    const filePath = path.join(dir, "ttyV0");
    await writeFile(filePath, "keep me");
    const err = await openPtyRelay(filePath, { python }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("PATH_REJECTED");
    expect((await lstat(filePath)).isFile()).toBe(true);
  });

  it("fails clearly when the link's folder does not exist", async () => {
    const err = await openPtyRelay(path.join(dir, "missing", "ttyV0"), { python }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("INTERNAL");
    expect((err as Error).message).toMatch(/Check that its folder exists/);
  });

  it("reports a missing interpreter as TOOL_NOT_FOUND", async () => {
    const err = await openPtyRelay(path.join(dir, "ttyV0"), { python: path.join(dir, "no-python") }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("TOOL_NOT_FOUND");
  });

  it("close() ends the helper and removes the link", async () => {
    const relay = await openPtyRelay(path.join(dir, "ttyV0"), { python });
    const exited = once(relay, "exit");
    await relay.close();
    expect(await exited).toEqual([0]);
    expect(processAlive(relay.pid)).toBe(false);
    expect(await exists(relay.linkPath)).toBe(false);
  });

  it("the helper exits and removes the link when its parent process dies", async () => {
    const script = path.join(dir, "parent.mts");
    const linkPath = path.join(dir, "ttyParent");
    await writeFile(
      script,
      `import { openPtyRelay } from ${JSON.stringify(path.join(REPO, "src/sim/pty-relay.ts"))};\n` +
        `const relay = await openPtyRelay(${JSON.stringify(linkPath)}, { python: ${JSON.stringify(python)} });\n` +
        `process.stdout.write(relay.pid + "\\n");\n` +
        `setInterval(() => {}, 1000);\n`,
    );
    const parent = execa(process.execPath, ["--import", "tsx", script], { cwd: REPO, timeout: 20_000, reject: false });
    const helperPid = Number((await once(parent.stdout, "data"))[0].toString().trim());
    expect(processAlive(helperPid)).toBe(true);
    expect(await exists(linkPath)).toBe(true);
    parent.kill("SIGKILL");
    await parent;
    await until(() => !processAlive(helperPid), "the helper to exit");
    await until(async () => !(await exists(linkPath)), "the link to be removed");
  });
});

describe("openPtyRelay with a baud rate (the emulated UART)", () => {
  it("holds an answer until the request has crossed the line, then sends it at the line's pace", async () => {
    // 25000 baud = 2500 bytes/s: 250 bytes take 100 ms each way, so the answer cannot be complete before 200 ms.
    const relay = await openPtyRelay(path.join(dir, "ttyV9"), { python, baud: 25000 });
    relays.push(relay);
    const host = await openHost(relay.linkPath);
    const request = Buffer.alloc(250, 0x11);
    const answer = Buffer.from(Array.from({ length: 250 }, (_, i) => i & 0xff));
    const atDevice = readBytes(relay, request.length);
    const atHost = readBytes(host, answer.length);
    const sent = performance.now();
    host.write(request);
    // The device side sees the bytes as they come out of the pty and answers at once; the relay does the waiting.
    expect(await atDevice).toEqual(request);
    relay.write(answer);
    expect(await atHost).toEqual(answer);
    expect(performance.now() - sent).toBeGreaterThanOrEqual(200);
    await closeHost(host);
  });

  it("drops an answer that does not fit beside the unsent rest of the device's transmit buffer", async () => {
    const relay = await openPtyRelay(path.join(dir, "ttyV7"), { python, baud: 25000, transmitBuffer: 96 });
    relays.push(relay);
    const host = await openHost(relay.linkPath);
    const first = Buffer.alloc(80, 0xa1);
    const second = Buffer.alloc(80, 0xb2);
    const third = Buffer.alloc(80, 0xc3);
    let answers = 0;
    relay.on("data", () => {
      answers += 1;
      // Two answers at once: 80 + 80 bytes do not fit in 96, so the second one is lost, as the firmware loses it.
      if (answers === 1) {
        relay.write(first);
        relay.write(second);
      } else {
        relay.write(third);
      }
    });
    const atHost = readBytes(host, 160);
    host.write(Buffer.from([1]));
    await new Promise((resolve) => setTimeout(resolve, 80 / 2.5 + 150));
    // The first answer has left the buffer: the next one fits again.
    host.write(Buffer.from([2]));
    expect(await atHost).toEqual(Buffer.concat([first, third]));
    await closeHost(host);
  });

  it("rejects a baud rate that is not positive", async () => {
    const err = await openPtyRelay(path.join(dir, "ttyV8"), { python, baud: 0 }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("INVALID_PARAMS");
    expect(await exists(path.join(dir, "ttyV8"))).toBe(false);
  });
});
