// The JSON-RPC peer over real sockets: tiny servers of our own stand in for Moonraker's wire behaviour.

import fs from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import type { IncomingMessage } from "node:http";
import { pino } from "pino";
import { WebSocketServer } from "ws";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { isMoonflashError } from "../../src/core/errors.js";
import { EtxDecoder, MoonrakerRpcError, RpcPeer } from "../../src/moonraker/index.js";

const logger = pino({ level: "silent" });
const ETX = Buffer.of(0x03);

interface Request {
  id?: number;
  method?: string;
  params?: unknown;
  result?: unknown;
  error?: { code: number; message: string; data?: unknown };
}

/** A unix-socket server that hands every decoded message (and its socket) to the test. */
async function startUnixServer(dir: string, onMessage: (msg: Request, socket: net.Socket) => void) {
  const socketPath = path.join(dir, "moonraker.sock");
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    const decoder = new EtxDecoder();
    socket.on("data", (chunk: Buffer) => {
      for (const text of decoder.push(chunk)) onMessage(JSON.parse(text) as Request, socket);
    });
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  return {
    socketPath,
    sockets,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

function frame(message: object): Buffer {
  return Buffer.concat([Buffer.from(JSON.stringify(message), "utf8"), ETX]);
}

function newPeer(): RpcPeer {
  return new RpcPeer({ logger, requestTimeoutMs: 2_000, connectTimeoutMs: 2_000 });
}

describe("EtxDecoder", () => {
  it("returns merged messages separately and keeps a split message until its ETX", () => {
    const decoder = new EtxDecoder();
    const both = Buffer.concat([frame({ a: 1 }), frame({ b: "é" })]);
    const third = frame({ c: "Grüße" });
    // Split inside the two-byte "ü" so that decoding early would corrupt it.
    const cut = third.indexOf(0xc3) + 1;
    expect(decoder.push(Buffer.concat([both, third.subarray(0, cut)]))).toEqual(['{"a":1}', '{"b":"é"}']);
    expect(decoder.push(third.subarray(cut, cut + 2))).toEqual([]);
    expect(decoder.push(third.subarray(cut + 2))).toEqual(['{"c":"Grüße"}']);
  });
});

describe("RpcPeer over the unix socket", () => {
  let dir: string;
  let closeServer: (() => Promise<void>) | undefined;

  beforeEach(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "moonflash-rpc-"));
  });
  afterEach(async () => {
    await closeServer?.();
    closeServer = undefined;
    await fs.rm(dir, { recursive: true, force: true });
  });

  it("matches out-of-order replies by id when they arrive merged and split across chunks", async () => {
    const pending: Array<{ msg: Request; socket: net.Socket }> = [];
    const server = await startUnixServer(dir, (msg, socket) => {
      pending.push({ msg, socket });
      if (pending.length < 3) return;
      const replies = pending.reverse().map(({ msg: req }) =>
        frame({ jsonrpc: "2.0", id: req.id, result: { echo: req.method, text: "Grüße" } }),
      );
      const bytes = Buffer.concat(replies);
      const cut = bytes.indexOf(0xc3) + 1; // inside the first "ü"
      socket.write(bytes.subarray(0, cut));
      setTimeout(() => socket.write(bytes.subarray(cut)), 20);
    });
    closeServer = server.close;
    const peer = newPeer();
    await peer.connect({ kind: "unix", path: server.socketPath });

    const results = await Promise.all([peer.request("one"), peer.request("two"), peer.request("three")]);

    expect(results).toEqual([
      { echo: "one", text: "Grüße" },
      { echo: "two", text: "Grüße" },
      { echo: "three", text: "Grüße" },
    ]);
    peer.close();
  });

  it("turns a Moonraker error answer into a MoonrakerRpcError with its code and message", async () => {
    const server = await startUnixServer(dir, (msg, socket) => {
      socket.write(frame({ jsonrpc: "2.0", id: msg.id, error: { code: 503, message: "Klippy Host not connected" } }));
    });
    closeServer = server.close;
    const peer = newPeer();
    await peer.connect({ kind: "unix", path: server.socketPath });

    const failure = peer.request("printer.info");

    await expect(failure).rejects.toBeInstanceOf(MoonrakerRpcError);
    await expect(failure).rejects.toMatchObject({ code: 503, message: "Klippy Host not connected", method: "printer.info" });
    peer.close();
  });

  it("fails pending requests with MOONRAKER_UNAVAILABLE when the connection closes", async () => {
    const server = await startUnixServer(dir, (_msg, socket) => socket.destroy());
    closeServer = server.close;
    const peer = newPeer();
    const closed = new Promise<void>((resolve) => peer.onClose(() => resolve()));
    await peer.connect({ kind: "unix", path: server.socketPath });

    const failure = peer.request("server.info").catch((err: unknown) => err);

    const err = await failure;
    expect(isMoonflashError(err) && err.code).toBe("MOONRAKER_UNAVAILABLE");
    await closed;
    await expect(peer.request("server.info")).rejects.toMatchObject({ code: "MOONRAKER_UNAVAILABLE" });
  });

  it("answers requests from Moonraker, never answers notifications, and says -32601 for unknown methods", async () => {
    const received: Request[] = [];
    const server = await startUnixServer(dir, (msg) => received.push(msg));
    closeServer = server.close;
    const calls: Array<{ params: unknown; expectsReply: boolean }> = [];
    const peer = newPeer();
    peer.handle("agent.echo", async ({ params, expectsReply }) => {
      calls.push({ params, expectsReply });
      return { got: params };
    });
    peer.handle("agent.fail", async () => {
      throw new Error("boom");
    });
    await peer.connect({ kind: "unix", path: server.socketPath });
    const [socket] = [...server.sockets];
    if (!socket) throw new Error("no server-side socket");

    socket.write(
      Buffer.concat([
        frame({ jsonrpc: "2.0", method: "agent.echo", params: { a: 1 } }),
        frame({ jsonrpc: "2.0", method: "agent.echo", id: 140381075166048, params: { b: 2 } }),
        frame({ jsonrpc: "2.0", method: "agent.fail", id: 7 }),
        frame({ jsonrpc: "2.0", method: "agent.nope", id: 8 }),
        frame({ jsonrpc: "2.0", method: "notify_proc_stat_update", params: [{}] }),
      ]),
    );
    await waitUntil(() => received.length >= 3);

    expect(calls).toEqual([
      { params: { a: 1 }, expectsReply: false },
      { params: { b: 2 }, expectsReply: true },
    ]);
    const byId = new Map(received.map((msg) => [msg.id, msg]));
    expect(byId.get(140381075166048)?.result).toEqual({ got: { b: 2 } });
    expect(byId.get(7)?.error).toEqual({ code: 500, message: "boom", data: { code: "INTERNAL", details: {} } });
    expect(byId.get(8)?.error).toEqual({ code: -32601, message: "Method not found" });
    expect(received).toHaveLength(3);
    peer.close();
  });
});

describe("RpcPeer over the websocket", () => {
  let wss: WebSocketServer | undefined;
  afterEach(async () => {
    for (const client of wss?.clients ?? []) client.terminate();
    await new Promise<void>((resolve) => (wss ? wss.close(() => resolve()) : resolve()));
    wss = undefined;
  });

  async function startWsServer(apiKey: string): Promise<{ url: string; headers: Array<string | undefined> }> {
    const headers: Array<string | undefined> = [];
    const server = new WebSocketServer({
      host: "127.0.0.1",
      port: 0,
      path: "/websocket",
      verifyClient: ({ req }: { req: IncomingMessage }) => {
        const key = req.headers["x-api-key"];
        headers.push(typeof key === "string" ? key : undefined);
        return key === apiKey;
      },
    });
    server.on("connection", (socket) => {
      socket.on("message", (data) => {
        const msg = JSON.parse(data.toString()) as Request;
        socket.send(JSON.stringify({ jsonrpc: "2.0", id: msg.id, result: { method: msg.method } }));
      });
    });
    await new Promise<void>((resolve) => server.once("listening", () => resolve()));
    wss = server;
    const address = server.address();
    if (address === null || typeof address === "string") throw new Error("unexpected address");
    return { url: `ws://127.0.0.1:${address.port}/websocket`, headers };
  }

  it("sends X-Api-Key at upgrade and then talks JSON-RPC in text frames", async () => {
    const server = await startWsServer("s3cret");
    const peer = newPeer();

    await peer.connect({ kind: "ws", url: server.url, apiKey: "s3cret" });

    expect(server.headers).toEqual(["s3cret"]);
    await expect(peer.request("server.info")).resolves.toEqual({ method: "server.info" });
    peer.close();
  });

  it("fails to connect without the api key the server wants", async () => {
    const server = await startWsServer("s3cret");
    const peer = newPeer();

    await expect(peer.connect({ kind: "ws", url: server.url })).rejects.toThrow(/401/);
    expect(server.headers).toEqual([undefined]);
  });
});

async function waitUntil(condition: () => boolean, timeoutMs = 2_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
