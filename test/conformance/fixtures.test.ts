// Replays every scenario recorded from a real Klipper + Moonraker (test/fixtures/moonraker/*.jsonl, written by
// `npm run record:moonraker`, scripts/record-moonraker.ts) against the fake, configured like the recording rig, and
// checks that the fake sends what Moonraker sent.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { connectTestClient, startFakeMoonraker, type FakeMoonraker, type TestClient } from "../support/fake-moonraker/index.js";
import { compareMessages, fixtureFiles, isProcStat, loadScenario, rigFakeOptions, type Message, type RecordedLine } from "./recorded-traffic.js";

async function waitUntil(pred: () => boolean, timeoutMs: number, describeFailure: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(describeFailure());
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

const settle = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

class ScenarioReplay {
  private readonly clients = new Map<string, TestClient>();
  private readonly expected = new Map<string, Message[]>();
  private readonly due = new Map<string, number>();
  private readonly verified = new Map<string, number>();
  private readonly closeExpected = new Set<string>();
  /** Recorded id of a server-made request → the id the fake used, so recorded agent replies can be re-addressed. */
  private readonly requestIds = new Map<unknown, unknown>();

  constructor(
    private readonly lines: RecordedLine[],
    private readonly fake: FakeMoonraker,
  ) {
    for (const line of lines) {
      if (!this.expected.has(line.conn)) this.expected.set(line.conn, []);
      if (line.dir === "recv" && line.msg._closed === true) this.closeExpected.add(line.conn);
      else if (line.dir === "recv") this.expected.get(line.conn)?.push(line.msg);
    }
  }

  async run(): Promise<void> {
    const opensAt = this.openingPoints();
    for (const [index, line] of this.lines.entries()) {
      for (const conn of opensAt.get(index) ?? []) await this.open(conn);
      if (line.dir === "recv") {
        if (line.msg._closed !== true) this.due.set(line.conn, (this.due.get(line.conn) ?? 0) + 1);
        continue;
      }
      // Everything recorded before this send must have arrived first (per connection, in order).
      for (const conn of this.clients.keys()) await this.awaitMessages(conn, this.due.get(conn) ?? 0, `before line ${index + 1}`);
      if (line.msg._close === true) await this.closeConnection(line.conn);
      else this.client(line.conn).sendRaw(this.readdress(line.msg));
    }
    for (const conn of this.clients.keys()) {
      await this.awaitMessages(conn, this.expectedFor(conn).length, "at the end");
    }
    await settle(50);
    for (const conn of this.clients.keys()) {
      this.assertNoExtra(conn);
      expect(this.client(conn).isClosed, `${conn} closed`).toBe(this.closeExpected.has(conn));
    }
  }

  /**
   * Where each connection opens, since it must miss what was broadcast before it existed: at its first send,
   * or, when it first receives, at the send that caused that (e.g. a notify_agent_event for another agent).
   */
  private openingPoints(): Map<number, string[]> {
    const points = new Map<number, string[]>();
    const opened = new Set<string>();
    let lastSend = 0;
    for (const [index, line] of this.lines.entries()) {
      if (!opened.has(line.conn)) {
        opened.add(line.conn);
        const at = line.dir === "send" ? index : lastSend;
        points.set(at, [...(points.get(at) ?? []), line.conn]);
      }
      if (line.dir === "send") lastSend = index;
    }
    return points;
  }

  // The browser-like client uses the websocket, agents the unix socket: both transports see the same scenario.
  private async open(conn: string): Promise<void> {
    const client = await connectTestClient(conn === "web" ? { wsUrl: this.fake.wsUrl } : { socketPath: this.fake.socketPath });
    this.clients.set(conn, client);
    this.due.set(conn, 0);
    this.verified.set(conn, 0);
  }

  async closeAll(): Promise<void> {
    await Promise.all([...this.clients.values()].map((c) => c.close()));
  }

  // A recorded close may come just before a notification caused by someone else's close arrives (recorder timing);
  // the replay waits for every message recorded for this connection, then checks nothing more came.
  private async closeConnection(conn: string): Promise<void> {
    await this.awaitMessages(conn, this.expectedFor(conn).length, "before closing");
    await settle(30);
    this.assertNoExtra(conn);
    await this.client(conn).close();
  }

  private async awaitMessages(conn: string, count: number, when: string): Promise<void> {
    const received = (): unknown[] => this.client(conn).received.filter((m) => !isProcStat(m));
    await waitUntil(
      () => received().length >= count,
      3000,
      () =>
        `${conn}: expected ${count} messages ${when}, got ${received().length}:\n` +
        `expected: ${JSON.stringify(this.expectedFor(conn).slice(0, count), null, 1)}\n` +
        `received: ${JSON.stringify(received(), null, 1)}`,
    );
    const actual = received();
    for (let i = this.verified.get(conn) ?? 0; i < count; i++) {
      const exp = this.expectedFor(conn)[i] as Message;
      const problems = compareMessages(exp, actual[i]);
      if (problems.length > 0) {
        throw new Error(
          `${conn} message ${i + 1} differs from the recording:\n  ${problems.join("\n  ")}\n` +
            `expected: ${JSON.stringify(exp)}\nreceived: ${JSON.stringify(actual[i])}`,
        );
      }
      if (typeof exp.method === "string" && exp.id !== undefined) this.requestIds.set(exp.id, (actual[i] as Message).id);
    }
    this.verified.set(conn, Math.max(this.verified.get(conn) ?? 0, count));
  }

  private assertNoExtra(conn: string): void {
    const received = this.client(conn).received.filter((m) => !isProcStat(m));
    const expected = this.expectedFor(conn);
    if (received.length > expected.length) {
      throw new Error(`${conn}: unexpected extra messages: ${JSON.stringify(received.slice(expected.length))}`);
    }
  }

  private readdress(msg: Message): Message {
    const isReply = !("method" in msg) && ("result" in msg || "error" in msg);
    return isReply && this.requestIds.has(msg.id) ? { ...msg, id: this.requestIds.get(msg.id) } : msg;
  }

  private client(conn: string): TestClient {
    const client = this.clients.get(conn);
    if (client === undefined) throw new Error(`no connection ${conn}`);
    return client;
  }

  private expectedFor(conn: string): Message[] {
    return this.expected.get(conn) ?? [];
  }
}

describe("fake Moonraker replays the recorded Moonraker traffic", () => {
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });

  it("finds the recorded scenarios", () => {
    expect(fixtureFiles.length).toBeGreaterThanOrEqual(7);
  });

  for (const file of fixtureFiles) {
    it(file, async () => {
      const dataDir = await fs.promises.mkdtemp(path.join(os.tmpdir(), "moonflash-conformance-"));
      cleanups.push(() => fs.promises.rm(dataDir, { recursive: true, force: true }));
      const fake = await startFakeMoonraker(rigFakeOptions(dataDir));
      cleanups.push(() => fake.stop());
      const replay = new ScenarioReplay(loadScenario(file), fake);
      cleanups.push(() => replay.closeAll());
      await replay.run();
    });
  }
});
