// A child process for the crash matrix and the engine tests that need a second process: builds a real OtaEngine
// (with a real JobRunner on the data directory, and the real AgentSession on the fake Moonraker's socket, or the
// in-memory printer when no socket is given), runs the actions it is told, and prints one JSON line per action.
// MOONFLASH_OTA_CRASH_AT in its environment makes the engine SIGKILL it at that point.
//
//   node --import tsx ota-driver.ts '<json DriverSpec>'

import { pino } from "pino";
import { JobRunner } from "../../../src/core/jobs.js";
import { isMoonflashError } from "../../../src/core/errors.js";
import type { PrinterPort } from "../../../src/core/printer.js";
import { OtaEngine, type DownloadParams } from "../../../src/ota/engine.js";
import type { OtaConfig } from "../../../src/ota/config.js";
import { AgentSession } from "../../../src/moonraker/session.js";
import { fileFirmwarePort, MemoryPrinter } from "./ota-fixture.js";

export interface DriverSpec {
  dataDir: string;
  /** The fake Moonraker's unix socket; null: the in-memory printer. */
  socketPath: string | null;
  config: OtaConfig;
  /** The board directory of fileFirmwarePort. */
  mcuDir: string;
  actions: Array<"download" | "install" | "recover" | "rollback" | "status">;
  download?: DownloadParams;
  maxStateSaves?: number;
  /** The agent name to identify as (default "moonflash"; another when the test's own session holds that name). */
  clientName?: string;
}

export interface DriverLine {
  action: string;
  ok: boolean;
  code?: string;
  message?: string;
  result?: unknown;
}

const spec = JSON.parse(process.argv[2] ?? "{}") as DriverSpec;
const logger = pino({ level: "silent" });
const runner = new JobRunner({ dataDir: spec.dataDir, logger });

let printer: PrinterPort;
let stop: () => Promise<void> = async () => undefined;
if (spec.socketPath) {
  // As test/fixtures/engine/rig.ts's startTestSession does (not imported: it would load the whole fake Moonraker).
  const session = new AgentSession({
    endpoint: { kind: "unix", path: spec.socketPath },
    clientName: spec.clientName ?? "moonflash",
    version: "0.0.0-test",
    url: "https://example.invalid/moonflash",
    methods: [],
    onCall: async () => "ok",
    logger,
    backoff: { initialMs: 50, maxMs: 200 },
  });
  session.start();
  const deadline = Date.now() + 10_000;
  // Connected, services known, and while Klipper is ready its print state too (a crash may have left it stopped).
  const ready = () => {
    const state = session.state();
    return session.identified && Object.keys(state.services).length > 0 && (state.klippyState !== "ready" || state.printState !== null);
  };
  while (!ready()) {
    if (Date.now() > deadline) {
      process.stdout.write(`${JSON.stringify({ action: "connect", ok: false, message: "no Moonraker session" })}\n`);
      process.exit(2);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  printer = session;
  stop = () => session.stop();
} else {
  printer = new MemoryPrinter();
}

const engine = new OtaEngine({
  dataDir: spec.dataDir,
  config: spec.config,
  printer,
  runner,
  logger,
  firmware: fileFirmwarePort(spec.mcuDir),
  serviceTimeoutMs: 10_000,
  pollMs: 20,
  download: { retries: 2, backoffMs: 10, backoffMaxMs: 20, progressIntervalMs: 0, checkpointBytes: 4096, checkpointMs: 10 },
  ...(spec.maxStateSaves ? { maxStateSaves: spec.maxStateSaves } : {}),
});

const say = (line: DriverLine) => process.stdout.write(`${JSON.stringify(line)}\n`);

for (const action of spec.actions) {
  try {
    const result =
      action === "download" ? await engine.download(spec.download!)
      : action === "install" ? await engine.install()
      : action === "recover" ? await engine.recover()
      : action === "rollback" ? await engine.rollback()
      : engine.status();
    say({ action, ok: true, result });
  } catch (err) {
    say({ action, ok: false, code: isMoonflashError(err) ? err.code : "THROWN", message: (err as Error).message });
  }
}
await stop();
process.exit(0);
