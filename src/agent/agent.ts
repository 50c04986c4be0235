// The agent: wires engines to remote methods and job events to the progress adapters (console, agent events),
// and keeps Klipper's promise after an interrupted job. It is built by the composition root (src/app.ts);
// engines never see the transport.

import { existsSync, statSync } from "node:fs";
import type { Logger } from "pino";
import { configSummary, type MoonflashConfig } from "../moonflash-conf.js";
import type { JobRunner } from "../core/jobs.js";
import type { PrinterPort } from "../core/printer.js";
import { isMoonflashError, MoonflashError, toMoonflashError } from "../core/errors.js";
import { dataPaths } from "../core/paths.js";
import type { AgentSession, AgentSessionOptions } from "../moonraker/session.js";
import type { FlashEngine } from "../flash/engine.js";
import type { FirmwareBuilder } from "../flash/build/builder.js";
import type { McuUpdater } from "../flash/update-all.js";
import type { OtaEngine } from "../ota/engine.js";
import type { OtaHttpApi } from "../ota/http-api.js";
import { otaPaths } from "../ota/paths.js";
import { readJournal, recoverInterruptedJob } from "../flash/guard.js";
import { buildMethodTable, macroDialect, type RemoteMethod } from "./methods.js";
import { parseParams } from "./params.js";
import { ConsoleReporter, agentEventAdapter } from "./progress.js";
import { StatusWebcam, statusPageUrl } from "./status-webcam.js";
import { listenForPage, type StatusListener } from "../status/listener.js";
import { VERSION, AGENT_NAME } from "../version.js";

/** Whether <data>/moonflash/ota exists; anything but "it does not" (e.g. EACCES) counts as yes: the engine then says what is wrong. */
function otaDirExists(dataDir: string): boolean {
  try {
    statSync(otaPaths(dataDir).root);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== "ENOENT";
  }
}

/** How long a call that arrives during the Moonraker handshake waits for the state to be read. */
const HANDSHAKE_WAIT_MS = 5_000;

/** How often a journal left by a job that could not start Klipper (or by a dead CLI flash) is looked for. */
const RECOVERY_CHECK_MS = 10_000;

/** What every moonflash process has (the composition root, src/app.ts, builds it). */
export interface AgentRuntime {
  config: MoonflashConfig;
  logger: Logger;
  runner: JobRunner;
  endpointName: string;
  /** Reports outside the process to let finish when the agent stops ([ota] callback_url). */
  drains?: Array<(timeoutMs: number) => Promise<void>>;
}

/** How long a stopping agent waits for reports still queued. */
const REPORT_DRAIN_MS = 5000;

/** What the composition root gives the agent to build its session and engines with. */
export interface AgentParts {
  session(methods: string[], onCall: AgentSessionOptions["onCall"]): AgentSession;
  flash(printer: PrinterPort): FlashEngine;
  /** The firmware builder (flash.build); it needs no printer. */
  build?(): FirmwareBuilder;
  /** Update-all (flash.update_all), over the agent's engine and printer. */
  update?(engine: FlashEngine, printer: PrinterPort): McuUpdater;
  /** The OTA engine (ota.*), flashing firmware modules through the agent's flash engine; its code loads with it. */
  ota?(printer: PrinterPort, flash: FlashEngine): Promise<OtaEngine>;
}

export class Agent {
  readonly runner: JobRunner;
  readonly session: AgentSession;
  readonly flash: FlashEngine;
  readonly methods: RemoteMethod[];
  private readonly console: ConsoleReporter;
  private readonly unsubscribers: Array<() => void> = [];
  private readonly startedAt = Date.now();
  private recovering = false;
  /** OTA recovery has run in this process (it is only for what an earlier process left). */
  private readonly drains: Array<(timeoutMs: number) => Promise<void>>;
  private otaRecovered = false;
  private readonly createOta: (() => Promise<OtaEngine>) | null;
  /** The OTA engine once asked for: on the first ota.* call, or at start when an earlier process left OTA files. */
  private otaLoaded: Promise<OtaEngine> | null = null;
  private otaRecovering = false;
  private recoveryTimer: NodeJS.Timeout | null = null;
  /** The vendor HTTP API ([ota] http_port), once listening; null when off or it could not listen. */
  private otaHttp: Promise<OtaHttpApi | null> = Promise.resolve(null);
  /** The live status page ([status_page]), once listening; null when off or it could not listen. */
  private statusPage: Promise<StatusListener | null> = Promise.resolve(null);
  /** Where browsers open the status page; null until it listens. */
  private statusUrl: string | null = null;
  private statusWebcam: StatusWebcam | null = null;

  readonly config: MoonflashConfig;
  readonly logger: Logger;
  private readonly endpointName: string;

  constructor(rt: AgentRuntime, parts: AgentParts) {
    const { config, logger } = rt;
    this.config = config;
    this.logger = logger;
    this.endpointName = rt.endpointName;
    this.runner = rt.runner;
    this.drains = rt.drains ?? [];
    // Handlers reach the engine at call time: the engine needs the session, and the session needs the names.
    const flash = (): FlashEngine => this.flash;
    let updater: McuUpdater | undefined;
    this.methods = buildMethodTable({
      runner: this.runner,
      flash,
      ...(parts.build ? { build: parts.build } : {}),
      ...(parts.update ? { update: () => (updater ??= parts.update!(this.flash, this.session)) } : {}),
      ...(parts.ota ? { ota: () => this.ota() } : {}),
      info: () => this.info(),
      pendingKlipperStart: async () => {
        const journal = await readJournal(config.dataDir);
        return journal?.restartPending ? { jobId: journal.jobId, service: journal.klipperService } : null;
      },
    });
    const byName = new Map(this.methods.map((m) => [m.name, m]));
    this.session = parts.session(
      this.methods.map((m) => m.name),
      (method, params, info) => this.dispatch(byName, method, params, info.viaMacro),
    );
    this.flash = parts.flash(this.session);
    this.createOta = parts.ota ? () => parts.ota!(this.session, this.flash) : null;
    this.console = new ConsoleReporter(this.session, logger.child({ ns: "console" }), () => this.statusUrl);
    this.unsubscribers.push(this.runner.on(this.console.onJobEvent));
    this.unsubscribers.push(this.runner.on(agentEventAdapter(this.session, logger.child({ ns: "events" }))));
    // On every connection, not only the first: a CLI flash killed while this agent runs leaves a journal too.
    // OTA recovery follows (not blocking the handshake): an update an earlier process left half-way is rolled back
    // (or committed, past probation), an interrupted download resumed.
    this.session.on("identified", () => {
      this.statusWebcam?.cleanUp();
      void this.recover().then(() => this.recoverOta());
    });
    // A job that could not start Klipper again leaves its journal: keep trying from here, at once and then
    // every RECOVERY_CHECK_MS (also for a CLI job that gave up and exited). OTA recovery that found the lock
    // held (another process's job) tries again after a job ends.
    this.unsubscribers.push(this.runner.on((event) => {
      if (event.type === "result") void this.recover().then(() => this.recoverOta());
    }));
  }

  start(): void {
    this.logger.info({ version: VERSION, dataDir: this.config.dataDir, config: this.config.exists ? this.config.file : "(defaults)" }, "moonflash agent starting");
    this.session.start();
    // The path is computed once: a tick that builds paths makes node's path code hot, and V8's optimizing compiler
    // then maps ~4 MiB of its own code into an otherwise idle agent (docs/BENCHMARKS.md).
    const journal = dataPaths(this.config.dataDir).journal;
    this.recoveryTimer = setInterval(() => {
      if (existsSync(journal)) void this.recover();
    }, RECOVERY_CHECK_MS);
    this.recoveryTimer.unref();
    this.startStatusPage();
    const { http_port: port, http_bind: host } = this.config.ota;
    if (this.createOta && port !== null) {
      const address = `http://${host.includes(":") ? `[${host}]` : host}:${port}`;
      // Loaded only when configured: node:http would otherwise sit in every idle agent (docs/BENCHMARKS.md).
      this.otaHttp = this.ota().then(
        async (engine) => {
          try {
            const api = await (await import("../ota/http-api.js")).startOtaHttpApi({ engine, port, host, logger: this.logger });
            this.logger.info(`OTA vendor HTTP API listening on ${address}`);
            return api;
          } catch (err) {
            this.logger.error({ err }, `the OTA vendor HTTP API could not listen on ${address}`);
            return null;
          }
        },
        (err: unknown) => {
          this.logger.error({ err }, `the OTA engine could not be loaded, so the vendor HTTP API (${address}) is off`);
          return null;
        },
      );
    }
  }

  /**
   * The status page, and with it (when [status_page] webcam) the webcam that shows it in Mainsail and Fluidd while
   * Klipper is stopped. A page that cannot listen (port taken) is logged; the agent works on without it.
   */
  private startStatusPage(): void {
    const sp = this.config.status_page;
    if (!sp.enabled) return;
    const logger = this.logger.child({ ns: "status-page" });
    // The port is held at once; the page itself (node:http and its code) is loaded when a browser first connects or
    // the first job starts, so an idle agent does not carry it (docs/BENCHMARKS.md).
    const load = async () =>
      (await import("../status/page-server.js")).createStatusPage({ runner: this.runner, printer: this.session, logger, version: VERSION });
    this.statusPage = listenForPage({ host: sp.bind, port: sp.port, logger, load }).then(
      (listener) => {
        this.statusUrl = statusPageUrl(listener.port, sp.public_url);
        logger.info(`status page at ${this.statusUrl} (listening on ${listener.host}:${listener.port})`);
        const off = this.runner.on((event) => {
          if (event.type !== "stage") return;
          off();
          listener.load().catch((err: unknown) => logger.error({ err }, "the status page could not be loaded"));
        });
        this.unsubscribers.push(off);
        if (sp.webcam) {
          this.statusWebcam = new StatusWebcam({ printer: this.session, runner: this.runner, url: this.statusUrl, logger });
          if (this.session.identified) this.statusWebcam.cleanUp();
        }
        return listener;
      },
      (err: unknown) => {
        logger.error({ err }, "the status page could not start; moonflash works on without it");
        return null;
      },
    );
  }

  /** The status page once it listens (tests); null when [status_page] is off or it could not listen. */
  statusPageServer(): Promise<StatusListener | null> {
    return this.statusPage;
  }

  /** The vendor HTTP API once it listens; null when [ota] http_port is unset or it could not listen. */
  otaHttpApi(): Promise<OtaHttpApi | null> {
    return this.otaHttp;
  }

  /** Waits for a running job (it restarts Klipper in its own finally), then closes the session. */
  async stop(): Promise<void> {
    await (await this.otaHttp)?.close();
    await this.waitForIdle(120_000);
    this.statusWebcam?.close();
    await this.statusWebcam?.settled();
    await (await this.statusPage)?.close();
    await Promise.all(this.drains.map((drain) => drain(REPORT_DRAIN_MS)));
    if (this.recoveryTimer) clearInterval(this.recoveryTimer);
    this.recoveryTimer = null;
    for (const u of this.unsubscribers) u();
    this.console.close();
    await this.session.stop();
    this.logger.info("moonflash agent stopped");
  }

  private waitForIdle(timeoutMs: number): Promise<void> {
    if (!this.runner.current()) return Promise.resolve();
    this.logger.info("waiting for the running job to finish before stopping");
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        off();
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      const off = this.runner.on((event) => {
        if (event.type === "result") done();
      });
    });
  }

  info(): Record<string, unknown> {
    const s = this.session.state();
    return {
      name: AGENT_NAME,
      version: VERSION,
      pid: process.pid,
      uptime_s: Math.round((Date.now() - this.startedAt) / 1000),
      data_dir: this.config.dataDir,
      config: configSummary(this.config),
      moonraker: { connected: s.moonrakerConnected, version: s.moonrakerVersion, endpoint: this.endpointName },
      klipper: { connected: s.klippyConnected, state: s.klippyState, state_message: s.stateMessage, print_state: s.printState, idle_state: s.idleState, service: s.klipperService },
      methods: this.methods.map((m) => ({ name: m.name, description: m.description })),
    };
  }

  private async recover(): Promise<void> {
    // A journal of this process's own running job is not an interrupted one.
    if (this.recovering || this.runner.current()) return;
    this.recovering = true;
    try {
      await recoverInterruptedJob(this.config.dataDir, this.session, this.runner, this.logger.child({ ns: "recovery" }), {
        serviceTimeoutMs: this.config.moonflash.service_timeout * 1000,
      });
    } catch (err) {
      this.logger.error({ err }, `could not start Klipper for the journal yet; retrying on the next connection and every ${RECOVERY_CHECK_MS / 1000} s`);
    } finally {
      this.recovering = false;
    }
  }

  /**
   * Runs the OTA engine's recovery once per process, when Moonraker is there to start services; again only if the
   * job lock was held (by another process) when it tried. Logs the outcome; a recovery that acted is a job, so its
   * result reaches the console and agent events as any job's does.
   */
  private async recoverOta(): Promise<void> {
    if (!this.createOta || this.otaRecovered || this.otaRecovering || this.runner.current() || !this.session.identified) return;
    // Where OTA never ran there is nothing to recover, and the OTA code stays unloaded until an ota.* call. Once an
    // update ran, its state and backups stay, and every start loads the engine to look at them.
    if (!this.otaLoaded && !otaDirExists(this.config.dataDir)) {
      this.otaRecovered = true;
      this.logger.debug("OTA recovery: OTA never ran here; its engine loads on the first ota.* call");
      return;
    }
    this.otaRecovering = true;
    try {
      const outcome = await (await this.ota()).recover();
      const log = this.logger.child({ ns: "recovery" });
      if (outcome.action === "busy") {
        log.info({ outcome }, "OTA recovery waits: another moonflash job holds the lock; retrying when a job ends");
        return;
      }
      this.otaRecovered = true;
      if (outcome.action === "none") log.debug({ outcome }, "OTA recovery: nothing to do");
      else log[outcome.error ? "warn" : "info"]({ outcome }, `OTA recovery: ${outcome.action}, state ${outcome.state}`);
    } catch (err) {
      this.logger.error({ err }, "OTA recovery failed; retrying on the next connection");
    } finally {
      this.otaRecovering = false;
    }
  }

  /** The OTA engine, loaded once; a load that failed is tried again on the next call. */
  private ota(): Promise<OtaEngine> {
    const create = this.createOta;
    if (!create) return Promise.reject(new MoonflashError("INTERNAL", "This moonflash process runs no OTA engine."));
    this.otaLoaded ??= create().catch((err: unknown) => {
      this.otaLoaded = null;
      throw err;
    });
    return this.otaLoaded;
  }

  /** Resolves once the session is identified (its state read), or after `timeoutMs`. */
  private identified(timeoutMs: number): Promise<void> {
    if (this.session.identified) return Promise.resolve();
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.session.off("identified", done);
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      this.session.on("identified", done);
    });
  }

  private async dispatch(byName: Map<string, RemoteMethod>, name: string, raw: Record<string, unknown>, viaMacro: boolean): Promise<unknown> {
    const method = byName.get(name);
    if (!method) throw toMoonflashError(new Error(`unknown method ${name}`));
    this.logger.info({ method: name, params: raw, viaMacro }, "remote call");
    // A call can arrive as soon as its method is registered, before the session has read Klipper's state.
    await this.identified(HANDSHAKE_WAIT_MS);
    const lastJob = this.runner.history(undefined, 1)[0]?.id;
    // A call that ran a job has its outcome on the console already, through the job's result event.
    const jobReported = (): boolean => this.runner.history(undefined, 1)[0]?.id !== lastJob;
    try {
      const params = parseParams(name, method.params, raw, viaMacro ? macroDialect(method) : undefined);
      // A macro while our dialog is open is the user going on (its Start button, or typing): the dialog has had its say.
      if (viaMacro) this.console.closeDialog();
      const result = await method.handler(params as never);
      if (viaMacro && method.summary && !jobReported()) this.console.say(method.summary(result as never));
      const dialog = viaMacro ? method.dialog?.(result as never) : null;
      if (dialog) this.console.dialog(dialog);
      return result;
    } catch (err) {
      const e = toMoonflashError(err);
      if (viaMacro && !jobReported()) this.console.say(`moonflash: ${method.macro?.command ?? name} failed [${e.code}] ${e.message}`, "error");
      if (!isMoonflashError(err)) this.logger.error({ err }, `${name} failed unexpectedly`);
      throw e;
    }
  }
}
