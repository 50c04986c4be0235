// A vendor's report endpoint for [ota] callback_url, on 127.0.0.1.

import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { once } from "node:events";
import type { AddressInfo } from "node:net";

export interface Report {
  seq: number;
  event: string;
  job_id: string;
  target: string;
  stage?: string;
  ok?: boolean;
  code?: string;
  message?: string;
  done?: number;
  total?: number;
  status: { state: string } | null;
  at: number;
}

/** A vendor's report endpoint: records every body; answers with `reply` (a status code, or "stall" never to answer). */
export class Receiver {
  readonly reports: Report[] = [];
  readonly requests: Array<{ method: string; url: string; contentType: string | undefined; userAgent: string | undefined; authorization: string | undefined }> = [];
  reply: number | "stall" = 200;
  /** Stalled requests whose client closed the connection. */
  closedUnanswered = 0;
  private server: Server | null = null;
  private readonly stalled: ServerResponse[] = [];

  constructor(readonly port: number) {}

  static async freePort(): Promise<number> {
    const probe = createServer();
    probe.listen(0, "127.0.0.1");
    await once(probe, "listening");
    const { port } = probe.address() as AddressInfo;
    await new Promise((resolve) => probe.close(resolve));
    return port;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}/api/v1.0/ota/report`;
  }

  async listen(): Promise<void> {
    this.server = createServer((req: IncomingMessage, res: ServerResponse) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        this.requests.push({ method: req.method ?? "", url: req.url ?? "", contentType: req.headers["content-type"], userAgent: req.headers["user-agent"], authorization: req.headers.authorization });
        if (this.reply === "stall") {
          this.stalled.push(res);
          res.on("close", () => {
            if (!res.writableEnded) this.closedUnanswered += 1;
          });
          return;
        }
        if (this.reply >= 200 && this.reply < 300) this.reports.push({ ...(JSON.parse(Buffer.concat(chunks).toString("utf8")) as Report), at: Date.now() });
        res.writeHead(this.reply).end();
      });
    });
    this.server.listen(this.port, "127.0.0.1");
    await once(this.server, "listening");
  }

  async close(): Promise<void> {
    for (const res of this.stalled.splice(0)) res.destroy();
    this.server?.closeAllConnections();
    await new Promise((resolve) => (this.server ? this.server.close(resolve) : resolve(undefined)));
    this.server = null;
  }
}
