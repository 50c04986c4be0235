// Services through Moonraker (machine.services.*): a stop or start counts as done only once Moonraker reports the
// new state (notify_service_state_changed), and for Klipper once Klippy has left "startup". A wait cannot be
// judged without Moonraker, so a lost connection fails it at once; the caller asks the real state after the
// reconnect.

import { MoonflashError } from "../core/errors.js";
import type { ServiceState } from "../core/printer.js";
import type { KlipperTracker } from "./klipper-tracker.js";
import { unavailable } from "./failures.js";
import { MoonrakerRpcError, type RpcPeer } from "./rpc.js";

const DEFAULT_STOP_TIMEOUT_MS = 60_000;
const DEFAULT_START_TIMEOUT_MS = 120_000;
// The service request itself may take as long as the wait; the wait, not the request, reports the timeout.
const SERVICE_REQUEST_GRACE_MS = 5_000;

interface StateWaiter {
  check(): boolean;
  resolve(): void;
  reject(err: Error): void;
}

export class ServiceControl {
  private readonly waiters = new Set<StateWaiter>();

  constructor(
    private readonly tracker: KlipperTracker,
    private readonly requirePeer: () => RpcPeer,
    /** Told before Klipper is started, so that its state is polled quickly. */
    private readonly beforeKlipperStart: () => void,
  ) {
    tracker.onChange(() => this.settle());
  }

  async stop(service?: string, timeoutMs = DEFAULT_STOP_TIMEOUT_MS): Promise<void> {
    const peer = this.requirePeer();
    const unit = service ?? this.tracker.state.klipperService;
    const stopped = (): boolean => isStopped(this.tracker.state.services[unit]);
    if (stopped()) return;
    await this.action(peer, "stop", unit, stopped, timeoutMs);
  }

  async start(service?: string, timeoutMs = DEFAULT_START_TIMEOUT_MS): Promise<void> {
    const peer = this.requirePeer();
    const unit = service ?? this.tracker.state.klipperService;
    const started = (): boolean => {
      const state = this.tracker.state;
      const klippyNeeded = unit === state.klipperService;
      // Klipper is up once it left "startup": ready, or error/shutdown (e.g. another MCU still outdated), which
      // the caller reports; Moonraker says "connected" ~1 s before Klipper finished starting.
      const klippyUp = state.klippyConnected && state.klippyState !== "startup";
      return state.services[unit]?.active_state === "active" && (!klippyNeeded || klippyUp);
    };
    if (started()) return;
    if (unit === this.tracker.state.klipperService) this.beforeKlipperStart();
    await this.action(peer, "start", unit, started, timeoutMs);
  }

  /** Every pending wait fails with MOONRAKER_UNAVAILABLE (connection lost, or the session stopped). */
  failAll(reason: string): void {
    for (const waiter of [...this.waiters]) waiter.reject(unavailable(reason));
  }

  private async action(
    peer: RpcPeer,
    action: "stop" | "start",
    unit: string,
    reached: () => boolean,
    timeoutMs: number,
  ): Promise<void> {
    const wanted = action === "stop" ? "stopped" : "running";
    const wait = this.waitFor(reached, timeoutMs, () => {
      const seconds = Math.round(timeoutMs / 100) / 10;
      return new MoonflashError(
        "SERVICE_TIMEOUT",
        `Moonraker did not report the service '${unit}' ${wanted} within ${seconds} s. ` +
          `Check the service (e.g. systemctl status ${unit}) and Moonraker's log, then try again.`,
        { service: unit, action, timeoutMs },
      );
    });
    const request = peer
      .request(`machine.services.${action}`, { service: unit }, timeoutMs + SERVICE_REQUEST_GRACE_MS)
      .then(
        () => undefined,
        (err: unknown) => {
          if (err instanceof MoonrakerRpcError) {
            throw new MoonflashError(
              "SERVICE_FAILED",
              `Moonraker could not ${action} the service '${unit}': ${err.message}. ` +
                `Check that '${unit}' is listed in moonraker.asvc and that Moonraker may manage it.`,
              { service: unit, action, rpcCode: err.code },
            );
          }
          throw err;
        },
      );
    try {
      await Promise.all([request, wait.promise]);
    } finally {
      wait.cancel();
    }
  }

  private waitFor(
    reached: () => boolean,
    timeoutMs: number,
    timeoutError: () => MoonflashError,
  ): { promise: Promise<void>; cancel(): void } {
    let waiter!: StateWaiter;
    const finish = (): void => {
      clearTimeout(timer);
      this.waiters.delete(waiter);
    };
    const promise = new Promise<void>((resolve, reject) => {
      waiter = {
        check: reached,
        resolve: () => {
          finish();
          resolve();
        },
        reject: (err) => {
          finish();
          reject(err);
        },
      };
    });
    this.waiters.add(waiter);
    const timer = setTimeout(() => waiter.reject(timeoutError()), timeoutMs);
    return { promise, cancel: finish };
  }

  private settle(): void {
    for (const waiter of [...this.waiters]) {
      if (waiter.check()) waiter.resolve();
    }
  }
}

function isStopped(state: ServiceState | undefined): boolean {
  return state?.active_state === "inactive" || state?.active_state === "failed";
}
