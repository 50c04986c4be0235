// Shared setup of the tests that run a fake external tool (flashtool.py, make, wchisp) as a real child process:
// a temp dir with the firmware image, the env vars that pick the fake's scenario and where it records its
// arguments, and a FlashJobTarget builder with the common defaults.

import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, afterEach, beforeAll } from "vitest";
import { readFileSync } from "node:fs";
import type { FlashJobTarget } from "../../../src/flash/types.js";

export interface ToolFixtureOptions {
  /** The temp dir is moonflash-<name>-XXXXXX. */
  name: string;
  /** The firmware image written into the temp dir. */
  firmware: { file: string; bytes: Buffer };
  /** The env vars the fake reads: its scenario, and the file it records its arguments into. */
  env: { mode: string; record: string };
  /** Name of that record file in the temp dir. */
  recordFile?: string;
  /** More setup in the temp dir (device stand-ins, config files), after the firmware is written. */
  setup?: (dir: string) => Promise<void>;
  /** This tool's target fields on top of the common defaults; called per target, after setup. */
  target?: () => Partial<FlashJobTarget>;
}

export interface ToolFixture {
  /** The temp dir; set in beforeAll, removed in afterAll. */
  readonly dir: string;
  readonly firmware: string;
  /** Where the fake records its arguments; removed after each test. */
  readonly recordFile: string;
  /** Picks the fake's scenario for this test and tells it where to record. */
  useMode(mode: string): void;
  /** The recorded lines. */
  recordedLines(): Promise<string[]>;
  target(overrides?: Partial<FlashJobTarget>): FlashJobTarget;
}

/** Registers the beforeAll/afterEach/afterAll hooks of the file it is called in. */
export function useToolFixture(options: ToolFixtureOptions): ToolFixture {
  let dir = "";
  const fixture: ToolFixture = {
    get dir() {
      return dir;
    },
    get firmware() {
      return path.join(dir, options.firmware.file);
    },
    get recordFile() {
      return path.join(dir, options.recordFile ?? "args.txt");
    },
    useMode(mode) {
      process.env[options.env.mode] = mode;
      process.env[options.env.record] = fixture.recordFile;
    },
    async recordedLines() {
      return (await readFile(fixture.recordFile, "utf8")).trim().split("\n");
    },
    target(overrides = {}) {
      return {
        mcu: "mcu",
        canbusInterface: "can0",
        baud: 250000,
        firmwarePath: fixture.firmware,
        // What the engine hands a method: the image it read and checked once.
        image: readFileSync(fixture.firmware),
        bootloader: "auto",
        klipperPath: "/nonexistent",
        wchispTransport: "usb",
        timeoutMs: 15_000,
        ...options.target?.(),
        ...overrides,
      };
    },
  };

  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), `moonflash-${options.name}-`));
    await writeFile(fixture.firmware, options.firmware.bytes);
    await options.setup?.(dir);
  });

  afterEach(async () => {
    delete process.env[options.env.mode];
    delete process.env[options.env.record];
    await rm(fixture.recordFile, { force: true });
  });

  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  return fixture;
}
