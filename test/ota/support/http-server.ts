// A real node:http server on 127.0.0.1 for download tests. It serves one file at every path, honours Range and
// If-Range like a correct server, and misbehaves on demand, one request at a time: status codes, cut or stalled
// bodies, lying Content-Range or ETag, no answer at all, chunked or close-delimited bodies, redirects. It records
// every request with the body bytes it sent, so tests can assert what went over the wire.

import { once } from "node:events";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";

/** How to answer one request. Unset fields mean "behave correctly". */
export interface Behavior {
  /** Answer with this status and a short text body instead of the file (e.g. 500, 503, 404). */
  status?: number;
  /** Extra headers for that status answer (e.g. Retry-After). */
  headers?: Record<string, string>;
  /** Answer 302 to this location. */
  redirect?: string;
  /** Accept the request and never answer. */
  noResponse?: boolean;
  /** Answer every Range request with 200 and the whole file. */
  ignoreRange?: boolean;
  /** Serve the range even when If-Range names another version. */
  ignoreIfRange?: boolean;
  /** Content-Range to send with a 206 instead of the right one; null sends none. */
  contentRange?: string | null;
  /** Send this many body bytes, then close the connection (headers still announce the whole body). */
  cutAfter?: number;
  /** Send this many body bytes, then go silent with the connection open. */
  stallAfter?: number;
  /** No Content-Length: chunked transfer encoding. */
  chunked?: boolean;
  /** No Content-Length and no chunking: the end of the body is the connection closing (raw HTTP/1.1). */
  closeDelimited?: boolean;
  /** Runs before the answer is chosen, e.g. to change the served file. */
  onRequest?: () => void;
}

export interface RequestRecord {
  index: number;
  path: string;
  range: string | undefined;
  ifRange: string | undefined;
  acceptEncoding: string | undefined;
  /** Status sent, null when no answer was sent. */
  status: number | null;
  /** Body bytes written to the socket for this request. */
  bytesSent: number;
}

export interface ServedFile {
  body: Buffer;
  /** null: no ETag header. */
  etag: string | null;
  /** null: no Last-Modified header. */
  lastModified: string | null;
}

export class TestHttpServer {
  readonly requests: RequestRecord[] = [];
  /** Answers for the coming requests, in order; after them `fallback` decides, then correct behaviour. */
  private readonly planned: Behavior[] = [];
  fallback: ((record: RequestRecord) => Behavior | undefined) | null = null;
  private readonly sockets = new Set<Socket>();
  private port = 0;

  private constructor(
    private file: ServedFile,
    private readonly server: Server,
  ) {
    server.on("connection", (socket: Socket) => {
      this.sockets.add(socket);
      socket.on("close", () => this.sockets.delete(socket));
    });
    server.on("request", (req: IncomingMessage, res: ServerResponse) => this.answer(req, res));
  }

  /** Starts a server for `body` on 127.0.0.1 at a free port. */
  static async start(file: Partial<ServedFile> & { body: Buffer }): Promise<TestHttpServer> {
    const server = new TestHttpServer({ etag: '"v1"', lastModified: "Wed, 21 Oct 2026 07:28:00 GMT", ...file }, createServer());
    await server.listen(0);
    return server;
  }

  url(path = "/pkg.zip"): string {
    return `http://127.0.0.1:${this.port}${path}`;
  }

  /** Serves another file from now on (a new release, a corrupted copy, the copy restored). */
  setFile(file: Partial<ServedFile> & { body: Buffer }): void {
    this.file = { ...this.file, ...file };
  }

  /** Behaviours for the next requests, one each. */
  plan(...behaviors: Behavior[]): void {
    this.planned.push(...behaviors);
  }

  /** Body bytes sent over all requests. */
  bytesSent(): number {
    return this.requests.reduce((sum, r) => sum + r.bytesSent, 0);
  }

  /** The server goes down: no more listening, open connections dropped. The port is kept for `resume`. */
  async stop(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const socket of this.sockets) socket.destroy();
    await closed;
  }

  /** The server comes back on the same port. */
  async resume(): Promise<void> {
    await this.listen(this.port);
  }

  async close(): Promise<void> {
    if (this.server.listening) await this.stop();
  }

  private async listen(port: number): Promise<void> {
    this.server.listen(port, "127.0.0.1");
    await once(this.server, "listening");
    this.port = (this.server.address() as AddressInfo).port;
  }

  private answer(req: IncomingMessage, res: ServerResponse): void {
    const record: RequestRecord = {
      index: this.requests.length,
      path: req.url ?? "",
      range: req.headers.range,
      ifRange: req.headers["if-range"] as string | undefined,
      acceptEncoding: req.headers["accept-encoding"],
      status: null,
      bytesSent: 0,
    };
    this.requests.push(record);
    const behavior = this.planned.shift() ?? this.fallback?.(record) ?? {};
    behavior.onRequest?.();
    if (behavior.noResponse) return;
    if (behavior.status !== undefined) {
      record.status = behavior.status;
      const text = `status ${behavior.status}\n`;
      res.writeHead(behavior.status, { "content-type": "text/plain", "content-length": Buffer.byteLength(text), ...behavior.headers });
      res.end(text);
      return;
    }
    if (behavior.redirect !== undefined) {
      record.status = 302;
      res.writeHead(302, { location: behavior.redirect, "content-length": 0 });
      res.end();
      return;
    }

    const { body, etag, lastModified } = this.file;
    const size = body.length;
    let start = 0;
    let partial = false;
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    const ifRange = req.headers["if-range"] as string | undefined;
    const sameVersion = ifRange === undefined || ifRange === etag || ifRange === lastModified || behavior.ignoreIfRange === true;
    if (range && !behavior.ignoreRange && sameVersion) {
      start = Number(range[1]);
      if (start >= size) {
        record.status = 416;
        res.writeHead(416, { "content-range": `bytes */${size}`, "content-length": 0 });
        res.end();
        return;
      }
      partial = true;
    }
    const status = partial ? 206 : 200;
    record.status = status;
    const headers: Record<string, string | number> = { "content-type": "application/zip", "accept-ranges": "bytes" };
    if (etag !== null) headers.etag = etag;
    if (lastModified !== null) headers["last-modified"] = lastModified;
    if (partial) {
      const contentRange = behavior.contentRange === undefined ? `bytes ${start}-${size - 1}/${size}` : behavior.contentRange;
      if (contentRange !== null) headers["content-range"] = contentRange;
    }
    const data = body.subarray(start);
    const limit = behavior.cutAfter ?? behavior.stallAfter;
    const sent = limit === undefined ? data : data.subarray(0, limit);
    record.bytesSent = sent.length;

    if (behavior.closeDelimited) {
      // Written on the raw socket: Node's server would pick chunked encoding for a body without a length.
      const socket = req.socket;
      const lines = [`HTTP/1.1 ${status} ${partial ? "Partial Content" : "OK"}`, "connection: close", ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`)];
      socket.write(`${lines.join("\r\n")}\r\n\r\n`);
      socket.write(sent);
      if (behavior.stallAfter === undefined) socket.end();
      return;
    }
    if (!behavior.chunked) headers["content-length"] = data.length;
    res.writeHead(status, headers);
    if (behavior.cutAfter !== undefined) {
      // A graceful close (FIN) after the bytes are out: the client sees a body shorter than announced.
      res.write(sent, () => req.socket.end());
    } else if (behavior.stallAfter !== undefined) {
      res.write(sent);
    } else {
      res.end(sent);
    }
  }
}
