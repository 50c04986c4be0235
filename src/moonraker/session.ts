// The agent's Moonraker session: the printer as engines see it (a PrinterPort), built from one connection
// (connection.ts: connect, identify, register, answer calls, reconnect), Klipper following (klippy-follower.ts),
// service control (services.ts) and Klipper's MCU sections (mcu-list.ts). Engines never see JSON-RPC.

import { EventEmitter } from "node:events";
import type { CanbusNode, McuReport, PrinterPort, PrinterState, SerialPeripheral } from "../core/printer.js";
import { ERROR_CODES, MoonflashError, type ErrorCode } from "../core/errors.js";
import { MoonrakerConnection, type ConnectionOptions } from "./connection.js";
import { isKlipperAway, klipperNotConnected, requestFailed } from "./failures.js";
import { asRecord } from "./klipper-tracker.js";
import { KlippyFollower } from "./klippy-follower.js";
import { readMcuReport } from "./mcu-list.js";
import { MoonrakerRpcError } from "./rpc.js";
import { ServiceControl } from "./services.js";

export type { MoonrakerEndpoint } from "./transport.js";

/** Who the agent is to Moonraker and what it serves; see connection.ts. */
export type AgentSessionOptions = ConnectionOptions;

export class AgentSession implements PrinterPort {
  private readonly events = new EventEmitter();
  private readonly connection: MoonrakerConnection;
  private readonly klippy: KlippyFollower;
  private readonly services: ServiceControl;

  constructor(opts: AgentSessionOptions) {
    this.klippy = new KlippyFollower(opts.logger, () => this.connection.current);
    this.connection = new MoonrakerConnection(opts, {
      install: (peer, isCurrent) => this.klippy.install(peer, isCurrent),
      synchronise: (peer, isCurrent) => this.klippy.synchronise(peer, isCurrent),
      identified: () => {
        this.klippy.connected();
        this.events.emit("identified");
      },
      lost: (wasIdentified) => {
        this.klippy.lost();
        this.services.failAll("the Moonraker connection closed while waiting for a service to change state");
        if (wasIdentified) this.events.emit("disconnected");
      },
    });
    this.services = new ServiceControl(this.klippy.tracker, () => this.connection.requirePeer(), () => this.klippy.quicken());
  }

  get identified(): boolean {
    return this.connection.identified;
  }

  get connectionId(): number | null {
    return this.connection.connectionId;
  }

  on(event: "identified" | "disconnected", fn: () => void): this {
    this.events.on(event, fn);
    return this;
  }

  off(event: "identified" | "disconnected", fn: () => void): this {
    this.events.off(event, fn);
    return this;
  }

  start(): void {
    this.connection.start();
  }

  /** Closes the connection and stops reconnecting; pending service waits fail with MOONRAKER_UNAVAILABLE. */
  async stop(): Promise<void> {
    this.services.failAll("the Moonraker session was stopped");
    await this.connection.stop();
  }

  // ---- PrinterPort -------------------------------------------------------------------------------------

  state(): PrinterState {
    const state = this.klippy.tracker.state;
    return { ...state, services: { ...state.services } };
  }

  isPrinting(): boolean {
    return this.klippy.tracker.isPrinting();
  }

  onStateChange(listener: (state: PrinterState) => void): () => void {
    return this.klippy.tracker.onChange(listener);
  }

  stopService(service?: string, timeoutMs?: number): Promise<void> {
    return this.services.stop(service, timeoutMs);
  }

  startService(service?: string, timeoutMs?: number): Promise<void> {
    return this.services.start(service, timeoutMs);
  }

  async gcode(script: string): Promise<void> {
    const peer = this.connection.requirePeer();
    try {
      await peer.request("printer.gcode.script", { script });
    } catch (err) {
      if (isKlipperAway(err)) throw klipperNotConnected(err.message);
      throw requestFailed(err);
    }
  }

  async sendEvent(event: string, data?: unknown): Promise<void> {
    await this.call("connection.send_event", data === undefined ? { event } : { event, data });
  }

  async mcuReport(): Promise<McuReport> {
    const peer = this.connection.requirePeer();
    if (!this.klippy.tracker.state.klippyConnected) return { hostVersion: null, mcus: [] };
    return readMcuReport(peer);
  }

  /** The section names of Klipper's loaded config (configfile.settings, lower case); null while Klipper is away. */
  async configSections(): Promise<string[] | null> {
    if (!this.klippy.tracker.state.klippyConnected) return null;
    const result = asRecord(await this.call("printer.objects.query", { objects: { configfile: ["settings"] } }));
    const settings = asRecord(asRecord(asRecord(result?.status)?.configfile)?.settings);
    return settings ? Object.keys(settings) : null;
  }

  /** Moonraker's database namespaces (server.database.list). */
  async databaseNamespaces(): Promise<string[]> {
    const result = asRecord(await this.call("server.database.list"));
    return Array.isArray(result?.namespaces) ? result.namespaces.filter((n): n is string => typeof n === "string") : [];
  }

  /** A database item (dotted keys reach into objects); undefined when Moonraker answers that it does not exist. */
  async databaseGet(namespace: string, key: string): Promise<unknown> {
    const peer = this.connection.requirePeer();
    try {
      return asRecord(await peer.request("server.database.get_item", { namespace, key }))?.value;
    } catch (err) {
      if (err instanceof MoonrakerRpcError && err.code === 404) return undefined;
      throw requestFailed(err);
    }
  }

  async databasePost(namespace: string, key: string, value: unknown): Promise<void> {
    await this.call("server.database.post_item", { namespace, key, value });
  }

  async databaseDelete(namespace: string, key: string): Promise<void> {
    await this.call("server.database.delete_item", { namespace, key });
  }

  /**
   * server.webcams.post_item: adds (or, by name, updates) a webcam that Mainsail and Fluidd list; they render the
   * service "iframe" as a page in a frame. Answers the webcam as Moonraker stored it (uid included).
   */
  async webcamPost(item: { name: string; service: string; stream_url: string } & Record<string, unknown>): Promise<Record<string, unknown>> {
    return asRecord(asRecord(await this.call("server.webcams.post_item", item))?.webcam) ?? {};
  }

  /** server.webcams.delete_item by name; false when Moonraker has no webcam of that name. */
  async webcamDelete(name: string): Promise<boolean> {
    const peer = this.connection.requirePeer();
    try {
      await peer.request("server.webcams.delete_item", { name });
      return true;
    } catch (err) {
      if (err instanceof MoonrakerRpcError && err.code === 404) return false;
      throw requestFailed(err);
    }
  }

  async serialPeripherals(): Promise<SerialPeripheral[]> {
    const result = asRecord(await this.call("machine.peripherals.serial"));
    return Array.isArray(result?.serial_devices) ? (result.serial_devices as SerialPeripheral[]) : [];
  }

  async canbusNodes(iface: string): Promise<CanbusNode[]> {
    const result = asRecord(await this.call("machine.peripherals.canbus", { interface: iface }));
    return Array.isArray(result?.can_uuids) ? (result.can_uuids as CanbusNode[]) : [];
  }

  /**
   * server.extensions.request: calls a remote method of another agent (the CLI asking the moonflash service). An
   * error that agent answers comes back as its MoonflashError (code, message, details from the 424's data).
   */
  async agentRequest(agent: string, method: string, args: Record<string, unknown> = {}): Promise<unknown> {
    const peer = this.connection.requirePeer();
    try {
      return await peer.request("server.extensions.request", { agent, method, arguments: args });
    } catch (err) {
      const data = err instanceof MoonrakerRpcError ? asRecord(err.data) : undefined;
      const ours = asRecord(data?.data);
      if (typeof data?.message === "string" && typeof ours?.code === "string" && Object.hasOwn(ERROR_CODES, ours.code)) {
        throw new MoonflashError(ours.code as ErrorCode, data.message, asRecord(ours.details) ?? {});
      }
      throw requestFailed(err);
    }
  }

  private async call(method: string, params?: Record<string, unknown>): Promise<unknown> {
    const peer = this.connection.requirePeer();
    try {
      return await peer.request(method, params);
    } catch (err) {
      throw requestFailed(err);
    }
  }
}
