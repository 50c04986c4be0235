// What the agent knows about the printer, folded from Moonraker's answers and notifications.
// Pure bookkeeping: the session feeds it, it tells listeners when something they can see changed.

import type { Logger } from "pino";
import { initialPrinterState, type KlippyState, type PrinterState, type ServiceState } from "../core/printer.js";

const KLIPPY_STATES: readonly KlippyState[] = ["ready", "startup", "shutdown", "error", "disconnected"];

/** The fields of `server.info` the tracker reads. */
export interface ServerInfo {
  klippy_connected?: boolean;
  klippy_state?: string;
  moonraker_version?: string;
}

/** The fields of `machine.system_info.system_info` the tracker reads. */
export interface SystemInfo {
  service_state?: Record<string, ServiceState>;
  instance_ids?: Record<string, string>;
}

export class KlipperTracker {
  private current: PrinterState = initialPrinterState();
  private readonly listeners = new Set<(state: PrinterState) => void>();

  constructor(private readonly log: Logger) {}

  get state(): PrinterState {
    return this.current;
  }

  /** print_stats printing/paused, or idle_timeout Printing (which also covers running macros). */
  isPrinting(): boolean {
    const { printState, idleState } = this.current;
    return printState === "printing" || printState === "paused" || idleState === "Printing";
  }

  onChange(listener: (state: PrinterState) => void): () => void {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  moonrakerConnected(): void {
    this.update({ moonrakerConnected: true });
  }

  /** Nothing is known about Klipper without Moonraker; services and the unit name are kept as last seen. */
  moonrakerLost(): void {
    this.update({
      moonrakerConnected: false,
      klippyConnected: false,
      klippyState: "disconnected",
      stateMessage: "Moonraker is not connected",
      printState: null,
      idleState: null,
    });
  }

  serverInfo(info: ServerInfo): void {
    const connected = info.klippy_connected === true;
    const klippyState = connected ? toKlippyState(info.klippy_state) : "disconnected";
    const patch: Partial<PrinterState> = { klippyConnected: connected, klippyState };
    if (typeof info.moonraker_version === "string") patch.moonrakerVersion = info.moonraker_version;
    if (!connected) Object.assign(patch, { printState: null, idleState: null, stateMessage: "Klipper is not connected to Moonraker" });
    this.update(patch);
  }

  /** printer.info: the only source of Klipper's state message while it starts or is in error (no subscription). */
  printerInfo(info: { state?: unknown; state_message?: unknown }): void {
    // Klipper says "ready" here ~0.7 s before Moonraker does; until Moonraker agrees, keep state and message together.
    if (info.state === "ready") return;
    if (typeof info.state_message === "string") this.update({ stateMessage: info.state_message.trim() });
  }

  systemInfo(info: SystemInfo): void {
    const patch: Partial<PrinterState> = { services: { ...this.current.services, ...(info.service_state ?? {}) } };
    const unit = info.instance_ids?.klipper;
    if (typeof unit === "string" && unit !== "") patch.klipperService = unit;
    this.update(patch);
  }

  serviceStateChanged(changes: Record<string, ServiceState>): void {
    this.update({ services: { ...this.current.services, ...changes } });
  }

  klippyReady(): void {
    this.update({ klippyConnected: true, klippyState: "ready", stateMessage: "Printer is ready" });
  }

  klippyShutdown(): void {
    this.update({ klippyConnected: true, klippyState: "shutdown" });
  }

  klippyDisconnected(): void {
    this.update({
      klippyConnected: false,
      klippyState: "disconnected",
      stateMessage: "Klipper is not connected to Moonraker",
      printState: null,
      idleState: null,
    });
  }

  /** A subscribe snapshot or a `notify_status_update` diff: `{webhooks: {...}, print_stats: {...}, ...}`. */
  status(status: Record<string, unknown>): void {
    const patch: Partial<PrinterState> = {};
    const webhooks = asRecord(status.webhooks);
    if (typeof webhooks?.state === "string") {
      patch.klippyState = toKlippyState(webhooks.state);
      patch.klippyConnected = true;
    }
    if (typeof webhooks?.state_message === "string") patch.stateMessage = webhooks.state_message;
    const printState = asRecord(status.print_stats)?.state;
    if (typeof printState === "string") patch.printState = printState;
    const idleState = asRecord(status.idle_timeout)?.state;
    if (typeof idleState === "string") patch.idleState = idleState;
    this.update(patch);
  }

  private update(patch: Partial<PrinterState>): void {
    const next = { ...this.current, ...patch };
    if (sameState(this.current, next)) return;
    this.current = next;
    for (const listener of this.listeners) {
      try {
        listener(next);
      } catch (err) {
        this.log.error({ err }, "a printer state listener threw; the others still ran");
      }
    }
  }
}

export function asRecord(value: unknown): Record<string, unknown> | undefined {
  return typeof value === "object" && value !== null && !Array.isArray(value)
    ? (value as Record<string, unknown>)
    : undefined;
}

function toKlippyState(value: unknown): KlippyState {
  return KLIPPY_STATES.includes(value as KlippyState) ? (value as KlippyState) : "disconnected";
}

function sameState(a: PrinterState, b: PrinterState): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}
