// What the status page takes out of every text before a browser sees it.

import { describe, expect, it } from "vitest";
import { redactText, shownText } from "../../src/status/redact.js";
import { safeUrl } from "../../src/core/url.js";

describe("redactText", () => {
  it.each([
    ["download https://user:s3cret@example.com/pkg.zip?token=abc#frag", "download https://example.com/pkg.zip"],
    ["ws://u:p@host:7125/websocket failed", "ws://host:7125/websocket failed"],
    ["see https://example.com/a/b.", "see https://example.com/a/b."],
    ["(at https://example.com/x?sig=1)", "(at https://example.com/x)"],
    ["cannot read /home/pi/printer_data/config/moonflash/toolhead.config", "cannot read …/toolhead.config"],
    ["KCONFIG_CONFIG=/home/pi/printer_data/config/moonflash/mcu.config make", "KCONFIG_CONFIG=…/mcu.config make"],
    ["file '~/printer_data/config/printer.cfg' (line 3)", "file '…/printer.cfg' (line 3)"],
    ["copying /home/pi/klipper/out/ to the store", "copying …/out to the store"],
    ["serial /dev/serial/by-id/usb-Klipper_stm32f446xx_1234-if00 is missing", "serial /dev/serial/by-id/usb-Klipper_stm32f446xx_1234-if00 is missing"],
    ["wrote 5/10 blocks, 50% / done", "wrote 5/10 blocks, 50% / done"],
    ["Writing 65536 bytes", "Writing 65536 bytes"],
  ])("%s", (text, shown) => {
    expect(redactText(text)).toBe(shown);
  });

  it("keeps only scheme, host and path of a URL, even one it cannot parse", () => {
    expect(safeUrl("https://a:b@h:8443/p/q?x=1")).toBe("https://h:8443/p/q");
    expect(safeUrl("https://user:p@ss@host/x")).toBe("https://host/x");
    expect(safeUrl("http://us er:pw@[bad/x?y")).toBe("http://[bad/x");
  });

  it("cuts runaway lines", () => {
    expect(shownText("x".repeat(600))).toHaveLength(500);
    expect(shownText("x".repeat(600)).endsWith("…")).toBe(true);
  });
});
