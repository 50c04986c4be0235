// The first moonflash.conf install.sh writes: the template, with a commented section for each [mcu] of Klipper's
// config placed before the template's examples; every line commented, so the file still means "all defaults".

import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { confWithPrinterMcus } from "../../src/cli/init-conf.js";
import { parseConfig } from "../../src/moonflash-conf.js";

const TEMPLATE = readFileSync(resolve(import.meta.dirname, "../../moonraker/moonflash.conf"), "utf8");

describe("init-conf", () => {
  it("adds one commented section per MCU, with Klipper's device and a suggested method, and changes no setting", () => {
    const conf = confWithPrinterMcus(TEMPLATE, [
      { section: "mcu", name: "mcu", serial: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00", mcuType: "stm32f446xx" },
      { section: "mcu host", name: "host", serial: "/tmp/klipper_host_mcu", mcuType: "linux" },
      { section: "mcu ebb", name: "ebb", canbusUuid: "0123456789ab", canbusInterface: "can1" },
      { section: "mcu odd", name: "odd" },
    ]);
    expect(conf).toContain(
      [
        "#[mcu]", "#  (Klipper: serial /dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00, stm32f446xx)", "#method: katapult, make", "#",
        "#[mcu host]", "#  (Klipper: serial /tmp/klipper_host_mcu, linux)", "#method: linux", "#",
        "#[mcu ebb]", "#  (Klipper: canbus_uuid 0123456789ab on can1)", "#method: flashtool", "#",
        "#[mcu odd]", "#  (Klipper: no serial: or canbus_uuid: in Klipper's config)", "#method: katapult, make", "#",
        "# More examples:",
      ].join("\n"),
    );
    expect(conf.indexOf("# More examples:")).toBeLessThan(conf.indexOf("#[mcu bmcu]"));
    const parsed = parseConfig(conf, join("/tmp", "moonflash.conf"), "/tmp/printer_data");
    expect(parsed.mcus).toEqual({});
    expect(parsed.moonflash).toEqual(parseConfig(TEMPLATE, join("/tmp", "moonflash.conf"), "/tmp/printer_data").moonflash);
  });

  it("leaves the template as it is when Klipper's config lists no MCU", () => {
    expect(confWithPrinterMcus(TEMPLATE, [])).toBe(TEMPLATE);
  });
});
