// The status page as a webcam. While Klipper is stopped Mainsail and Fluidd show nothing of a job, but both keep
// showing webcams, and render one of service "iframe" as a page in a frame (mainsail
// src/components/webcams/streamers/HtmlIframe.vue, fluidd src/components/widgets/camera/services/IframeCamera.vue).
// So during a job, once Klipper has stopped, the page is added as a webcam (server.webcams.post_item); when the job
// ends it is removed. Added after the stop, not before: Fluidd blanks an iframe it showed before Klipper stopped
// until the page is reloaded, and renders one that appears later.

import { networkInterfaces } from "node:os";
import type { Logger } from "pino";
import type { JobRunner } from "../core/jobs.js";
import type { PrinterPort } from "../core/printer.js";

export const STATUS_WEBCAM_NAME = "moonflash";

/** What the adapter needs of the agent session. */
export interface WebcamPort extends Pick<PrinterPort, "state" | "onStateChange"> {
  webcamPost(item: { name: string; service: string; stream_url: string } & Record<string, unknown>): Promise<unknown>;
  webcamDelete(name: string): Promise<boolean>;
}

/**
 * The page's address as the user's browser reaches it: `public_url` when configured (a proxy, a name), else this
 * host's first LAN IPv4 address. Both UIs resolve a webcam's relative URL against their own origin, which has no
 * way to name another port, so the address is absolute. 127.0.0.1 only when the host has no other address.
 */
export function statusPageUrl(port: number, publicUrl: string | null, interfaces = networkInterfaces()): string {
  if (publicUrl) return publicUrl;
  const lan = Object.values(interfaces)
    .flat()
    .find((a) => a && a.family === "IPv4" && !a.internal);
  return `http://${lan?.address ?? "127.0.0.1"}:${port}/`;
}

export class StatusWebcam {
  /** The webcam is (as far as this process knows) in Moonraker's list. */
  private registered = false;
  /** Webcam requests run one after another, so an add and the remove that follows it cannot cross. */
  private chain: Promise<void> = Promise.resolve();
  private readonly unsubscribers: Array<() => void> = [];

  constructor(
    private readonly opts: {
      printer: WebcamPort;
      runner: Pick<JobRunner, "on" | "current">;
      url: string;
      logger: Logger;
    },
  ) {
    this.unsubscribers.push(opts.runner.on(this.onJobEvent));
    this.unsubscribers.push(opts.printer.onStateChange(() => this.update()));
  }

  close(): void {
    for (const u of this.unsubscribers) u();
  }

  /** Waits for the requests in flight (tests, and a stopping agent). */
  settled(): Promise<void> {
    return this.chain;
  }

  /**
   * Removes a webcam an earlier process left (killed during a job): called on each connection to Moonraker, which
   * keeps webcams in its database, so without this one would stay on the dashboard for good. While Klipper is still
   * away it stays until Klipper is back, as after a job.
   */
  cleanUp(): void {
    if (this.opts.runner.current()) return;
    if (!this.opts.printer.state().klippyConnected) {
      this.registered = true;
      return;
    }
    this.registered = false;
    this.enqueue(async () => {
      if (await this.opts.printer.webcamDelete(STATUS_WEBCAM_NAME)) this.opts.logger.info("removed the status-page webcam an earlier moonflash left");
    });
  }

  private readonly onJobEvent = (): void => this.update();

  /**
   * Adds the webcam when a job runs, Klipper is away and Moonraker is there; removes it once no job runs and Klipper
   * is back. A job that ended with Klipper still down keeps it: the page then shows why.
   */
  private update(): void {
    const s = this.opts.printer.state();
    if (!s.moonrakerConnected) return;
    const running = this.opts.runner.current() !== null;
    if (!this.registered && running && !s.klippyConnected) {
      this.registered = true;
      this.enqueue(() => this.add());
    } else if (this.registered && !running && s.klippyConnected) {
      this.registered = false;
      this.enqueue(() => this.remove());
    }
  }

  private async add(): Promise<void> {
    try {
      await this.opts.printer.webcamPost({
        name: STATUS_WEBCAM_NAME,
        service: "iframe",
        stream_url: this.opts.url,
        snapshot_url: "",
        aspect_ratio: "4:3",
        icon: "mdiRaspberryPi",
        location: "printer",
        enabled: true,
      });
      this.opts.logger.info({ url: this.opts.url }, "status page shown as the webcam 'moonflash' while Klipper is stopped");
    } catch (err) {
      // Tried again on the next state change (Moonraker back, say).
      this.registered = false;
      this.opts.logger.warn({ err }, "could not add the status page as a webcam");
    }
  }

  private async remove(): Promise<void> {
    try {
      await this.opts.printer.webcamDelete(STATUS_WEBCAM_NAME);
      this.opts.logger.info("status-page webcam removed: Klipper is back");
    } catch (err) {
      // Moonraker away: cleanUp() removes it on the next connection.
      this.opts.logger.warn({ err }, "could not remove the status-page webcam; it is removed when moonflash next connects");
    }
  }

  private enqueue(step: () => Promise<void>): void {
    this.chain = this.chain.then(step, step).catch((err: unknown) => this.opts.logger.warn({ err }, "status-page webcam"));
  }
}
