// GarbagePacer: one collection per `everyBytes` streamed (a major one per `majorEveryBytes`), none without a gc function (no --expose-gc).

import { describe, expect, it } from "vitest";
import { GarbagePacer } from "../../src/core/gc-pacer.js";

describe("GarbagePacer", () => {
  it("asks for a minor collection once every everyBytes, whatever the chunk sizes", () => {
    const calls: unknown[] = [];
    const pacer = new GarbagePacer(1000, (options) => void calls.push(options));
    for (let i = 0; i < 25; i++) pacer.add(100);
    expect(calls).toEqual([{ type: "minor" }, { type: "minor" }]);
    pacer.add(5000);
    expect(calls).toHaveLength(3);
  });

  it("makes every collection that completes majorEveryBytes a major one", () => {
    const calls: unknown[] = [];
    const pacer = new GarbagePacer(1000, (options) => void calls.push(options), 3000);
    for (let i = 0; i < 7; i++) pacer.add(1000);
    expect(calls).toEqual([{ type: "minor" }, { type: "minor" }, { type: "major" }, { type: "minor" }, { type: "minor" }, { type: "major" }, { type: "minor" }]);
  });

  it("does nothing when node runs without --expose-gc", () => {
    const pacer = new GarbagePacer(1, undefined);
    expect(() => pacer.add(10)).not.toThrow();
  });

  it("collects in a real node started with --expose-gc, as the service is", async () => {
    const { execa } = await import("execa");
    const script = `globalThis.gc = ((gc) => (o) => { process.stdout.write(JSON.stringify(o)); gc(o); })(globalThis.gc);` +
      `const { GarbagePacer } = await import(${JSON.stringify(new URL("../../src/core/gc-pacer.ts", import.meta.url).href)});` +
      `new GarbagePacer(10).add(10);`;
    const run = await execa("node", ["--expose-gc", "--import", "tsx", "--input-type=module", "-e", script], { reject: false, timeout: 30_000 });
    expect(run.stdout, run.stderr).toBe('{"type":"minor"}');
  });
});
