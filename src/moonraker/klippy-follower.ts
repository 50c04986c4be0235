// Following Klipper through Moonraker: the system info (service states, the Klipper unit's name), Klippy's state
// and message, and the printer objects that say whether it prints. Moonraker notifies ready, shutdown and
// disconnect, but sends nothing when Klippy reaches startup or error, so while Klipper is not ready we poll
// server.info, as Mainsail does. Everything lands in the KlipperTracker.

import type { Logger } from "pino";
import { KlipperTracker, asRecord, type ServerInfo, type SystemInfo } from "./klipper-tracker.js";
import { MoonrakerRpcError, type RpcPeer } from "./rpc.js";
import type { ServiceState } from "../core/printer.js";

const KLIPPY_POLL_INITIAL_MS = 500;
const KLIPPY_POLL_MAX_MS = 5_000;
const SUBSCRIBED_OBJECTS = { webhooks: null, print_stats: null, idle_timeout: null };

export class KlippyFollower {
  readonly tracker: KlipperTracker;
  /** Bumped on every start/stop of the poll so that a poll in flight from an older round ends. */
  private pollRound = 0;
  private polling = false;
  private pollDelayMs = KLIPPY_POLL_INITIAL_MS;
  private pollTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly log: Logger,
    /** The connection's current peer (null between connections). */
    private readonly currentPeer: () => RpcPeer | null,
  ) {
    this.tracker = new KlipperTracker(log);
  }

  /** Notification handlers for a new connection. */
  install(peer: RpcPeer, isCurrent: () => boolean): void {
    peer.handle("notify_klippy_ready", async () => {
      if (!isCurrent()) return;
      this.tracker.klippyReady();
      await this.subscribe(peer).catch((err: unknown) => this.log.debug({ err }, "subscribing after ready failed"));
    });
    peer.handle("notify_klippy_shutdown", async () => {
      if (!isCurrent()) return;
      this.tracker.klippyShutdown();
      this.startPoll();
    });
    peer.handle("notify_klippy_disconnected", async () => {
      if (!isCurrent()) return;
      this.tracker.klippyDisconnected();
      this.startPoll();
    });
    peer.handle("notify_status_update", async ({ params }) => {
      const status = Array.isArray(params) ? asRecord(params[0]) : undefined;
      if (isCurrent() && status) this.tracker.status(status);
    });
    peer.handle("notify_service_state_changed", async ({ params }) => {
      const changes = Array.isArray(params) ? asRecord(params[0]) : undefined;
      if (isCurrent() && changes) this.tracker.serviceStateChanged(toServiceStates(changes));
    });
  }

  /** Reads everything once on a new connection: system info, then Klippy. */
  async synchronise(peer: RpcPeer, isCurrent: () => boolean): Promise<void> {
    try {
      const result = await peer.request<{ system_info?: unknown }>("machine.system_info");
      if (isCurrent()) this.tracker.systemInfo((asRecord(result.system_info) ?? {}) as SystemInfo);
    } catch (err) {
      if (!(err instanceof MoonrakerRpcError)) throw err;
      this.log.warn({ reason: err.message }, "machine.system_info failed; assuming the Klipper unit is 'klipper'");
    }
    const info = await peer.request<ServerInfo>("server.info");
    if (!isCurrent()) return;
    this.tracker.serverInfo(info);
    if (info.klippy_connected === true && info.klippy_state === "ready") await this.subscribe(peer);
    else {
      await this.readStateMessage(peer, info);
      this.startPoll();
    }
  }

  connected(): void {
    this.tracker.moonrakerConnected();
  }

  lost(): void {
    this.stopPoll();
    this.tracker.moonrakerLost();
  }

  /** While Klipper is being started: the poll may have slowed to its cap, and an error start must be seen soon. */
  quicken(): void {
    if (!this.polling) return;
    this.stopPoll();
    this.startPoll();
  }

  /** Klipper connected but not ready (startup, error, shutdown): its state message says why, e.g. MCU Protocol error. */
  private async readStateMessage(peer: RpcPeer, info: ServerInfo): Promise<void> {
    if (info.klippy_connected !== true) return;
    try {
      const printer = await peer.request<{ state?: unknown; state_message?: unknown }>("printer.info");
      if (peer === this.currentPeer()) this.tracker.printerInfo(printer);
    } catch (err) {
      this.log.debug({ err }, "printer.info failed while Klipper is not ready");
    }
  }

  /** Moonraker drops subscriptions whenever Klipper disconnects, so this runs after every ready. */
  private async subscribe(peer: RpcPeer): Promise<void> {
    this.stopPoll();
    try {
      const result = await peer.request<{ status?: unknown }>("printer.objects.subscribe", { objects: SUBSCRIBED_OBJECTS });
      const status = asRecord(result.status);
      if (peer === this.currentPeer() && status) this.tracker.status(status);
    } catch (err) {
      if (!(err instanceof MoonrakerRpcError)) throw err;
      // Klipper went away between the ready and our request.
      this.log.debug({ reason: err.message }, "subscribing to Klipper objects failed; polling server.info");
      if (peer === this.currentPeer()) this.startPoll();
    }
  }

  private startPoll(): void {
    if (this.polling || !this.currentPeer()) return;
    this.polling = true;
    this.pollDelayMs = KLIPPY_POLL_INITIAL_MS;
    this.schedulePoll(++this.pollRound);
  }

  private stopPoll(): void {
    this.polling = false;
    this.pollRound++;
    if (this.pollTimer) clearTimeout(this.pollTimer);
    this.pollTimer = null;
  }

  private schedulePoll(round: number): void {
    const delay = this.pollDelayMs;
    this.pollDelayMs = Math.min(this.pollDelayMs * 2, KLIPPY_POLL_MAX_MS);
    this.pollTimer = setTimeout(() => void this.poll(round), delay);
  }

  private async poll(round: number): Promise<void> {
    this.pollTimer = null;
    const peer = this.currentPeer();
    const stillPolling = (): boolean => round === this.pollRound && peer === this.currentPeer();
    if (!peer || !stillPolling()) return;
    try {
      const info = await peer.request<ServerInfo>("server.info");
      if (!stillPolling()) return;
      this.tracker.serverInfo(info);
      if (info.klippy_connected === true && info.klippy_state === "ready") {
        await this.subscribe(peer);
        return;
      }
      await this.readStateMessage(peer, info);
    } catch (err) {
      this.log.debug({ err }, "polling server.info failed");
    }
    if (stillPolling()) this.schedulePoll(round);
  }
}

function toServiceStates(changes: Record<string, unknown>): Record<string, ServiceState> {
  const states: Record<string, ServiceState> = {};
  for (const [name, value] of Object.entries(changes)) {
    const entry = asRecord(value);
    if (typeof entry?.active_state !== "string") continue;
    states[name] = {
      active_state: entry.active_state,
      sub_state: typeof entry.sub_state === "string" ? entry.sub_state : "",
    };
  }
  return states;
}
