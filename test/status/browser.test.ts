// The status page in a real browser (Debian's chromium, driven by playwright-core), framed as Mainsail frames an
// "iframe" webcam: it connects, follows a running update live without a reload, shows the result and the history,
// says "reconnecting…" when the server goes away and comes back by itself. Saves test-results/status-page.png.

import { existsSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { resolve } from "node:path";
import { chromium, type Browser, type Frame, type Page } from "playwright-core";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MoonflashError } from "../../src/core/errors.js";
import { startStatusPage } from "../../src/status/page-server.js";
import { deferred, startFixture, type PageFixture } from "./support.js";

// Page functions run in the browser. The page's CSP forbids eval, so they are functions, not strings; this project's
// types have no DOM, so these name the little they use.
declare const document: {
  getElementById(id: string): { textContent: string | null; children: { length: number } } | null;
  querySelectorAll(selector: string): { length: number };
};
declare const window: { loadedOnce?: boolean };

const CHROMIUM = process.env.MOONFLASH_CHROMIUM ?? "/usr/bin/chromium";
const SCREENSHOT = resolve(import.meta.dirname, "../../test-results/status-page.png");

describe("status page in a browser", () => {
  let browser: Browser;
  let f: PageFixture;

  beforeAll(async () => {
    f = await startFixture();
  });
  afterAll(async () => {
    await browser?.close();
    await f?.cleanup();
  });

  async function framedPage(): Promise<{ page: Page; frame: Frame; problems: string[] }> {
    const page = await browser.newPage({ viewport: { width: 640, height: 760 } });
    const problems: string[] = [];
    page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
    // A CSP that blocked the inline script or style would show here.
    page.on("console", (m) => {
      if (m.type() === "error" && !/Failed to load resource|ERR_CONNECTION_REFUSED/.test(m.text())) problems.push(m.text());
    });
    await page.setContent(`<body style="margin:0;background:#000"><iframe src="${f.url("/")}" style="border:0;width:600px;height:720px"></iframe></body>`);
    const handle = await page.waitForSelector("iframe");
    const frame = (await handle.contentFrame())!;
    await frame.waitForSelector("#live:text('live')", { timeout: 5_000 });
    return { page, frame, problems };
  }

  it("follows an update of several boards live, inside an iframe, and reconnects by itself", async () => {
    // In the test, not in a hook: a missing browser fails this test (a hook's failure would show it as skipped).
    if (!existsSync(CHROMIUM)) {
      throw new Error(`Chromium is missing (${CHROMIUM}): install it with "sudo apt-get install -y chromium" (.ci/run does). The test never downloads a browser.`);
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--disable-gpu"] });
    // Something in the history first.
    await f.runner.run({ kind: "flash", target: "mcu toolhead" }, async () => {
      throw new MoonflashError("DEVICE_NOT_FOUND", "The serial device /dev/serial/by-id/usb-Klipper_rp2040-if00 is not present.");
    }).catch(() => {});
    await f.runner.run({ kind: "flash", target: "mcu" }, async () => undefined);

    const { page, frame, problems } = await framedPage();
    // The mark would be gone after a reload.
    await frame.evaluate(() => void (window.loadedOnce = true));
    expect(await frame.textContent("#history")).toContain("DEVICE_NOT_FOUND");

    const gate = deferred();
    const reached = deferred();
    const job = f.runner.run({ kind: "flash", target: "all MCUs" }, async (ctx) => {
      ctx.stage("check", "checking which MCUs need new firmware");
      ctx.stage("build", "building the firmware of toolhead", { name: "toolhead", index: 1, count: 2 });
      ctx.stage("build", "building the firmware of mcu", { name: "mcu", index: 2, count: 2 });
      f.printer.set({ klippyConnected: false, klippyState: "disconnected", printState: null });
      ctx.stage("flash", "flashing toolhead (1 of 2)", { name: "toolhead", index: 1, count: 2 });
      ctx.stage("write", "Writing 28672 bytes");
      ctx.log("info", "Katapult 0.0.1 on stm32g0b1xx, block size 64, application at 0x8002000");
      ctx.log("warn", "block 12: no answer, sent again");
      for (let done = 0; done <= 18432; done += 2048) {
        ctx.progress(done, 28672, "bytes", "write");
        await new Promise((r) => setTimeout(r, 30));
      }
      reached.resolve();
      await gate.promise;
      ctx.progress(28672, 28672, "bytes", "write");
      ctx.stage("flash", "flashing mcu (2 of 2)", { name: "mcu", index: 2, count: 2 });
      f.printer.set({ klippyConnected: true, klippyState: "ready", printState: "standby" });
      return { mcus: [{ name: "toolhead", flashed: true }, { name: "mcu", flashed: true }] };
    });

    await reached.promise;
    await frame.waitForFunction(
      () =>
        Number.parseInt(document.getElementById("pct")?.textContent ?? "", 10) >= 50 &&
        (document.getElementById("stage")?.textContent ?? "").startsWith("write") &&
        document.getElementById("log")?.children.length === 2,
      undefined,
      { timeout: 5_000 },
    );
    expect(await frame.textContent("#pct")).toMatch(/^6\d% write$/);
    expect(await frame.textContent("#amount")).toBe("18.0 KiB / 28.0 KiB");
    expect(await frame.textContent("#label")).toBe("all MCUs");
    expect(await frame.textContent("#printer")).toContain("Klipper stopped for the job");
    expect(await frame.$$eval("#boards tr", (rows) => rows.map((r) => r.textContent))).toEqual(["toolheadflashing (1 of 2)64%", "mcubuilt, waiting"]);
    expect(await frame.getAttribute("#log li.warn", "class")).toBe("warn");
    expect(await frame.evaluate(() => window.loadedOnce)).toBe(true);
    await mkdir(resolve(SCREENSHOT, ".."), { recursive: true });
    await page.waitForTimeout(400); // the bar's width transition
    await page.screenshot({ path: SCREENSHOT });

    gate.resolve();
    await job;
    await frame.waitForSelector("#jstate:text('done')", { timeout: 5_000 });
    await frame.waitForFunction(() => document.querySelectorAll("#history li").length === 3, undefined, { timeout: 5_000 });
    expect(await frame.textContent("#printer")).toContain("Klipper ready");
    expect(await frame.textContent("#pct")).toBe("100% write");

    // The server goes away (the agent restarts): the page says so, and comes back without a reload.
    const port = f.page.port;
    await f.page.close();
    await frame.waitForSelector("#live:text('reconnecting')", { timeout: 5_000 });
    const logger = pino({ level: "silent" });
    const again = await startStatusPage({ runner: f.runner, printer: f.printer, host: "127.0.0.1", port, logger, version: "0.1.0-test" });
    f.page = again;
    await frame.waitForSelector("#live:text('live')", { timeout: 10_000 });
    expect(await frame.evaluate(() => window.loadedOnce)).toBe(true);
    expect(problems).toEqual([]);
    await page.close();
  });
});
