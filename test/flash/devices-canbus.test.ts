// flash.devices' CAN part: nodes from Moonraker's machine.peripherals.canbus on every interface a known MCU uses,
// mapped to sections by canbus_uuid; an interface Moonraker cannot query is reported, not fatal. (The CAN socket
// itself is the edge we cannot have here: the fake Moonraker answers the query as the real one does.)

import { afterEach, expect, it } from "vitest";
import { parseConfig } from "../../src/moonflash-conf.js";
import { FlashEngine } from "../../src/flash/engine.js";
import { startRig, type PrinterRig } from "../fixtures/engine/rig.js";

let rig: PrinterRig | undefined;
afterEach(async () => {
  await rig?.close();
  rig = undefined;
});

it("lists CAN nodes per interface, maps them to [mcu] sections, and reports an interface that fails (simulated CAN)", async () => {
  rig = await startRig({
    klipper: { mcus: [{ section: "mcu toolhead", settings: { canbus_uuid: "0123456789ab", canbus_interface: "can0" } }] },
    canbus: { can0: [{ uuid: "0123456789ab", application: "Katapult" }, { uuid: "ffeeddccbbaa", application: "Klipper" }] },
  });
  const config = parseConfig(`[moonflash]\nkatapult_path: ${rig.dataDir}/no-katapult\n\n[mcu ebb]\ncanbus_uuid: 00aa11bb22cc\ncanbus_interface: can1\n`, "/tmp/moonflash.conf", rig.dataDir);
  const engine = new FlashEngine({ config, printer: rig.session, runner: rig.runner, logger: rig.logger });
  const report = await engine.devices();
  expect(report.canbus).toEqual([
    {
      interface: "can0",
      nodes: [
        { uuid: "0123456789ab", application: "Katapult", mcu: "mcu toolhead" },
        { uuid: "ffeeddccbbaa", application: "Klipper" },
      ],
    },
    { interface: "can1", nodes: [], error: { code: "DEVICE_NOT_FOUND", message: expect.stringContaining("Unable to bind socket to interface 'can1'") } },
  ]);
  expect(rig.fake.serviceActions).toEqual([]);
});
