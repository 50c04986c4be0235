// The status page's port, held by a plain net listener until the page is needed. An idle agent then carries no
// node:http and no page code (the agent already has net for Moonraker's socket): the page is loaded when the first
// browser connects or the first job starts, and the sockets that arrived meanwhile are handed to it unread
// (pauseOnConnect; http.Server takes a socket through its "connection" event).

import { once } from "node:events";
import { createServer, type Server, type Socket } from "node:net";
import type { AddressInfo } from "node:net";
import type { Logger } from "pino";
import { MoonflashError } from "../core/errors.js";

/** What takes the connections once loaded: the page's HTTP server. */
export interface ConnectionSink {
  accept(socket: Socket): void;
  close(): Promise<void>;
}

export interface StatusListener {
  readonly port: number;
  readonly host: string;
  /** Loads the page now (idempotent); connections wait for it. Rejections are logged and tried again later. */
  load(): Promise<void>;
  close(): Promise<void>;
}

/** Listens on host:port; `load` builds what serves the connections, once, when first needed. */
export async function listenForPage(opts: { host: string; port: number; logger: Logger; load: () => Promise<ConnectionSink> }): Promise<StatusListener> {
  let sink: Promise<ConnectionSink> | null = null;
  const load = (): Promise<ConnectionSink> => {
    sink ??= opts.load().catch((err: unknown) => {
      sink = null;
      throw err;
    });
    return sink;
  };
  const server: Server = createServer({ pauseOnConnect: true }, (socket) => {
    load().then(
      (s) => {
        s.accept(socket);
        socket.resume();
      },
      (err: unknown) => {
        opts.logger.error({ err }, "the status page could not be loaded");
        socket.destroy();
      },
    );
  });
  // Every address: no host given, so Node listens on :: (IPv4 too, or 0.0.0.0 where there is no IPv6) without
  // looking the address up, which would load node:dns and c-ares into an idle agent (about 0.25 MiB).
  if (opts.host === "0.0.0.0") server.listen(opts.port);
  else server.listen(opts.port, opts.host);
  try {
    await Promise.race([once(server, "listening"), once(server, "error").then(([err]) => Promise.reject(err as Error))]);
  } catch (err) {
    throw listenError(err, opts.host, opts.port);
  }
  // Later errors of the listener (none expected once listening) must not take the agent down.
  server.on("error", (err) => opts.logger.error({ err }, "status page listener"));
  let closing: Promise<void> | null = null;
  return {
    port: (server.address() as AddressInfo).port,
    host: opts.host,
    load: async () => {
      await load();
    },
    close: () =>
      (closing ??= (async () => {
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        await (await sink?.catch(() => null))?.close();
        await closed;
      })()),
  };
}

export function listenError(err: unknown, host: string, port: number): MoonflashError {
  const errno = (err as NodeJS.ErrnoException).code;
  const where = `${host}:${port}`;
  const message =
    errno === "EADDRINUSE"
      ? `Port ${port} (${where}) is already in use by another program, so the status page cannot start. Set another port in moonflash.conf ([status_page] port), or stop the program that uses it.`
      : errno === "EACCES"
        ? `The status page may not listen on ${where}: ports below 1024 need root. Set [status_page] port to 1024 or above in moonflash.conf.`
        : errno === "EADDRNOTAVAIL"
          ? `The status page cannot listen on ${where}: ${host} is not an address of this machine. Set [status_page] bind to one of its addresses, or 0.0.0.0 for all.`
          : `The status page cannot listen on ${where} (${errno ?? String(err)}). Set another [status_page] port or bind in moonflash.conf.`;
  return new MoonflashError("PORT_UNAVAILABLE", message, { host, port, errno: errno ?? null }, { cause: err });
}
