// The composition root: `serve` and every CLI verb build their runtime here, and only here. Config, logger,
// job runner, the Moonraker endpoint and session, the engines; and how errors become exit codes. Everything
// else receives what it needs (ports and engines) and builds nothing of its own.

import type { Logger } from "pino";
import { loadConfig, type MoonflashConfig } from "./moonflash-conf.js";
import { MoonflashError, toMoonflashError } from "./core/errors.js";
import { JobRunner } from "./core/jobs.js";
import { createLogger } from "./core/log.js";
import type { PrinterPort } from "./core/printer.js";
import { FlashEngine } from "./flash/engine.js";
import { FirmwareBuilder } from "./flash/build/builder.js";
import { McuUpdater } from "./flash/update-all.js";
import { AgentSession, type AgentSessionOptions } from "./moonraker/session.js";
import { describeEndpoint, type MoonrakerEndpoint } from "./moonraker/transport.js";
import { Agent } from "./agent/agent.js";
import { AGENT_NAME, PROJECT_URL, VERSION } from "./version.js";

export interface RuntimeOptions {
  dataDir: string;
  configFile?: string;
  /** Pretty log lines on stdout as well as the log file (the service on a terminal). */
  pretty?: boolean;
  /** A logger to use instead of the configured one (tests). */
  logger?: Logger;
}

/** What every moonflash process has: its configuration, logger, job runner, and where Moonraker is. */
export interface Runtime {
  config: MoonflashConfig;
  logger: Logger;
  runner: JobRunner;
  endpoint: MoonrakerEndpoint;
  /** The endpoint for people: "unix:/home/pi/printer_data/comms/moonraker.sock" or the websocket URL. */
  endpointName: string;
}

export async function createRuntime(opts: RuntimeOptions): Promise<Runtime> {
  const config = await loadConfig(opts.dataDir, opts.configFile);
  const logger = opts.logger ?? createLogger({ dataDir: config.dataDir, level: config.moonflash.log_level, pretty: opts.pretty ?? false });
  const m = config.moonflash;
  const endpoint: MoonrakerEndpoint = m.moonraker_url
    ? { kind: "ws", url: m.moonraker_url, ...(m.api_key ? { apiKey: m.api_key } : {}) }
    : { kind: "unix", path: m.moonraker_socket };
  return { config, logger, runner: new JobRunner({ dataDir: config.dataDir, logger }), endpoint, endpointName: describeEndpoint(endpoint) };
}

type SessionRole = Pick<AgentSessionOptions, "clientName" | "methods" | "onCall" | "backoff">;

export function createSession(rt: Runtime, role: SessionRole): AgentSession {
  return new AgentSession({ ...role, endpoint: rt.endpoint, version: VERSION, url: PROJECT_URL, logger: rt.logger.child({ ns: "moonraker" }) });
}

export function createFlashEngine(rt: Runtime, printer: PrinterPort): FlashEngine {
  return new FlashEngine({ config: rt.config, printer, runner: rt.runner, logger: rt.logger.child({ ns: "flash" }) });
}

/** Builds firmware per MCU from its profile; needs no printer: a build never stops Klipper. */
export function createFirmwareBuilder(rt: Runtime): FirmwareBuilder {
  return new FirmwareBuilder({ settings: rt.config, runner: rt.runner, logger: rt.logger.child({ ns: "build" }) });
}

/** Update-all over an engine, a builder and the printer they share. */
export function createMcuUpdater(rt: Runtime, engine: FlashEngine, builder: FirmwareBuilder, printer: PrinterPort): McuUpdater {
  return new McuUpdater({ engine, builder, printer, runner: rt.runner, readyTimeoutMs: rt.config.moonflash.service_timeout * 1000 });
}

/** The service: the agent with its session and engines. */
export async function createAgent(opts: RuntimeOptions): Promise<Agent> {
  const rt = await createRuntime(opts);
  const builder = createFirmwareBuilder(rt);
  return new Agent(rt, {
    session: (methods, onCall) => createSession(rt, { clientName: AGENT_NAME, methods, onCall }),
    flash: (printer) => createFlashEngine(rt, printer),
    build: () => builder,
    update: (engine, printer) => createMcuUpdater(rt, engine, builder, printer),
  });
}

/** A short-lived session for one CLI run (no remote methods); resolves once identified, else MOONRAKER_UNAVAILABLE. */
export async function connectPrinter(rt: Runtime, timeoutMs: number): Promise<AgentSession> {
  const session = createSession(rt, {
    clientName: `${AGENT_NAME}-cli-${process.pid}`,
    methods: [],
    onCall: async () => {
      throw new MoonflashError("INVALID_PARAMS", "the moonflash CLI serves no remote methods");
    },
    backoff: { initialMs: 200, maxMs: 1000 },
  });
  session.start();
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(
          new MoonflashError(
            "MOONRAKER_UNAVAILABLE",
            `Could not reach Moonraker at ${rt.endpointName} within ${timeoutMs / 1000} s. Is Moonraker running? Check moonraker_socket / moonraker_url in moonflash.conf.`,
          ),
        );
      }, timeoutMs);
      session.on("identified", () => {
        clearTimeout(timer);
        resolve();
      });
    });
  } catch (err) {
    await session.stop();
    throw err;
  }
  return session;
}

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/** The one mapping of errors to exit codes: 2 for what the user typed or configured, 1 for everything else. */
export function exitCodeFor(err: unknown): number {
  const code = toMoonflashError(err).code;
  return code === "INVALID_PARAMS" || code === "CONFIG_INVALID" ? EXIT_USAGE : EXIT_FAILURE;
}
