// The port holder of the status page: it listens at once, loads the page on the first connection (and only once),
// hands it the sockets unread, and with bind 0.0.0.0 (the default) answers on every address of the host.

import { afterEach, describe, expect, it } from "vitest";
import { createServer as createHttpServer } from "node:http";
import { createServer, type Socket } from "node:net";
import pino from "pino";
import { listenForPage, type StatusListener } from "../../src/status/listener.js";

const logger = pino({ level: "silent" });
const open: StatusListener[] = [];
afterEach(async () => {
  for (const l of open.splice(0)) await l.close();
});

function helloPage(): { loads: number; load: () => Promise<{ accept(socket: Socket): void; close(): Promise<void> }> } {
  const state = {
    loads: 0,
    load: async () => {
      state.loads++;
      const http = createHttpServer((req, res) => res.end(`hello ${req.url}`));
      return { accept: (socket: Socket) => http.emit("connection", socket), close: async () => http.closeAllConnections() };
    },
  };
  return state;
}

describe("status page listener", () => {
  it("with bind 0.0.0.0 answers on 127.0.0.1, loading the page once, on the first connection", async () => {
    const page = helloPage();
    const l = await listenForPage({ host: "0.0.0.0", port: 0, logger, load: page.load });
    open.push(l);
    expect(page.loads).toBe(0);
    expect(await (await fetch(`http://127.0.0.1:${l.port}/a`)).text()).toBe("hello /a");
    expect(await (await fetch(`http://127.0.0.1:${l.port}/b`)).text()).toBe("hello /b");
    expect(page.loads).toBe(1);
  });

  it("a port another program holds on every address is PORT_UNAVAILABLE naming [status_page] port", async () => {
    const squatter = createServer();
    await new Promise<void>((resolve) => squatter.listen(0, resolve));
    const port = (squatter.address() as { port: number }).port;
    try {
      await expect(listenForPage({ host: "0.0.0.0", port, logger, load: helloPage().load })).rejects.toMatchObject({
        code: "PORT_UNAVAILABLE",
        message: expect.stringContaining("[status_page] port"),
      });
    } finally {
      await new Promise((resolve) => squatter.close(resolve));
    }
  });
});
