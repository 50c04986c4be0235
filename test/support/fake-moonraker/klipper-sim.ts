// A scriptable stand-in for klippy as Moonraker sees it: state, printer objects, and a tiny G-code interpreter
// (RESPOND, M118, M117, SET_DISPLAY_TEXT, M73, FIRMWARE_RESTART/RESTART, macros calling remote methods).
import { KLIPPER_VERSION, baseConfigSettings, mcuLastStats, printerInfoStatic } from "./recorded.js";
import { ServerError } from "./server-error.js";

export type KlippyState = "ready" | "startup" | "shutdown" | "error";

export interface SimMcu {
  section: string;
  settings: Record<string, unknown>;
  mcu_version?: string;
  mcu_build_versions?: string;
  mcu_constants?: Record<string, unknown>;
}

/** A `[gcode_macro NAME]` whose template calls `action_call_remote_method(method, **params)`. */
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
  /** A macro called a remote method; Moonraker forwards it to the agent that registered it, if any. */
  callRemoteMethod(method: string, params: Record<string, unknown>): void;
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
  /** Everything after the command word, as typed. */
  rest: string;
}

/** The simulated Klipper's starting state. */
export interface SimKlipperOptions {
  state?: KlippyState;
  stateMessage?: string;
  softwareVersion?: string;
  printState?: string;
  idleState?: string;
  mcus?: SimMcu[];
  macros?: Record<string, SimMacro>;
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
  private readonly macroTable = new Map<string, SimMacro>();
  private active = true;
  private connectedToMoonraker = true;
  private readonly startedAt = performance.now();

  constructor(
    private readonly host: KlipperHost,
    opts: SimKlipperOptions = {},
  ) {
    this.klippyState = opts.state ?? "ready";
    this.klippyMessage = opts.stateMessage ?? DEFAULT_STATE_MESSAGES[this.klippyState];
    this.hostVersion = opts.softwareVersion ?? KLIPPER_VERSION;
    this.printStateValue = opts.printState ?? "standby";
    this.idleStateValue = opts.idleState ?? "Idle";
    this.mcuList = opts.mcus ?? [{ section: "mcu", settings: { serial: "/tmp/klipper_host_mcu" } }];
    for (const [name, macro] of Object.entries(opts.macros ?? {})) this.macroTable.set(name.toUpperCase(), macro);
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
    this.macroTable.set(name.toUpperCase(), macro);
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

  connect(): void {
    if (this.connectedToMoonraker || !this.active) return;
    this.connectedToMoonraker = true;
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
      "gcode_move", "print_stats", "virtual_sdcard", "display_status", "pause_resume",
      ...[...this.macroTable.keys()].map((name) => `gcode_macro ${name}`),
      "toolhead", "idle_timeout", "system_stats", "manual_probe",
    ];
  }

  /** Every printer object's full status, keyed by object name. */
  status(): Record<string, Record<string, unknown>> {
    const settings: Record<string, Record<string, unknown>> = {};
    for (const mcu of this.mcuList) settings[mcu.section] = { ...mcu.settings };
    Object.assign(settings, baseConfigSettings());
    for (const [name, macro] of this.macroTable) {
      settings[`gcode_macro ${name.toLowerCase()}`] = { gcode: renderMacroTemplate(macro), description: "G-Code macro" };
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
        mcu_version: mcu.mcu_version ?? this.hostVersion,
        mcu_build_versions: mcu.mcu_build_versions ?? DEFAULT_BUILD_VERSIONS,
        mcu_constants: mcu.mcu_constants ?? DEFAULT_MCU_CONSTANTS,
        last_stats: mcuLastStats(),
      };
    }
    for (const name of this.macroTable.keys()) status[`gcode_macro ${name}`] = {};
    return status;
  }

  /** printer.gcode.script: runs line by line; the first error stops the script (gcode.py: run_script). */
  runScript(script: string): void {
    for (const raw of script.split("\n")) {
      const line = parseGcodeLine(raw);
      if (line !== null) this.runCommand(line);
    }
    this.host.statusChanged();
  }

  private runCommand({ command, rest }: GcodeLine): void {
    // RESPOND, M118 and the restarts are registered with when_not_ready=True; everything else needs `ready`.
    switch (command) {
      case "RESPOND":
        this.respond(extendedParams(rest));
        return;
      case "M118":
        this.emit(`echo: ${rest}`);
        return;
      case "FIRMWARE_RESTART":
      case "RESTART":
        this.scheduleRestart();
        return;
    }
    if (this.klippyState !== "ready") this.fail(this.klippyMessage);
    const macro = this.macroTable.get(command);
    if (macro !== undefined) {
      const lineArgs = Object.fromEntries(Object.entries(extendedParams(rest)).map(([k, v]) => [k.toLowerCase(), v]));
      this.host.callRemoteMethod(macro.method, { ...macro.params, ...lineArgs });
      return;
    }
    switch (command) {
      case "M117":
        this.displayMessage = rest === "" ? null : rest;
        return;
      case "SET_DISPLAY_TEXT":
        this.displayMessage = extendedParams(rest).MSG ?? null;
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

  private respond(params: Record<string, string>): void {
    const prefixes: Record<string, string> = { echo: "echo:", command: "//", error: "!!" };
    let prefix = prefixes.echo;
    if (params.TYPE !== undefined) {
      prefix = prefixes[params.TYPE.toLowerCase()];
      if (prefix === undefined) {
        this.fail(`RESPOND TYPE '${params.TYPE}' is invalid. Must be one of 'echo', 'command', or 'error'`);
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

  // gcode.py: _respond_error — a multi-line message is echoed as info, then the first line as the error.
  private fail(message: string): never {
    const lines = message.trim().split("\n").map((l) => l.trim());
    if (lines.length > 1) this.emit(`// ${lines.join("\n// ")}`);
    this.emit(`!! ${lines[0] ?? ""}`);
    throw new ServerError(message, 400);
  }
}

function parseGcodeLine(raw: string): GcodeLine | null {
  const line = raw.split(";")[0]?.trim() ?? "";
  if (line === "") return null;
  const match = /^(\S+)\s*(.*)$/.exec(line);
  if (match === null) return null;
  return { command: (match[1] ?? "").toUpperCase(), rest: match[2] ?? "" };
}

/** KEY=VALUE parameters of an extended command; values may be quoted as shlex does. Keys are upper-cased. */
function extendedParams(rest: string): Record<string, string> {
  const params: Record<string, string> = {};
  for (const token of shellSplit(rest)) {
    const eq = token.indexOf("=");
    if (eq > 0) params[token.slice(0, eq).toUpperCase()] = token.slice(eq + 1);
  }
  return params;
}

function shellSplit(text: string): string[] {
  const tokens: string[] = [];
  let current = "";
  let inToken = false;
  let quote: string | null = null;
  for (const ch of text) {
    if (quote !== null) {
      if (ch === quote) quote = null;
      else current += ch;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      inToken = true;
    } else if (/\s/.test(ch)) {
      if (inToken) tokens.push(current);
      current = "";
      inToken = false;
    } else {
      current += ch;
      inToken = true;
    }
  }
  if (inToken) tokens.push(current);
  return tokens;
}

/** The gcode option as configfile.settings shows it for a one-line remote-call macro. */
function renderMacroTemplate(macro: SimMacro): string {
  const args = Object.entries(macro.params ?? {}).map(([key, value]) => `${key}=${jinjaLiteral(value)}`);
  return `\n{action_call_remote_method(${[JSON.stringify(macro.method), ...args].join(", ")})}`;
}

function jinjaLiteral(value: unknown): string {
  if (typeof value === "boolean") return value ? "True" : "False";
  if (value === null || value === undefined) return "None";
  return JSON.stringify(value);
}
