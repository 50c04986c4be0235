// OTA benchmarks (part of npm run bench): `moonflash serve`, started as the service is, downloads and installs packages
// from bench/file-server.mjs (its own process) through the fake Moonraker, as a client drives it.
// 1. Loopback throughput: curl beside moonflash's download phase, on the same 500 MB package from the same server.
// 2. 100 MB at 10 Mbit/s from the server paced to that rate.
// 3. Peak RSS of serve over a 500 MB download + install, beside an empty node process.
// 4. ota.status through Moonraker (server.extensions.request) while the 500 MB download runs at full speed.
// 5. [ota] callback_url: from each event's time to its POST at a receiver.
// 6. Bytes downloaded twice when the connection drops at 60 %.

import { createHash, randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, mkdtemp, open, rm, stat, writeFile } from "node:fs/promises";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { execa, type ResultPromise } from "execa";
import { packPackage } from "../src/ota/pack.js";
import { startFakeMoonraker, type FakeMoonraker } from "../test/support/fake-moonraker/index.js";
import { bundle, IDLE_TARGET_KIB, memoryKiB, root, SERVICE_ENV, sleep } from "./support.js";

const fileServer = join(root, "bench", "file-server.mjs");
const MB = 1_000_000;

export const OTA_TARGETS = {
  throughputRatio: 0.9,
  throttledSeconds: 84,
  peakOverEmptyKiB: 10 * 1024,
  statusP99Ms: 100,
  callbackMs: 500,
  redownloadFraction: 0.01,
} as const;

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
}


async function md5File(path: string): Promise<string> {
  const hash = createHash("md5");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

/** A package of `files` random files of `fileBytes` each (random: deflate cannot shrink them), packed by moonflash. */
async function makePackage(dir: string, name: string, files: number, fileBytes: number): Promise<{ path: string; size: number; md5: string; payload: number }> {
  const out = join(dir, `${name}.zip`);
  const sources = new Map<string, string>();
  await mkdir(join(dir, name), { recursive: true });
  for (let i = 0; i < files; i++) {
    const path = join(dir, name, `part${i}.bin`);
    const handle = await open(path, "w");
    for (let done = 0; done < fileBytes; done += MB) await handle.write(randomBytes(Math.min(MB, fileBytes - done)));
    await handle.close();
    sources.set(`data/part${i}.bin`, path);
  }
  await packPackage({
    manifest: { name, version: "1.0.0", modules: [{ id: "data", files: [...sources.keys()].map((src) => ({ src, dst: `data/${name}/${src.slice(5)}` })) }] },
    files: sources,
    out,
  });
  await rm(join(dir, name), { recursive: true, force: true });
  return { path: out, size: (await stat(out)).size, md5: await md5File(out), payload: files * fileBytes };
}

interface FileServer {
  url: string;
  stats(): Promise<{ bytesSent: number; requests: Array<{ range: string | null; status: number; bytes: number }> }>;
  close(): Promise<void>;
}

async function startFileServer(file: string, extra: string[] = []): Promise<FileServer> {
  const child: ResultPromise = execa("node", [fileServer, "--file", file, ...extra], { reject: false });
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout!.once("data", (data: Buffer) => resolve((JSON.parse(data.toString()) as { port: number }).port));
    void child.then((r) => reject(new Error(`file server exited: ${String(r.stderr)}`)));
  });
  const base = `http://127.0.0.1:${port}`;
  return {
    url: `${base}/package.zip`,
    stats: async () => (await (await fetch(`${base}/__stats`)).json()) as Awaited<ReturnType<FileServer["stats"]>>,
    close: async () => {
      child.kill("SIGTERM");
      await child;
    },
  };
}

/** A report receiver for [ota] callback_url: the latency of each report, from its event's time to its arrival. */
async function startReceiver(): Promise<{ url: string; latencies: number[]; close(): Promise<void> }> {
  const latencies: number[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const arrived = Date.now();
      const body = JSON.parse(Buffer.concat(chunks).toString()) as { ts: string };
      latencies.push(arrived - Date.parse(body.ts));
      res.writeHead(204).end();
    });
  });
  server.listen(0, "127.0.0.1");
  await new Promise((resolve) => server.once("listening", resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/api/v1.0/ota/report`,
    latencies,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

interface StageEvent {
  stage: string;
  at: number;
  jobId: string;
}

interface Printer {
  dir: string;
  moonraker: FakeMoonraker;
  serve: ResultPromise;
  /** "ota.stage" agent events seen by the client, with their times. */
  stages: StageEvent[];
  call(method: string, args?: Record<string, unknown>): Promise<unknown>;
  close(): Promise<void>;
}

/** serve with [ota] configured, registered to a fresh fake Moonraker, and a client connected to it. */
async function startPrinter(nodeOptions: string[], callbackUrl: string | null): Promise<Printer> {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-bench-ota-"));
  await mkdir(join(dir, "config"), { recursive: true });
  await mkdir(join(dir, "root"), { recursive: true });
  await writeFile(
    join(dir, "config", "moonflash.conf"),
    `[ota]\nroots:\n  data=${join(dir, "root")}\nprobation_timeout: 60\n${callbackUrl ? `callback_url: ${callbackUrl}\n` : ""}`,
  );
  const moonraker = await startFakeMoonraker({ dataDir: dir, timing: { readyMs: 200 } });
  const serve = execa("node", [...nodeOptions, bundle, "serve", "--data", dir], { ...SERVICE_ENV, reject: false, timeout: 900_000 });
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("ota.download"), 20_000);
  const client = await moonraker.connectClient({ transport: "unix" });
  const stages: StageEvent[] = [];
  client.onNotification((method, params) => {
    const event = (params as Array<{ event?: string; data?: { ts: string; stage: string; jobId: string } }> | undefined)?.[0];
    if (method === "notify_agent_event" && event?.event === "ota.stage" && event.data) {
      stages.push({ stage: event.data.stage, at: Date.parse(event.data.ts), jobId: event.data.jobId });
    }
  });
  return {
    dir,
    moonraker,
    serve,
    stages,
    call: (method, args) => client.call("server.extensions.request", { agent: "moonflash", method, ...(args ? { arguments: args } : {}) }),
    close: async () => {
      await client.close();
      serve.kill("SIGTERM");
      await serve;
      await moonraker.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Polls `pid`'s RSS every 50 ms (VmHWM would also keep start-up's peak, which is not the job's). */
function trackRss(pid: number): { stop(): number } {
  let peak = 0;
  const sample = (): void => {
    try {
      peak = Math.max(peak, memoryKiB(pid).rss);
    } catch {
      // exited
    }
  };
  sample();
  const timer = setInterval(sample, 50);
  return {
    stop: () => {
      clearInterval(timer);
      sample();
      return peak;
    },
  };
}

function between(stages: StageEvent[], from: string, to: string): number {
  const a = stages.find((s) => s.stage === from);
  const b = stages.find((s) => s.stage === to && (!a || s.jobId === a.jobId));
  if (!a || !b) throw new Error(`no ${from} → ${to} stage events: ${JSON.stringify(stages)}`);
  return (b.at - a.at) / 1000;
}

/**
 * The package hashed in this process (read from the page cache, 1 MB chunks): with MD5 alone, and with MD5 and
 * SHA-256 one after the other per chunk, as the download does. MD5 cannot be split over threads (each block needs
 * the one before), so no download that checks the MD5 of every byte finishes before MD5 alone does.
 */
async function hashSeconds(path: string, algorithms: string[]): Promise<number> {
  const hashes = algorithms.map((a) => createHash(a));
  const started = performance.now();
  for await (const chunk of createReadStream(path, { highWaterMark: MB })) for (const h of hashes) h.update(chunk as Buffer);
  for (const h of hashes) h.digest();
  return (performance.now() - started) / 1000;
}

/** curl's transfer of the file, then md5sum of what it wrote (a vendor script's check, from the page cache). */
async function curlSeconds(url: string, out: string): Promise<{ curl: number; md5sum: number }> {
  const { stdout } = await execa("curl", ["-s", "-f", "-o", out, "-w", "%{time_total}", url], { timeout: 300_000 });
  const started = performance.now();
  await execa("md5sum", [out], { timeout: 300_000 });
  const md5sum = (performance.now() - started) / 1000;
  await rm(out, { force: true });
  return { curl: Number(stdout), md5sum };
}

/** The empty node process, sampled as serve is: after a settle. */
async function emptyNodeKiB(): Promise<number> {
  const node = execa("node", ["-e", "setInterval(() => {}, 1 << 30)"], { ...SERVICE_ENV, reject: false, timeout: 120_000 });
  await sleep(30_000);
  const rss = memoryKiB(node.pid!).rss;
  node.kill("SIGTERM");
  await node;
  return rss;
}

export interface OtaBench {
  packageBytes: number;
  hashSeconds: number;
  md5Seconds: number;
  /** md5sum of curl's file, after each curl run (median). */
  md5sumSeconds: number;
  curlSeconds: number[];
  downloadSeconds: number[];
  throttled: { bytes: number; seconds: number; wireSeconds: number };
  memory: { emptyNodeKiB: number; idleKiB: number; downloadPeakKiB: number; installPeakKiB: number };
  status: { count: number; p50: number; p99: number; max: number };
  callback: { count: number; p50: number; p99: number; max: number };
  redownload: { size: number; served: number; requests: string[] };
}

const log = (line: string): void => void process.stdout.write(`${line}\n`);

type Pkg = Awaited<ReturnType<typeof makePackage>>;

/** curl, then a fresh serve's download phase, per run, from the same server. */
async function throughputRuns(nodeOptions: string[], big: Pkg, url: string, work: string, runs: number, hash: number): Promise<{ curl: number[]; md5sum: number[]; download: number[] }> {
  const curl: number[] = [];
  const md5sum: number[] = [];
  const download: number[] = [];
  for (let i = 1; i <= runs; i++) {
    const c = await curlSeconds(url, join(work, "curl.out"));
    curl.push(c.curl);
    md5sum.push(c.md5sum);
    const printer = await startPrinter(nodeOptions, null);
    try {
      await printer.call("ota.download", { url, md5: big.md5, size: big.size });
      download.push(between(printer.stages, "download", "verify"));
    } finally {
      await printer.close();
    }
    log(`  run ${i}: curl ${c.curl.toFixed(2)} s (then md5sum ${c.md5sum.toFixed(2)} s), moonflash download ${download.at(-1)!.toFixed(2)} s (hashing alone ${hash.toFixed(2)} s)`);
  }
  return { curl, md5sum, download };
}

/** Download (ota.status polled all along, reports to a receiver) and install in one serve; its RSS throughout. */
async function fullRun(nodeOptions: string[], big: Pkg, url: string): Promise<Pick<OtaBench, "memory" | "status" | "callback">> {
  const receiver = await startReceiver();
  const printer = await startPrinter(nodeOptions, receiver.url);
  try {
    // Its steady state first, as the idle figures are taken.
    await sleep(30_000);
    const idle = memoryKiB(printer.serve.pid!).rss;
    const rss = trackRss(printer.serve.pid!);
    const latencies: number[] = [];
    let downloading = true;
    const poll = (async () => {
      while (downloading) {
        const started = performance.now();
        await printer.call("ota.status");
        latencies.push(performance.now() - started);
        await sleep(20);
      }
    })();
    try {
      await printer.call("ota.download", { url, md5: big.md5, size: big.size });
    } finally {
      downloading = false;
      await poll;
    }
    const downloadPeak = rss.stop();
    const installRss = trackRss(printer.serve.pid!);
    const installed = (await printer.call("ota.install")) as { files?: { written?: number } };
    const installPeak = installRss.stop();
    if (installed.files?.written !== 4) throw new Error(`install did not write the 4 files: ${JSON.stringify(installed)}`);
    await sleep(1000);
    const empty = await emptyNodeKiB();
    const status = { count: latencies.length, p50: percentile(latencies, 50), p99: percentile(latencies, 99), max: Math.max(...latencies) };
    const callback = { count: receiver.latencies.length, p50: percentile(receiver.latencies, 50), p99: percentile(receiver.latencies, 99), max: Math.max(...receiver.latencies) };
    log(`  idle ${idle} KiB, download peak ${downloadPeak} KiB, install peak ${installPeak} KiB, empty node ${empty} KiB`);
    log(`  ota.status ${status.count} calls p50 ${status.p50.toFixed(1)} ms p99 ${status.p99.toFixed(1)} ms; callback ${callback.count} reports p50 ${callback.p50} ms p99 ${callback.p99} ms`);
    return { memory: { emptyNodeKiB: empty, idleKiB: idle, downloadPeakKiB: downloadPeak, installPeakKiB: installPeak }, status, callback };
  } finally {
    await printer.close();
    await receiver.close();
  }
}

/** One download from a server started with `serverArgs`; returns its download phase and what the server sent. */
async function singleDownload(nodeOptions: string[], pkg: Pkg, serverArgs: string[]) {
  const server = await startFileServer(pkg.path, serverArgs);
  try {
    const printer = await startPrinter(nodeOptions, null);
    try {
      await printer.call("ota.download", { url: server.url, md5: pkg.md5, size: pkg.size });
      return { seconds: between(printer.stages, "download", "verify"), stats: await server.stats() };
    } finally {
      await printer.close();
    }
  } finally {
    await server.close();
  }
}

export async function runOtaBench(nodeOptions: string[], runs: number): Promise<OtaBench> {
  const work = await mkdtemp(join(tmpdir(), "moonflash-bench-pkg-"));
  try {
    log("OTA: packing a 500 MB package (4 × 125 MB of random data)…");
    const big = await makePackage(work, "bench-500", 4, 125 * MB);
    const hash = await hashSeconds(big.path, ["md5", "sha256"]);
    const md5Only = await hashSeconds(big.path, ["md5"]);
    const server = await startFileServer(big.path);
    let speed: Awaited<ReturnType<typeof throughputRuns>>;
    let full: Pick<OtaBench, "memory" | "status" | "callback">;
    try {
      speed = await throughputRuns(nodeOptions, big, server.url, work, runs, hash);
      log("OTA: 500 MB download + install in serve, ota.status polled through Moonraker, reports to a callback_url…");
      full = await fullRun(nodeOptions, big, server.url);
    } finally {
      await server.close();
    }
    await rm(big.path, { force: true });

    log("OTA: 100 MB at 10 Mbit/s…");
    const small = await makePackage(work, "bench-100", 1, 100 * MB - 2000);
    const rate = 1_250_000;
    const paced = await singleDownload(nodeOptions, small, ["--rate", String(rate)]);
    const throttled = { bytes: small.size, seconds: paced.seconds, wireSeconds: small.size / rate };
    log(`  ${throttled.seconds.toFixed(1)} s (the wire alone: ${throttled.wireSeconds.toFixed(1)} s)`);

    log("OTA: the connection dropped at 60 %, then resumed…");
    const cut = await singleDownload(nodeOptions, small, ["--cut-once-at", String(Math.floor(small.size * 0.6))]);
    const redownload = { size: small.size, served: cut.stats.bytesSent, requests: cut.stats.requests.map((r) => `${r.range ?? "whole file"} → ${r.status}, ${r.bytes} bytes`) };
    log(`  served ${redownload.served} bytes for ${redownload.size}: ${redownload.requests.join("; ")}`);
    return { packageBytes: big.size, hashSeconds: hash, md5Seconds: md5Only, md5sumSeconds: [...speed.md5sum].sort((x, y) => x - y)[Math.floor(speed.md5sum.length / 2)]!, curlSeconds: speed.curl, downloadSeconds: speed.download, throttled, ...full, redownload };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** The OTA section of docs/BENCHMARKS.md. */
export function otaSection(b: OtaBench, serviceLabel: string): string[] {
  const mib = (k: number): string => `${(k / 1024).toFixed(1)} MiB`;
  const over = (k: number): string => `${k >= 0 ? "+" : "−"}${(Math.abs(k) / 1024).toFixed(1)} MiB`;
  const met = (ok: boolean): string => (ok ? "met" : "**missed**");
  const mbps = (bytes: number, s: number): string => `${(bytes / MB / s).toFixed(0)} MB/s`;
  const medianOf = (v: number[]): number => [...v].sort((x, y) => x - y)[Math.floor(v.length / 2)]!;
  const curl = medianOf(b.curlSeconds);
  const ours = medianOf(b.downloadSeconds);
  const ratio = curl / ours;
  const m = b.memory;
  const again = b.redownload.served - b.redownload.size;
  return [
    "## OTA",
    "",
    `\`${serviceLabel}\` (the service's command) registered to a fake Moonraker, driven by a client through`,
    "`server.extensions.request` as Mainsail or a macro would; the package server is bench/file-server.mjs in its own",
    "process (ETag, Range, If-Range; paced or cut on demand). Packages are made by `packPackage` from random data, which",
    `deflate cannot shrink. A fresh \`serve\` per measurement. Download time = from the job's \`download\` stage to its`,
    "`verify` stage (Moonraker agent events), so it holds the whole HTTP transfer, MD5 and SHA-256 of every byte, the",
    "checkpoints and the final fsync + rename.",
    "",
    "| measure | result | goal | |",
    "|---|---|---|---|",
    `| loopback, ${(b.packageBytes / MB).toFixed(0)} MB: curl -o (median of ${b.curlSeconds.length}) | ${curl.toFixed(2)} s (${mbps(b.packageBytes, curl)}) | | |`,
    `| loopback: curl -o, then md5sum of its file (medians) | ${(curl + b.md5sumSeconds).toFixed(2)} s (md5sum ${b.md5sumSeconds.toFixed(2)} s) | | |`,
    `| loopback: moonflash download (median of ${b.downloadSeconds.length}) | ${ours.toFixed(2)} s (${mbps(b.packageBytes, ours)}), **${ratio.toFixed(2)}×** curl | ≥ 0.9× curl | ${met(ratio >= OTA_TARGETS.throughputRatio)} |`,
    `| MD5 of the package alone (node:crypto), the floor of any download that checks it | ${b.md5Seconds.toFixed(2)} s (${mbps(b.packageBytes, b.md5Seconds)}): at best ${(curl / b.md5Seconds).toFixed(2)}× curl | | |`,
    `| MD5 + SHA-256 of the package alone, in one thread (node:crypto) | ${b.hashSeconds.toFixed(2)} s (${mbps(b.packageBytes, b.hashSeconds)}) | | |`,
    `| ${(b.throttled.bytes / MB).toFixed(0)} MB at 10 Mbit/s | ${b.throttled.seconds.toFixed(1)} s (the wire alone ${b.throttled.wireSeconds.toFixed(1)} s) | ≤ ${OTA_TARGETS.throttledSeconds} s | ${met(b.throttled.seconds <= OTA_TARGETS.throttledSeconds)} |`,
    `| peak RSS, ${(b.packageBytes / MB).toFixed(0)} MB download | ${mib(m.downloadPeakKiB)}, ${over(m.downloadPeakKiB - m.emptyNodeKiB)} over empty node (${over(m.downloadPeakKiB - m.idleKiB)} over the idle serve) | ≤ +${mib(OTA_TARGETS.peakOverEmptyKiB)} | ${met(m.downloadPeakKiB - m.emptyNodeKiB <= OTA_TARGETS.peakOverEmptyKiB)} |`,
    `| peak RSS, its install (check, extract, back up, deploy, probation) | ${mib(m.installPeakKiB)}, ${over(m.installPeakKiB - m.emptyNodeKiB)} over empty node (${over(m.installPeakKiB - m.idleKiB)} over the idle serve) | ≤ +${mib(OTA_TARGETS.peakOverEmptyKiB)} | ${met(m.installPeakKiB - m.emptyNodeKiB <= OTA_TARGETS.peakOverEmptyKiB)} |`,
    `| the same serve idle before (30 s settled); empty \`node -e\` | ${mib(m.idleKiB)} (${over(m.idleKiB - m.emptyNodeKiB)}); ${mib(m.emptyNodeKiB)} | | |`,
    `| \`ota.status\` through Moonraker during that download (${b.status.count} calls, one every 20 ms) | p50 ${b.status.p50.toFixed(1)} ms, p99 ${b.status.p99.toFixed(1)} ms, max ${b.status.max.toFixed(1)} ms | p99 < ${OTA_TARGETS.statusP99Ms} ms | ${met(b.status.p99 < OTA_TARGETS.statusP99Ms)} |`,
    `| callback_url: event time → POST received (${b.callback.count} reports, download + install) | p50 ${b.callback.p50} ms, p99 ${b.callback.p99} ms, max ${b.callback.max} ms | < ${OTA_TARGETS.callbackMs} ms | ${met(b.callback.max < OTA_TARGETS.callbackMs)} |`,
    `| connection cut at 60 % of ${(b.redownload.size / MB).toFixed(0)} MB, resumed | ${again} bytes sent twice (${((again / b.redownload.size) * 100).toFixed(2)} %): ${b.redownload.requests.join("; ")} | ≤ 1 % | ${met(again / b.redownload.size <= OTA_TARGETS.redownloadFraction)} |`,
    "",
    "Reading these figures:",
    ...throughputReading(b, curl, ours),
    "- Memory: Node reads each socket and file chunk into a fresh 64 KiB buffer that V8 frees only at its next young-",
    "  generation collection, which it times by its own heap, not by these buffers: a 500 MB stream piled up 40 MiB",
    "  first (serve peaked at +42 MiB over empty node before `--expose-gc` and src/core/gc-pacer.ts). The download now",
    "  copies each chunk into one of two fixed 256 KiB buffers and drops it at once (one is written while the other",
    "  fills), with a minor collection every 512 KiB and a major one every 64 MiB (buffers that lived through two minor",
    "  collections are promoted and stay until a major one; each costs about 10 ms); check, extraction and file copies",
    ...memoryReading(m, over),
    "",
  ];
}

/** Why the throughput is what it is, in the words its figures allow. */
function throughputReading(b: OtaBench, curl: number, ours: number): string[] {
  const best = curl / b.md5Seconds;
  const verdict =
    curl / ours >= OTA_TARGETS.throughputRatio
      ? "the goal is met"
      : best < OTA_TARGETS.throughputRatio
        ? "the goal of 0.9× cannot be met on this machine as written"
        : `possible only with MD5 alone on one of this machine's ${cpus().length} CPUs while SHA-256, the socket, the disk and the server shared the rest`;
  return [
    "- Throughput on loopback is bound by the CPU, not the link: the issue asks for MD5 and SHA-256 computed while",
    `  streaming, and on this machine MD5 alone takes ${b.md5Seconds.toFixed(2)} s for the package (both ${b.hashSeconds.toFixed(2)} s), ${(b.md5Seconds / curl).toFixed(2)}× curl's whole`,
    "  transfer (curl checks nothing). MD5 runs block after block on one core, so even with SHA-256, the socket and the",
    `  disk on other threads a download that checks it could reach ${best.toFixed(2)}× curl here at best: ${verdict}.`,
    `  Beside curl followed by md5sum (what a vendor's script checks) the download takes ${(ours / (curl + b.md5sumSeconds)).toFixed(2)}× the time. Hashing on`,
    `  a worker thread would cost RSS (a node worker thread adds about 11 MiB; the memory goal below) on ${cpus().length} CPUs the`,
    "  server shares. A printer's link is far slower than its hashing (at 10 Mbit/s the download takes the wire's",
    "  time). Checkpoints went from every 8 MiB to every 64 MiB or 5 s: an fsync every 8 MiB held a fast stream back",
    "  by about a third, and on a slow link the 5 s come first anyway.",
  ];
}

/** Where the peak of the download and install goes, and whether the goal can be met beside the idle agent. */
function memoryReading(m: OtaBench["memory"], over: (kib: number) => string): string[] {
  const idleShare = m.idleKiB - m.emptyNodeKiB;
  const worst = Math.max(m.downloadPeakKiB, m.installPeakKiB) - m.emptyNodeKiB;
  const left = OTA_TARGETS.peakOverEmptyKiB - idleShare;
  const verdict =
    worst <= OTA_TARGETS.peakOverEmptyKiB
      ? "The peaks meet the goal."
      : `The peaks are over the goal: ${over(idleShare)} of them is the idle agent (the service's own budget is ${over(IDLE_TARGET_KIB)}), which leaves the download and install ${over(left)}${left <= 0 ? ", nothing" : ""}.`;
  return [
    "  collect every 256/512 KiB and fully every 16 MiB.",
    `  ${verdict} The download takes ${over(m.downloadPeakKiB - m.idleKiB)} over the idle serve, the install ${over(m.installPeakKiB - m.idleKiB)}; of that about`,
    "  1.2 MiB is Node's own code for http, crypto and zlib run for the first time (file-backed, in every process that",
    "  downloads), the rest V8's young generation and the glibc heap the buffers come from.",
  ];
}
