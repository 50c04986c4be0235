// CLI verbs that drive the engines in this process. They take the same job lock as the service, so a CLI flash
// and a service flash can never overlap; Klipper is still stopped and started through Moonraker.

import { isProcessAlive, readJobLock } from "../core/lock.js";
import { dataPaths } from "../core/paths.js";
import { MoonflashError, toMoonflashError } from "../core/errors.js";
import { initialPrinterState, type PrinterPort } from "../core/printer.js";
import type { AgentSession } from "../moonraker/session.js";
import { readJournal } from "../flash/guard.js";
import { connectPrinter, createFlashEngine, createRuntime, REPORT_DRAIN_MS, type Runtime } from "../app.js";
import type { FlashEngine } from "../flash/engine.js";
import { ProgressRenderer, reportFailure } from "./render.js";

export async function runStatus(opts: { dataDir: string; json: boolean }): Promise<number> {
  try {
    const ctx = await createRuntime({ dataDir: opts.dataDir, pretty: false });
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
    return reportFailure(err, opts.json);
  }
}

export async function runDevices(opts: { dataDir: string; json: boolean }): Promise<number> {
  let session: AgentSession | null = null;
  try {
    const ctx = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    // Klipper's [mcu] sections come through Moonraker; without it, moonflash.conf's sections still map.
    session = await connectPrinter(ctx, 3000).catch((err: unknown) => {
      if (!opts.json) process.stderr.write(`moonflash: ${toMoonflashError(err).message} Listing without Klipper's config.\n`);
      return null;
    });
    const engine = createFlashEngine(ctx, session ?? offlinePrinter());
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
    return reportFailure(err, opts.json);
  } finally {
    await session?.stop();
  }
}

/**
 * A verb that runs a job on the printer: its runtime, a Moonraker session, the flash engine, progress on the
 * terminal, the failure reported, and the session closed in every outcome.
 */
export async function runPrinterJob(
  opts: { dataDir: string; json: boolean },
  work: (ctx: Runtime, engine: FlashEngine, printer: AgentSession, renderer: ProgressRenderer) => Promise<void>,
): Promise<number> {
  let session: AgentSession | null = null;
  let renderer: ProgressRenderer | null = null;
  let ctx: Runtime | null = null;
  try {
    ctx = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    session = await connectPrinter(ctx, 10_000);
    renderer = new ProgressRenderer({ json: opts.json });
    ctx.runner.on(renderer.onJobEvent);
    await work(ctx, createFlashEngine(ctx, session), session, renderer);
    return 0;
  } catch (err) {
    renderer?.stop();
    return reportFailure(err, opts.json);
  } finally {
    await Promise.all((ctx?.drains ?? []).map((drain) => drain(REPORT_DRAIN_MS)));
    await session?.stop();
  }
}

export function runFlash(opts: { dataDir: string; mcu: string; firmware?: string; method?: string; dryRun: boolean; json: boolean }): Promise<number> {
  return runPrinterJob(opts, async (_ctx, engine, _printer, renderer) => {
    const result = await engine.flash({
      mcu: opts.mcu,
      ...(opts.firmware ? { firmware: opts.firmware } : {}),
      ...(opts.method ? { method: opts.method as never } : {}),
      ...(opts.dryRun ? { dry_run: true } : {}),
    });
    renderer.done(result);
  });
}

/** `moonflash check`: each MCU's version against Klipper's; without Moonraker, the Klipper tree's and the store's. */
export async function runCheck(opts: { dataDir: string; json: boolean }): Promise<number> {
  let session: AgentSession | null = null;
  try {
    const ctx = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    session = await connectPrinter(ctx, 3000).catch((err: unknown) => {
      if (!opts.json) process.stderr.write(`moonflash: ${toMoonflashError(err).message} Checking without Klipper.\n`);
      return null;
    });
    const check = await createFlashEngine(ctx, session ?? offlinePrinter()).checkVersions();
    if (opts.json) {
      process.stdout.write(`${JSON.stringify(check)}\n`);
      return 0;
    }
    const host = check.host.version ?? "unknown";
    const nameWidth = Math.max(8, ...check.mcus.map((m) => m.name.length));
    const versionWidth = Math.max(host.length, ...check.mcus.map((m) => (m.version ?? "?").length));
    process.stdout.write(`${"klipper".padEnd(nameWidth)}  ${host.padEnd(versionWidth)}  (${check.host.source}; Klipper is ${check.klipper_state})${check.host.detail ? `: ${check.host.detail}` : ""}\n`);
    for (const m of check.mcus) {
      const verdict = m.outdated === null ? "unknown" : m.outdated ? "OUTDATED" : "ok";
      const rollback = m.rollback ? `; rollback: ${m.rollback.version ?? "an image without a version"}` : "";
      process.stdout.write(`${m.name.padEnd(nameWidth)}  ${(m.version ?? "?").padEnd(versionWidth)}  ${verdict.padEnd(8)}  ${m.reason}${rollback}\n`);
    }
    return 0;
  } catch (err) {
    return reportFailure(err, opts.json);
  } finally {
    await session?.stop();
  }
}

/** `moonflash rollback <mcu>`: the previous image through the same flash job, lock and guard as `moonflash flash`. */
export function runRollback(opts: { dataDir: string; mcu: string; dryRun: boolean; json: boolean }): Promise<number> {
  return runPrinterJob(opts, async (_ctx, engine, _printer, renderer) => {
    renderer.done(await engine.rollback({ mcu: opts.mcu, ...(opts.dryRun ? { dry_run: true } : {}) }));
  });
}

/** Stand-in port for listing devices or checking versions while Moonraker is unreachable: no Klipper, nothing to stop. */
export function offlinePrinter(): PrinterPort {
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
