// CLI verbs that drive the engines in this process. They take the same job lock as the service, so a CLI flash
// and a service flash can never overlap; Klipper is still stopped and started through Moonraker.

import type { Logger } from "pino";
import { loadConfig, type MoonflashConfig } from "../core/config.js";
import { createLogger } from "../core/log.js";
import { JobRunner, throttleProgress } from "../core/jobs.js";
import { isProcessAlive, readJobLock } from "../core/lock.js";
import { dataPaths } from "../core/paths.js";
import { MoonflashError, toMoonflashError } from "../core/errors.js";
import { initialPrinterState, type PrinterPort } from "../core/printer.js";
import { AgentSession } from "../moonraker/session.js";
import { FlashEngine } from "../flash/engine.js";
import { readJournal } from "../flash/guard.js";
import { endpointFromConfig } from "../agent/agent.js";
import { AGENT_NAME, PROJECT_URL, VERSION } from "../version.js";
import { ProgressRenderer } from "./render.js";

interface Context {
  config: MoonflashConfig;
  logger: Logger;
  runner: JobRunner;
}

async function context(dataDir: string): Promise<Context> {
  const config = await loadConfig(dataDir);
  // The CLI talks to the terminal itself; the log file still gets everything for later.
  const logger = createLogger({ dataDir: config.dataDir, level: config.moonflash.log_level, pretty: false });
  return { config, logger, runner: new JobRunner({ dataDir: config.dataDir, logger }) };
}

/** A short-lived Moonraker session for this CLI run; resolves once identified or rejects after `timeoutMs`. */
async function connectPrinter(ctx: Context, timeoutMs: number): Promise<AgentSession> {
  const session = new AgentSession({
    endpoint: endpointFromConfig(ctx.config),
    clientName: `${AGENT_NAME}-cli-${process.pid}`,
    version: VERSION,
    url: PROJECT_URL,
    methods: [],
    onCall: async () => {
      throw new MoonflashError("INVALID_PARAMS", "the moonflash CLI serves no remote methods");
    },
    logger: ctx.logger.child({ ns: "moonraker" }),
    backoff: { initialMs: 200, maxMs: 1000 },
  });
  session.start();
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(
          new MoonflashError(
            "MOONRAKER_UNAVAILABLE",
            `Could not reach Moonraker at ${describe(ctx.config)} within ${timeoutMs / 1000} s. Is Moonraker running? Check moonraker_socket / moonraker_url in moonflash.conf.`,
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

function describe(config: MoonflashConfig): string {
  return config.moonflash.moonraker_url ?? config.moonflash.moonraker_socket;
}

function fail(err: unknown, json: boolean): number {
  const e = toMoonflashError(err);
  if (json) process.stdout.write(`${JSON.stringify({ ok: false, code: e.code, message: e.message, details: e.details })}\n`);
  else process.stderr.write(`moonflash: ${e.message} [${e.code}]\n`);
  return e.code === "INVALID_PARAMS" || e.code === "CONFIG_INVALID" ? 2 : 1;
}

export async function runStatus(opts: { dataDir: string; json: boolean }): Promise<number> {
  try {
    const ctx = await context(opts.dataDir);
    const lock = await readJobLock(dataPaths(ctx.config.dataDir).lock);
    // A lock whose process is gone is no running job: a job killed with its process, cleared by recovery.
    const running = lock && isProcessAlive(lock.pid) ? lock : null;
    const staleLock = lock && !running ? lock : null;
    const journal = await readJournal(ctx.config.dataDir);
    const klipperRestartPending = journal?.restartPending === true || (journal !== null && !isProcessAlive(journal.pid));
    const status = { running, stale_lock: staleLock, klipper_restart_pending: klipperRestartPending, last: ctx.runner.history(undefined, 10) };
    if (opts.json) {
      process.stdout.write(`${JSON.stringify(status)}\n`);
      return 0;
    }
    if (running) process.stdout.write(`running: ${running.kind} job ${running.jobId} on ${running.target} (pid ${running.pid}, since ${running.startedAt})\n`);
    else process.stdout.write("running: nothing\n");
    if (staleLock) process.stdout.write(`note: job ${staleLock.jobId} of process ${staleLock.pid} did not finish (that process is gone); the service records it as INTERRUPTED\n`);
    if (klipperRestartPending) process.stdout.write(`note: ${journal?.klipperService ?? "klipper"} is still to be started after job ${journal?.jobId}; the moonflash service keeps trying\n`);
    if (!status.last.length) process.stdout.write("no jobs have run yet\n");
    for (const job of status.last) {
      const outcome = job.ok ? "ok" : `FAILED ${job.code}: ${job.message}`;
      process.stdout.write(`${job.finishedAt ?? job.startedAt}  ${job.kind.padEnd(5)} ${job.target.padEnd(16)} ${outcome}\n`);
    }
    return 0;
  } catch (err) {
    return fail(err, opts.json);
  }
}

export async function runDevices(opts: { dataDir: string; json: boolean }): Promise<number> {
  let session: AgentSession | null = null;
  try {
    const ctx = await context(opts.dataDir);
    // Klipper's [mcu] sections come through Moonraker; without it, moonflash.conf's sections still map.
    session = await connectPrinter(ctx, 3000).catch((err: unknown) => {
      if (!opts.json) process.stderr.write(`moonflash: ${toMoonflashError(err).message} Listing without Klipper's config.\n`);
      return null;
    });
    const engine = new FlashEngine({ config: ctx.config, printer: session ?? offlinePrinter(), runner: ctx.runner, logger: ctx.logger.child({ ns: "flash" }) });
    const report = await engine.devices();
    if (opts.json) process.stdout.write(`${JSON.stringify(report)}\n`);
    else {
      if (!report.devices.length) process.stdout.write("no serial devices found\n");
      for (const d of report.devices) {
        const held = d.heldBy ? `  (held by pid ${d.heldBy.pid}${d.heldBy.command ? ` ${d.heldBy.command}` : ""})` : "";
        process.stdout.write(`${d.path.padEnd(16)} ${d.label.padEnd(24)} ${d.mcu ? `[${d.mcu}]` : "-"}  ${d.byId ?? d.byPath ?? ""}${held}\n`);
      }
      for (const c of report.canbus) {
        if (c.error) process.stdout.write(`${c.interface}: ${c.error.message} [${c.error.code}]\n`);
        else if (!c.nodes.length) process.stdout.write(`${c.interface}: no unassigned CAN nodes answered (nodes Klipper holds stay silent)\n`);
        for (const n of c.nodes) process.stdout.write(`${c.interface}:${n.uuid}  ${n.application.padEnd(10)} ${n.mcu ? `[${n.mcu}]` : "-"}\n`);
      }
    }
    return 0;
  } catch (err) {
    return fail(err, opts.json);
  } finally {
    await session?.stop();
  }
}

export async function runFlash(opts: { dataDir: string; mcu: string; firmware?: string; method?: string; dryRun: boolean; json: boolean }): Promise<number> {
  let session: AgentSession | null = null;
  let renderer: ProgressRenderer | null = null;
  try {
    const ctx = await context(opts.dataDir);
    session = await connectPrinter(ctx, 10_000);
    const engine = new FlashEngine({ config: ctx.config, printer: session, runner: ctx.runner, logger: ctx.logger.child({ ns: "flash" }) });
    renderer = new ProgressRenderer({ json: opts.json });
    // A bar or a JSON line per block would be thousands per flash: 10 updates a second read the same.
    ctx.runner.on(throttleProgress(renderer.onJobEvent, { maxPerSecond: 10 }));
    const result = await engine.flash({
      mcu: opts.mcu,
      ...(opts.firmware ? { firmware: opts.firmware } : {}),
      ...(opts.method ? { method: opts.method as never } : {}),
      ...(opts.dryRun ? { dry_run: true } : {}),
    });
    renderer.done(result);
    return 0;
  } catch (err) {
    renderer?.stop();
    return fail(err, opts.json);
  } finally {
    await session?.stop();
  }
}

/** Stand-in port for listing devices while Moonraker is unreachable: no Klipper, nothing to stop. */
function offlinePrinter(): PrinterPort {
  const unavailable = (): Promise<never> => Promise.reject(new MoonflashError("MOONRAKER_UNAVAILABLE", "Moonraker is not reachable."));
  const state = initialPrinterState();
  return {
    state: () => state,
    isPrinting: () => false,
    onStateChange: () => () => undefined,
    stopService: unavailable,
    startService: unavailable,
    gcode: unavailable,
    sendEvent: unavailable,
    mcuReport: async () => ({ hostVersion: null, mcus: [] }),
    serialPeripherals: async () => [],
    canbusNodes: async () => [],
  };
}
