// The shipped OTA_ macros (moonraker/moonflash.cfg) end to end: the fake Moonraker's simulated Klipper renders them
// with real Jinja2 and Klipper's action_call_remote_method(method, **kwargs), the real agent answers on the console.
// Each macro reaches its remote method with the parameters typed (SIZE= as a number); missing or bad parameters are
// refused by name; a whole update (download, install, status, rollback) runs from the console.

import { afterEach, describe, expect, it } from "vitest";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describeOta, type OtaStatusResult } from "../../src/agent/methods.js";
import { NEW_FILES, OLD_FILES, sha256Of, startOtaPrinter, type OtaPrinter } from "./support/ota-printer.js";

let printer: OtaPrinter | null = null;

afterEach(async () => {
  await printer?.close();
  printer = null;
});

/** PARAM= names a macro's description documents: "OTA_DOWNLOAD URL=<…> MD5=<…> [SHA256=<…>]" → URL, MD5, SHA256. */
function documentedParams(description: string): string[] {
  return [...description.matchAll(/\b([A-Z][A-Z0-9_]*)=/g)].map((m) => m[1]!);
}

function remoteCalls(p: OtaPrinter): Array<{ method: unknown; params: unknown; viaMacro: unknown }> {
  return p.logs.filter((r) => r.msg === "remote call").map((r) => ({ method: r.method, params: r.params, viaMacro: r.viaMacro }));
}

/** Runs a macro as a Mainsail user would (printer.gcode.script) and waits for the console line that answers it. */
async function macro(p: OtaPrinter, script: string, answer: RegExp | string, timeoutMs = 10_000): Promise<string> {
  const before = p.moonraker.consoleLines.length;
  await p.web!.call("printer.gcode.script", { script });
  const matches = (l: string): boolean => (typeof answer === "string" ? l === answer : answer.test(l));
  await p.moonraker.waitFor(() => p.moonraker.consoleLines.slice(before).some(matches), timeoutMs).catch((err: unknown) => {
    throw new Error(`${script}: no console line ${String(answer)}; it showed: ${JSON.stringify(p.moonraker.consoleLines.slice(before))}`, { cause: err });
  });
  return p.moonraker.consoleLines.slice(before).find(matches)!;
}

describe("the OTA_ macros through Klipper's macro path", () => {
  it("each description says what it does and names its parameters", async () => {
    printer = await startOtaPrinter();
    const macros = [...printer.moonraker.klipper.macros].filter(([name]) => name.startsWith("OTA_"));
    expect(macros.map(([name]) => name).sort()).toEqual(["OTA_CANCEL", "OTA_DOWNLOAD", "OTA_INSTALL", "OTA_ROLLBACK", "OTA_STATUS"]);
    for (const [, m] of macros) expect(m.description).toMatch(/^moonflash: \w.{20,}/);
    const download = printer.moonraker.klipper.macros.get("OTA_DOWNLOAD")!.description;
    expect(download).toContain("OTA_DOWNLOAD URL=<https://…/package.zip> MD5=<32 hex digits> [SHA256=<64 hex digits>] [SIZE=<bytes>]");
    expect(documentedParams(download)).toEqual(["URL", "MD5", "SHA256", "SIZE"]);
    for (const name of ["OTA_STATUS", "OTA_INSTALL", "OTA_CANCEL", "OTA_ROLLBACK"]) {
      expect(printer.moonraker.klipper.macros.get(name)!.description).toMatch(/No parameters\.$/);
    }
  });

  it("refuses a missing or bad parameter by name, and says what is missing before anything is downloaded", async () => {
    const p = (printer = await startOtaPrinter());
    await p.startAgent();
    await macro(
      p,
      "OTA_DOWNLOAD",
      "!! moonflash: OTA_DOWNLOAD failed [INVALID_PARAMS] OTA_DOWNLOAD: URL: required: the package's http:// or https:// URL, MD5: required: the package's MD5, 32 hex digits",
    );
    await macro(
      p,
      `OTA_DOWNLOAD URL=${p.download.url} MD5=${p.download.md5} SIZE=big`,
      "!! moonflash: OTA_DOWNLOAD failed [INVALID_PARAMS] OTA_DOWNLOAD: SIZE: expected the package's size in bytes, a whole number",
    );
    await macro(
      p,
      `OTA_DOWNLOAD URL=${p.download.url} MD5=${p.download.md5} SHA=${p.download.sha256}`,
      "!! moonflash: OTA_DOWNLOAD failed [INVALID_PARAMS] OTA_DOWNLOAD: unknown parameter(s) 'SHA'",
    );
    await macro(p, "OTA_INSTALL", /^!! moonflash: OTA_INSTALL failed \[NO_PACKAGE\] There is no verified package to install\. Download one first/);
    expect(remoteCalls(p)).toEqual([
      { method: "ota.download", params: {}, viaMacro: true },
      { method: "ota.download", params: { url: p.download.url, md5: p.download.md5, size: "big" }, viaMacro: true },
      { method: "ota.download", params: { url: p.download.url, md5: p.download.md5, sha: p.download.sha256 }, viaMacro: true },
      { method: "ota.install", params: {}, viaMacro: true },
    ]);
    expect(p.server.requests).toEqual([]);
    expect(p.agent!.runner.history()).toEqual([]);
    expect(p.moonraker.consoleLines.filter((l) => l.includes("Error evaluating"))).toEqual([]);
  });

  it("every OTA_ macro with every parameter it documents: download, status, install, rollback, cancel from the console", { timeout: 30_000 }, async () => {
    const p = (printer = await startOtaPrinter());
    await p.startAgent();
    const url = p.download.url;
    const cases = [
      { script: "OTA_STATUS", method: "ota.status", params: {}, answer: "// moonflash: no OTA update has been downloaded yet. Download one with OTA_DOWNLOAD URL=<package url> MD5=<md5>." },
      {
        script: `OTA_DOWNLOAD URL=${url} MD5=${p.download.md5} SHA256=${p.download.sha256} SIZE=${p.download.size}`,
        method: "ota.download",
        // SIZE= arrives as a number: the macro casts it.
        params: { url, md5: p.download.md5, sha256: p.download.sha256, size: p.download.size },
        answer: `// moonflash: OTA download ${url}: acme-printer 2.0.0 downloaded and verified (${p.pkg.length} bytes, 3 modules, not signed). Install it with OTA_INSTALL.`,
      },
      { script: "OTA_STATUS", method: "ota.status", params: {}, answer: "// moonflash: OTA package acme-printer 2.0.0 is downloaded and verified. Install it with OTA_INSTALL." },
      {
        script: "OTA_INSTALL",
        method: "ota.install",
        params: {},
        answer: /^\/\/ moonflash: OTA acme-printer 2\.0\.0: installed: 3 files \(2 replaced, 1 new\), firmware of toolhead flashed\. /,
      },
      { script: "OTA_STATUS", method: "ota.status", params: {}, answer: "// moonflash: acme-printer 2.0.0 is installed. OTA_ROLLBACK restores what was there before it." },
      {
        script: "OTA_ROLLBACK",
        method: "ota.rollback",
        params: {},
        answer: "// moonflash: OTA rollback: acme-printer 2.0.0 rolled back: 2 files restored, 1 removed, firmware of toolhead restored. The previous version is in place.",
      },
      { script: "OTA_CANCEL", method: "ota.cancel", params: {}, answer: "!! moonflash: OTA_CANCEL failed [NO_JOB] No ota job is running, so there is nothing to cancel." },
    ];
    // The table covers every OTA_ macro and every parameter its description documents.
    const macros = [...p.moonraker.klipper.macros].filter(([name]) => name.startsWith("OTA_"));
    expect([...new Set(cases.map((c) => c.script.split(" ")[0]))].sort()).toEqual(macros.map(([name]) => name).sort());
    for (const [name, m] of macros) {
      const typed = cases.find((c) => c.script.split(" ")[0] === name)!.script;
      for (const param of documentedParams(m.description)) expect(typed).toContain(` ${param}=`);
    }

    for (const c of cases) {
      await macro(p, c.script, c.answer);
      expect(remoteCalls(p).at(-1)).toEqual({ method: c.method, params: c.params, viaMacro: true });
      if (c.method === "ota.install") {
        expect(await p.read("config/printer.cfg")).toBe(NEW_FILES["cfg/printer.cfg"]);
        expect(p.board.model.flash.subarray(0, p.newImage.length).equals(p.newImage)).toBe(true);
      }
    }
    expect(remoteCalls(p)).toHaveLength(cases.length);
    for (const [path, content] of Object.entries(OLD_FILES)) expect(await p.read(path)).toBe(content);
    expect(p.board.model.flash.subarray(0, p.oldImage.length).equals(p.oldImage)).toBe(true);
    expect(JSON.parse(await readFile(join(p.dir, "moonflash", "ota", "mcu-devices.json"), "utf8"))["mcu toolhead"].serial).toBe(p.board.path);
    expect(sha256Of(p.pkg)).toBe(p.download.sha256);
    expect(p.moonraker.consoleLines.filter((l) => l.includes("Error evaluating"))).toEqual([]);
    // Console lines name what happened, never a job id.
    expect(p.moonraker.consoleLines.filter((l) => /ota-\d{8}T/.test(l))).toEqual([]);
  });
});

describe("OTA_STATUS's line for each state", () => {
  const base: OtaStatusResult = {
    state: "idle", stage: null, updateId: null, package: null, url: null, bytes: null, percent: null, speed: null, eta: null,
    module: null, file: null, lastError: null, installed: null, history: [], job: null, other: null, last: [],
  };
  const pkg = { name: "acme-k1", version: "1.4.0", size: 1234 };
  const job = { id: "ota-20261123T124500-ab12", kind: "ota" as const, target: "acme-k1 1.4.0", stage: "deploy", progress: null, startedAt: "2026-11-23T12:45:00.000Z", cancellable: false };

  it.each<[string, Partial<OtaStatusResult>, string]>([
    ["a running download", { state: "downloading", package: null, url: "https://x/k1.zip", percent: 42.5, eta: 12, job: { ...job, target: "download https://x/k1.zip", stage: "download" } }, "moonflash: OTA downloading https://x/k1.zip: download 42.5%, 12 s left"],
    ["a running install", { state: "deploying", package: pkg, percent: 50, module: { index: 2, count: 3, id: "webcam" }, job }, "moonflash: OTA deploying acme-k1 1.4.0: deploy 50%, module webcam (2/3)"],
    ["an interrupted download", { state: "downloading", url: "https://x/k1.zip" }, "moonflash: the download of https://x/k1.zip stopped before it finished. OTA_DOWNLOAD with the same URL resumes it."],
    ["a failed update", { state: "failed", lastError: { code: "SIGNATURE_INVALID", message: "bad signature." } }, "moonflash: the last OTA update failed [SIGNATURE_INVALID] bad signature."],
    ["an automatic rollback", { state: "rolled_back", package: pkg, lastError: { code: "HEALTH_CHECK_FAILED", message: "Klipper did not come up" }, installed: { updateId: "ota-1", name: "acme-k1", version: "1.3.0" } }, "moonflash: acme-k1 1.4.0 was rolled back after [HEALTH_CHECK_FAILED] Klipper did not come up. The previous version is in place. Installed: acme-k1 1.3.0."],
    ["a deploy left by a dead process", { state: "probation", package: pkg }, "moonflash: the update acme-k1 1.4.0 was interrupted (probation). It is rolled back when the agent starts, or now with OTA_ROLLBACK."],
    ["a flash job meanwhile", { state: "verified", package: pkg, other: { id: "flash-1", kind: "flash", target: "mcu toolhead" } }, "moonflash: OTA package acme-k1 1.4.0 is downloaded and verified. Install it with OTA_INSTALL. A flash job on toolhead is running."],
  ])("%s", (_what, status, line) => {
    expect(describeOta({ ...base, ...status })).toBe(line);
  });
});
