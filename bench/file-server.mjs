// The package server of the OTA benchmarks, in its own process so that it does not share a thread with what is
// measured: one file from disk at every path, with ETag, Range and If-Range as a correct server answers them.
//
//   node bench/file-server.mjs --file PATH [--rate BYTES_PER_SECOND] [--cut-once-at BYTES]
//
// --rate paces each response's body (a 10 Mbit/s link: 1250000). --cut-once-at closes the first response's
// connection after that many body bytes, as a dropped link does. Prints {"port": N} once listening.
// GET /__stats answers {requests: [{range, status, bytes}], bytesSent} for everything served so far.

import { createServer } from "node:http";
import { open, stat } from "node:fs/promises";
import { parseArgs } from "node:util";

const { values } = parseArgs({ options: { file: { type: "string" }, rate: { type: "string" }, "cut-once-at": { type: "string" } } });
if (!values.file) throw new Error("--file is required");
const file = values.file;
const rate = values.rate ? Number(values.rate) : 0;
let cutAt = values["cut-once-at"] ? Number(values["cut-once-at"]) : -1;

const info = await stat(file);
const size = info.size;
const etag = `"${size.toString(16)}-${Math.floor(info.mtimeMs).toString(16)}"`;
const CHUNK = 256 * 1024;
const requests = [];
let bytesSent = 0;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Writes [start, end] of the file, paced to `rate` bytes per second, stopping after `cut` bytes (-1: never). */
async function sendBody(res, start, end, record, cut) {
  const handle = await open(file, "r");
  const began = Date.now();
  try {
    let at = start;
    while (at <= end) {
      if (res.destroyed) return;
      let length = Math.min(rate > 0 ? 16 * 1024 : CHUNK, end - at + 1);
      if (cut >= 0) length = Math.min(length, cut - record.bytes);
      if (length <= 0) {
        res.socket?.destroy();
        return;
      }
      const buffer = Buffer.allocUnsafe(length);
      const { bytesRead } = await handle.read(buffer, 0, length, at);
      const ok = res.write(bytesRead === length ? buffer : buffer.subarray(0, bytesRead));
      at += bytesRead;
      record.bytes += bytesRead;
      bytesSent += bytesRead;
      if (!ok) await new Promise((resolve) => res.once("drain", resolve));
      if (rate > 0) {
        const due = began + ((at - start) * 1000) / rate;
        const wait = due - Date.now();
        if (wait > 0) await sleep(wait);
      }
    }
    res.end();
  } finally {
    await handle.close();
  }
}

const server = createServer((req, res) => {
  if (req.url === "/__stats") {
    res.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify({ requests, bytesSent }));
    return;
  }
  const range = req.headers.range;
  const record = { range: range ?? null, status: 200, bytes: 0 };
  requests.push(record);
  let start = 0;
  let end = size - 1;
  const match = range ? /^bytes=(\d+)-(\d*)$/.exec(range) : null;
  const ifRange = req.headers["if-range"];
  if (match && (!ifRange || ifRange === etag)) {
    start = Number(match[1]);
    if (match[2]) end = Math.min(Number(match[2]), size - 1);
    if (start >= size) {
      record.status = 416;
      res.writeHead(416, { "Content-Range": `bytes */${size}` }).end();
      return;
    }
    record.status = 206;
    res.writeHead(206, { "Content-Length": end - start + 1, "Content-Range": `bytes ${start}-${end}/${size}`, ETag: etag, "Accept-Ranges": "bytes" });
  } else {
    res.writeHead(200, { "Content-Length": size, ETag: etag, "Accept-Ranges": "bytes", "Content-Type": "application/zip" });
  }
  if (req.method === "HEAD") {
    res.end();
    return;
  }
  const cut = cutAt;
  cutAt = -1;
  sendBody(res, start, end, record, cut).catch((err) => {
    process.stderr.write(`file-server: ${err}\n`);
    res.destroy();
  });
});

server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`);
});
process.on("SIGTERM", () => process.exit(0));
