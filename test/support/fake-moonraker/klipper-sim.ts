// A scriptable stand-in for klippy as Moonraker sees it: state, printer objects, and a tiny G-code interpreter
// (RESPOND, M118, M117, SET_DISPLAY_TEXT, M73, FIRMWARE_RESTART/RESTART, and G-code macros rendered with real Jinja2
// as Klipper renders them, see macro-render.ts).
import { loadMacroFile, renderMacro, type MacroDefinition } from "./macro-render.js";
import { KLIPPER_VERSION, baseConfigSettings, mcuLastStats, printerInfoStatic } from "./recorded.js";
import { ServerError } from "./server-error.js";

export type KlippyState = "ready" | "startup" | "shutdown" | "error";

export interface SimMcu {
  section: string;
  settings: Record<string, unknown>;
  mcu_version?: string;
  /**
   * The version the board's firmware reports, read when Klipper connects to it (a virtual board: the version in the
   * image it holds). Overrides mcu_version.
   */
  versionFrom?: () => string | undefined;
  mcu_build_versions?: string;
  mcu_constants?: Record<string, unknown>;
}

/**
 * A `[gcode_macro NAME]` whose gcode is `{action_call_remote_method("<method>", key=value, ...)}` with `params` as the
 * keyword arguments, so a `method` key collides with Klipper's positional `method` as it does in Klipper.
 */
export interface SimMacro {
  method: string;
  params?: Record<string, unknown>;
}

/** What the simulated Klipper needs from the fake Moonraker around it. */
export interface KlipperHost {
  /** Broadcast a notification to every client (Moonraker's notify_clients). */
  notifyAll(method: string, params?: unknown[]): void;
  /** Printer objects may have changed: push notify_status_update to subscribers. */
  statusChanged(): void;
  /** Klippy dropped its connection to Moonraker: subscriptions are gone. */
  klippyDisconnected(): void;
  /** Klippy connected to Moonraker (again). */
  klippyConnected?(): void;
  /** A macro called a remote method; Moonraker forwards it to the agent that registered it, if any. */
  callRemoteMethod(method: string, params: Record<string, unknown>): void;
  /** The remote methods Moonraker has registered with Klipper on behalf of its agents. */
  remoteMethods(): string[];
  /** Run `fn` after `ms`, cancelled when the fake stops. */
  schedule(fn: () => void, ms: number): void;
  /** How long klippy takes to reconnect after FIRMWARE_RESTART/RESTART. */
  readonly restartMs: number;
}

const DEFAULT_STATE_MESSAGES: Record<KlippyState, string> = {
  ready: "Printer is ready",
  startup: "Printer is not ready\nThe klippy host software is attempting to connect.  Please\nretry in a few moments.",
  shutdown:
    "Shutdown due to webhooks request\nOnce the underlying issue is corrected, use the\n\"FIRMWARE_RESTART\" command to reset the firmware, reload the\nconfig, and restart the host software.\nPrinter is shutdown",
  error: "Klipper reported an error during startup",
};

// As recorded from the Linux host MCU (objects_query.jsonl); used when a SimMcu does not say otherwise.
const DEFAULT_BUILD_VERSIONS = "gcc: (Debian 12.2.0-14+deb12u1) 12.2.0 binutils: (GNU Binutils for Debian) 2.40";
const DEFAULT_MCU_CONSTANTS = {
  ADC_MAX: 4095, CLOCK_FREQ: 50000000, MCU: "linux", PCA9685_MAX: 4096, PWM_MAX: 32768, STATS_SUMSQ_BASE: 256,
  STEPPER_STEP_BOTH_EDGE: 1,
};

/** The state_message Klipper shows when MCU firmware does not match the host (klippy/extras/error_mcu.py). */
export function mcuProtocolErrorMessage(
  hostVersion: string,
  outdated: Array<{ name: string; version: string }>,
  upToDate: string[],
  firstMismatch = "Unknown command: config_spi_shutdown",
): string {
  return [
    "MCU Protocol error",
    "",
    "This is frequently caused by running an older version of the",
    "firmware on the MCU(s). Fix by recompiling and flashing the",
    "firmware.",
    "",
    `Your Klipper version is: ${hostVersion}`,
    "MCU(s) which should be updated:",
    ...outdated.map((m) => `${m.name}: Current version ${m.version}`),
    "Up-to-date MCU(s):",
    ...(upToDate.length > 0 ? upToDate : ["<none>"]),
    "",
    firstMismatch,
  ].join("\n");
}

interface GcodeLine {
  command: string;
  /** Everything after the command word, without the comment. */
  rest: string;
  /** The line as typed, trimmed, comment included (gcode.py: GCodeCommand's commandline). */
  origline: string;
}

/** A G-code command error (gcode.py: CommandError): shown as "!! message" wherever a script level catches it. */
class GcodeError extends Error {}

/** The simulated Klipper's starting state. */
export interface SimKlipperOptions {
  state?: KlippyState;
  stateMessage?: string;
  softwareVersion?: string;
  printState?: string;
  idleState?: string;
  mcus?: SimMcu[];
  /** Check the MCUs' versions against the host's each time Klippy starts, as Klipper does. */
  checkMcuVersions?: boolean;
  macros?: Record<string, SimMacro>;
  /** A Klipper config file whose [gcode_macro NAME] sections are loaded too (e.g. moonraker/moonflash.cfg). */
  macroFile?: string;
}

export class SimKlipper {
  private klippyState: KlippyState;
  private klippyMessage: string;
  private hostVersion: string;
  private printStateValue: string;
  private idleStateValue: string;
  private displayMessage: string | null = null;
  private displayProgress = 0;
  private mcuList: SimMcu[];
  private readonly macroTable = new Map<string, MacroDefinition>();
  /** Macros being rendered or run; Klipper refuses to re-enter one (gcode_macro.py: in_script). */
  private readonly runningMacros = new Set<string>();
  /** Scripts run one at a time, as under Klipper's gcode mutex. */
  private scriptQueue: Promise<unknown> = Promise.resolve();
  private active = true;
  private connectedToMoonraker = true;
  private readonly startedAt = performance.now();

  private readonly checksMcuVersions: boolean;

  constructor(
    private readonly host: KlipperHost,
    opts: SimKlipperOptions = {},
  ) {
    this.checksMcuVersions = opts.checkMcuVersions ?? false;
    this.klippyState = opts.state ?? "ready";
    this.klippyMessage = opts.stateMessage ?? DEFAULT_STATE_MESSAGES[this.klippyState];
    this.hostVersion = opts.softwareVersion ?? KLIPPER_VERSION;
    this.printStateValue = opts.printState ?? "standby";
    this.idleStateValue = opts.idleState ?? "Idle";
    this.mcuList = opts.mcus ?? [{ section: "mcu", settings: { serial: "/tmp/klipper_host_mcu" } }];
    for (const [name, macro] of Object.entries(opts.macros ?? {})) this.addMacro(name, macro);
    for (const macro of opts.macroFile ? loadMacroFile(opts.macroFile) : []) this.macroTable.set(macro.name, macro);
  }

  /** True while the klipper service (supervisord program) runs. */
  get serviceActive(): boolean {
    return this.active;
  }

  /** True while klippy is connected to Moonraker; printer.* calls fail with 503 otherwise. */
  get connected(): boolean {
    return this.connectedToMoonraker;
  }

  get state(): KlippyState {
    return this.klippyState;
  }

  get stateMessage(): string {
    return this.klippyMessage;
  }

  get softwareVersion(): string {
    return this.hostVersion;
  }

  get mcus(): readonly SimMcu[] {
    return this.mcuList;
  }

  /** Seconds on klippy's monotonic clock, as `eventtime` values carry. */
  eventtime(): number {
    return (performance.now() - this.startedAt) / 1000 + 500;
  }

  /**
   * Sets klippy's state; while klippy is connected, Moonraker's notifications follow (ready/shutdown).
   * While it is disconnected this is the state klippy comes up in on the next start.
   */
  setState(state: KlippyState, message?: string): void {
    const previous = this.klippyState;
    this.klippyState = state;
    this.klippyMessage = message ?? DEFAULT_STATE_MESSAGES[state];
    if (!this.connectedToMoonraker) return;
    if (state !== previous) this.announceState();
    this.host.statusChanged();
  }

  setSoftwareVersion(version: string): void {
    this.hostVersion = version;
  }

  setPrintState(state: string): void {
    this.printStateValue = state;
    this.host.statusChanged();
  }

  setIdleState(state: string): void {
    this.idleStateValue = state;
    this.host.statusChanged();
  }

  setMcus(mcus: SimMcu[]): void {
    this.mcuList = mcus;
    this.host.statusChanged();
  }

  addMacro(name: string, macro: SimMacro): void {
    this.macroTable.set(name.toUpperCase(), {
      section: `gcode_macro ${name}`,
      name: name.toUpperCase(),
      description: "G-Code macro",
      gcode: remoteCallTemplate(macro),
      variables: {},
      remoteCall: { method: macro.method, params: { ...macro.params } },
    });
  }

  /** The loaded macros by command name. */
  get macros(): ReadonlyMap<string, MacroDefinition> {
    return this.macroTable;
  }

  /** The service was stopped: klippy's connection to Moonraker goes away. */
  serviceStopped(): void {
    this.active = false;
    this.disconnect();
  }

  /** The service runs again; klippy connects later through connect(). */
  serviceStarted(): void {
    this.active = true;
  }

  disconnect(): void {
    if (!this.connectedToMoonraker) return;
    this.connectedToMoonraker = false;
    this.host.klippyDisconnected();
    this.host.notifyAll("notify_klippy_disconnected");
  }

  /** What the MCU's firmware reports now. */
  mcuVersion(mcu: SimMcu): string {
    return mcu.versionFrom?.() ?? mcu.mcu_version ?? this.hostVersion;
  }

  /**
   * Klipper's start-up check (klippy/mcu.py, klippy/extras/error_mcu.py): an MCU whose firmware version differs
   * from the host's puts Klipper in "MCU Protocol error" naming the MCUs to update; all equal: ready.
   */
  private checkMcuVersions(): void {
    const name = (m: SimMcu): string => (m.section === "mcu" ? "mcu" : m.section.replace(/^mcu\s+/, ""));
    const outdated = this.mcuList.filter((m) => this.mcuVersion(m) !== this.hostVersion);
    if (outdated.length === 0) {
      if (this.klippyState === "error") this.setState("ready");
      return;
    }
    const upToDate = this.mcuList.filter((m) => !outdated.includes(m)).map(name);
    this.setState("error", mcuProtocolErrorMessage(this.hostVersion, outdated.map((m) => ({ name: name(m), version: this.mcuVersion(m) })), upToDate));
  }

  connect(): void {
    if (this.connectedToMoonraker || !this.active) return;
    if (this.checksMcuVersions) this.checkMcuVersions();
    this.connectedToMoonraker = true;
    this.host.klippyConnected?.();
    this.announceState();
  }

  private announceState(): void {
    if (this.klippyState === "ready") this.host.notifyAll("notify_klippy_ready");
    else if (this.klippyState === "shutdown") this.host.notifyAll("notify_klippy_shutdown");
  }

  printerInfo(): Record<string, unknown> {
    return {
      state: this.klippyState,
      state_message: this.klippyMessage,
      ...printerInfoStatic(),
      software_version: this.hostVersion,
    };
  }

  objectNames(): string[] {
    return [
      "gcode", "webhooks", "configfile",
      ...this.mcuList.map((m) => m.section),
      // The rig's printer.cfg order: [virtual_sdcard], [pause_resume], [display_status].
      "gcode_move", "print_stats", "virtual_sdcard", "pause_resume", "display_status",
      ...[...this.macroTable.values()].map((macro) => macro.section),
      "toolhead", "idle_timeout", "system_stats", "manual_probe",
    ];
  }

  /** Every printer object's full status, keyed by object name. */
  status(): Record<string, Record<string, unknown>> {
    const settings: Record<string, Record<string, unknown>> = {};
    for (const mcu of this.mcuList) settings[mcu.section] = { ...mcu.settings };
    Object.assign(settings, baseConfigSettings());
    for (const macro of this.macroTable.values()) {
      settings[macro.section.toLowerCase()] = { gcode: macro.gcode, description: macro.description };
    }
    const config: Record<string, Record<string, string>> = {};
    for (const [section, options] of Object.entries(settings)) {
      config[section] = Object.fromEntries(Object.entries(options).map(([k, v]) => [k, String(v)]));
    }
    const status: Record<string, Record<string, unknown>> = {
      gcode: { commands: {} },
      webhooks: { state: this.klippyState, state_message: this.klippyMessage },
      configfile: { config, settings, warnings: [], save_config_pending: false, save_config_pending_items: {} },
      gcode_move: {
        speed_factor: 1.0, speed: 1500.0, extrude_factor: 1.0, absolute_coordinates: true, absolute_extrude: true,
        homing_origin: [0, 0, 0, 0], position: [0, 0, 0, 0], gcode_position: [0, 0, 0, 0],
      },
      print_stats: {
        filename: "", total_duration: 0.0, print_duration: 0.0, filament_used: 0.0, state: this.printStateValue,
        message: "", info: { total_layer: null, current_layer: null },
      },
      virtual_sdcard: { file_path: null, progress: 0.0, is_active: this.printStateValue === "printing", file_position: 0, file_size: 0 },
      display_status: { progress: this.displayProgress, message: this.displayMessage },
      pause_resume: { is_paused: this.printStateValue === "paused" },
      toolhead: {
        homed_axes: "", print_time: 0.0, estimated_print_time: this.eventtime(), extruder: "", position: [0, 0, 0, 0],
        max_velocity: 1.0, max_accel: 1.0, minimum_cruise_ratio: 0.5, square_corner_velocity: 5.0, stalls: 0,
      },
      idle_timeout: { state: this.idleStateValue, printing_time: 0.0 },
      system_stats: { sysload: 0.0, cputime: 0.0, memavail: 0 },
      manual_probe: { is_active: false, z_position: null, z_position_lower: null, z_position_upper: null },
    };
    for (const mcu of this.mcuList) {
      status[mcu.section] = {
        mcu_version: this.mcuVersion(mcu),
        mcu_build_versions: mcu.mcu_build_versions ?? DEFAULT_BUILD_VERSIONS,
        mcu_constants: mcu.mcu_constants ?? DEFAULT_MCU_CONSTANTS,
        last_stats: mcuLastStats(),
      };
    }
    // A macro's status is its variables (gcode_macro.py: get_status).
    for (const macro of this.macroTable.values()) status[macro.section] = { ...macro.variables };
    return status;
  }

  /**
   * printer.gcode.script: runs line by line; the first error stops the script and is the request's error
   * (gcode.py: run_script). Scripts run one at a time.
   */
  runScript(script: string): Promise<void> {
    const run = this.scriptQueue.then(async () => {
      try {
        await this.runLines(script.split("\n"));
      } catch (err) {
        if (err instanceof GcodeError) throw new ServerError(err.message, 400);
        throw err;
      } finally {
        this.host.statusChanged();
      }
    });
    this.scriptQueue = run.catch(() => undefined);
    return run;
  }

  // gcode.py: _process_commands without an ack: each level that catches a command error shows it, then passes it
  // up, so an error inside a macro's G-code shows once for every macro level around it, as in Klipper.
  private async runLines(lines: string[]): Promise<void> {
    for (const raw of lines) {
      const line = parseGcodeLine(raw);
      if (line === null) continue;
      try {
        await this.runCommand(line);
      } catch (err) {
        if (err instanceof GcodeError) this.respondError(err.message);
        throw err;
      }
    }
  }

  private async runCommand(line: GcodeLine): Promise<void> {
    const { command, rest } = line;
    // RESPOND, M118 and the restarts are registered with when_not_ready=True; everything else needs `ready`.
    switch (command) {
      case "RESPOND":
        this.respond(extendedParams(line));
        return;
      case "M118":
        this.emit(`echo: ${rest}`);
        return;
      case "FIRMWARE_RESTART":
      case "RESTART":
        this.scheduleRestart();
        return;
    }
    if (this.klippyState !== "ready") throw new GcodeError(this.klippyMessage);
    const macro = this.macroTable.get(command);
    if (macro !== undefined) {
      await this.runMacro(macro, line);
      return;
    }
    switch (command) {
      case "M117":
        this.displayMessage = rest === "" ? null : rest;
        return;
      case "SET_DISPLAY_TEXT":
        this.displayMessage = extendedParams(line).MSG ?? null;
        return;
      case "M73": {
        const percent = Number(/(?:^|\s)P(\S+)/i.exec(rest)?.[1] ?? "0");
        this.displayProgress = Math.min(Math.max(percent / 100, 0), 1);
        return;
      }
      default:
        this.emit(`// Unknown command:"${command}"`);
    }
  }

  // gcode_macro.py: GCodeMacro.cmd. The template runs its action_* calls while it renders (remote calls reach
  // Moonraker even when the render fails later); then its output runs as G-code.
  private async runMacro(macro: MacroDefinition, line: GcodeLine): Promise<void> {
    if (this.runningMacros.has(macro.name)) throw new GcodeError(`Macro ${macro.name} called recursively`);
    const params = extendedParams(line);
    if (macro.remoteCall) {
      // gcode_macro.py: _action_call_remote_method(self, method, **kwargs) — a keyword named "method" collides.
      if ("method" in macro.remoteCall.params) {
        throw new GcodeError(
          `Error evaluating '${macro.section}:gcode': TypeError: PrinterGCodeMacro._action_call_remote_method() got multiple values for argument 'method'\n`,
        );
      }
      this.host.callRemoteMethod(macro.remoteCall.method, macro.remoteCall.params);
      return;
    }
    this.runningMacros.add(macro.name);
    try {
      const result = await renderMacro({
        macro,
        params,
        rawparams: rawParams(line),
        printer: this.status(),
        remoteMethods: this.host.remoteMethods(),
      });
      for (const event of result.events) {
        if (event.type === "remote_method") this.host.callRemoteMethod(event.method, event.params);
        else if (event.type === "respond_info") this.respondInfo(event.message);
        else this.invokeShutdown(event.message);
      }
      if ("error" in result) throw new GcodeError(result.error);
      await this.runLines(result.output.split("\n"));
    } finally {
      this.runningMacros.delete(macro.name);
    }
  }

  // klippy.py: invoke_shutdown; gcode.py reports the new state on the console.
  private invokeShutdown(message: string): void {
    if (this.klippyState === "shutdown") return;
    this.respondInfo("Klipper state: Shutdown");
    this.setState("shutdown", message);
  }

  private respond(params: Record<string, string>): void {
    const prefixes: Record<string, string> = { echo: "echo:", command: "//", error: "!!" };
    let prefix = prefixes.echo;
    if (params.TYPE !== undefined) {
      prefix = prefixes[params.TYPE.toLowerCase()];
      if (prefix === undefined) {
        throw new GcodeError(`RESPOND TYPE '${params.TYPE}' is invalid. Must be one of 'echo', 'command', or 'error'`);
      }
    }
    this.emit(`${params.PREFIX ?? prefix} ${params.MSG ?? ""}`);
  }

  // FIRMWARE_RESTART answers "ok" first; then klippy drops its Moonraker connection and comes back.
  // A shutdown clears on restart; an error state (e.g. MCU protocol mismatch) stays until the test changes it.
  private scheduleRestart(): void {
    this.host.schedule(() => {
      this.disconnect();
      if (this.klippyState === "shutdown") {
        this.klippyState = "ready";
        this.klippyMessage = DEFAULT_STATE_MESSAGES.ready;
      }
      this.host.schedule(() => this.connect(), this.host.restartMs);
    }, 0);
  }

  private emit(line: string): void {
    this.host.notifyAll("notify_gcode_response", [line]);
  }

  // gcode.py: respond_info.
  private respondInfo(message: string): void {
    this.emit(`// ${message.trim().split("\n").map((l) => l.trim()).join("\n// ")}`);
  }

  // gcode.py: _respond_error — a multi-line message is echoed as info, then the first line as the error.
  private respondError(message: string): void {
    const lines = message.trim().split("\n");
    if (lines.length > 1) this.respondInfo(lines.join("\n"));
    this.emit(`!! ${lines[0]?.trim() ?? ""}`);
  }
}

function parseGcodeLine(raw: string): GcodeLine | null {
  const origline = raw.trim();
  const line = origline.split(";")[0]?.trim() ?? "";
  if (line === "") return null;
  const match = /^(\S+)\s*(.*)$/.exec(line);
  if (match === null) return null;
  return { command: (match[1] ?? "").toUpperCase(), rest: match[2] ?? "", origline };
}

/** What follows the command word in the line as typed, less one separating space (gcode.py). */
function rawParams(line: GcodeLine): string {
  let rest = line.origline.slice(line.command.length);
  if (/^\s/.test(rest)) rest = rest.slice(1);
  return rest;
}

/**
 * KEY=VALUE parameters of an extended command (gcode.py: _get_extended_params): split as shlex does in POSIX mode
 * with '#' and ';' starting a comment; keys upper-cased; a word without '=' makes the command malformed.
 */
function extendedParams(line: GcodeLine): Record<string, string> {
  const params: Record<string, string> = {};
  const tokens = shellSplit(rawParams(line));
  if (tokens === null) throw new GcodeError(`Malformed command '${line.origline}'`);
  for (const token of tokens) {
    const eq = token.indexOf("=");
    if (eq < 0) throw new GcodeError(`Malformed command '${line.origline}'`);
    params[token.slice(0, eq).toUpperCase()] = token.slice(eq + 1);
  }
  return params;
}

/** null where shlex fails: an unclosed quote or a trailing backslash. */
function shellSplit(text: string): string[] | null {
  const tokens: string[] = [];
  let current = "";
  let inToken = false;
  let quote: string | null = null;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (quote === "'") {
      if (ch === quote) quote = null;
      else current += ch;
    } else if (quote === '"') {
      // Inside double quotes a backslash escapes only '"' and '\\'.
      if (ch === "\\" && (text[i + 1] === '"' || text[i + 1] === "\\")) current += text[++i];
      else if (ch === quote) quote = null;
      else current += ch;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      inToken = true;
    } else if (ch === "\\") {
      if (i + 1 === text.length) return null;
      current += text[++i];
      inToken = true;
    } else if (ch === "#" || ch === ";") {
      break;
    } else if (/\s/.test(ch)) {
      if (inToken) tokens.push(current);
      current = "";
      inToken = false;
    } else {
      current += ch;
      inToken = true;
    }
  }
  if (quote !== null) return null;
  if (inToken) tokens.push(current);
  return tokens;
}

/** The gcode option of a SimMacro, as configfile.settings shows it for a one-line remote-call macro. */
function remoteCallTemplate(macro: SimMacro): string {
  const args = Object.entries(macro.params ?? {}).map(([key, value]) => `${key}=${jinjaLiteral(value)}`);
  return `\n{action_call_remote_method(${[JSON.stringify(macro.method), ...args].join(", ")})}`;
}

function jinjaLiteral(value: unknown): string {
  if (typeof value === "boolean") return value ? "True" : "False";
  if (value === null || value === undefined) return "None";
  return JSON.stringify(value);
}
