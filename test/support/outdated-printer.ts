// A printer just after a Klipper update, for the demo and the bench: a stand-in Klipper tree checked out at v0.13.0
// with three firmware profiles, three virtual Katapult boards still holding the old firmware (the toolhead running
// its application, so it needs the bootloader request), and the fake Moonraker whose simulated Klipper is in "MCU
// Protocol error" and reports each MCU's version from the image its board holds.

import { join } from "node:path";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";
import { createBuildFixture, RP2040_PROFILE, STM32_PROFILE, type BuildFixture } from "../flash/support/build-fixture.js";
import { startFakeMoonraker, type FakeMoonraker, type FakeMoonrakerOptions } from "./fake-moonraker/index.js";
import { mcuProtocolErrorMessage } from "./fake-moonraker/klipper-sim.js";

export const OLD_KLIPPER_VERSION = "v0.12.0-85-gd785b396";

/** What a virtual board's firmware reports: the version the (stand-in) Klipper build wrote into the image it holds. */
export const versionIn = (board: VirtualDevice): string | undefined => /FAKE-KLIPPER version=(\S+)/.exec(board.model.flash.toString("latin1"))?.[1];

export interface OutdatedPrinter {
  fx: BuildFixture;
  /** The Klipper host's version (`git describe` of the stand-in tree). */
  host: string;
  boards: Record<"mcu" | "toolhead" | "bed", VirtualDevice>;
  moonraker: FakeMoonraker;
  /** PATH for the agent: the stand-in compilers first. */
  agentPath: string;
  close(): Promise<void>;
}

export async function startOutdatedPrinter(opts: {
  name: string;
  baud: number;
  /** Bytes of the old firmware each board holds. */
  oldImageBytes: number;
  timing: FakeMoonrakerOptions["timing"];
  macroFile?: string;
}): Promise<OutdatedPrinter> {
  const fx = await createBuildFixture(opts.name);
  const host = await fx.gitInit("v0.13.0");
  await fx.writeProfile("mcu.config", STM32_PROFILE);
  await fx.writeProfile("toolhead.config", RP2040_PROFILE);
  await fx.writeProfile("bed.config", STM32_PROFILE);
  const boards = {
    mcu: await startVirtualDevice({ path: join(fx.root, "ttyMCU"), mcuType: "stm32f446xx", baud: opts.baud }),
    toolhead: await startVirtualDevice({ path: join(fx.root, "ttyTOOL"), mcuType: "rp2040", mode: "app", baud: opts.baud }),
    bed: await startVirtualDevice({ path: join(fx.root, "ttyBED"), mcuType: "stm32f446xx", baud: opts.baud }),
  };
  const header = Buffer.from(`FAKE-KLIPPER version=${OLD_KLIPPER_VERSION}\n`);
  for (const board of Object.values(boards)) Buffer.concat([header, Buffer.alloc(Math.max(0, opts.oldImageBytes - header.length), 0x5a)]).copy(board.model.flash);
  await fx.writeConf(`service_timeout: 10\n\n[mcu]\nmethod: katapult\n\n[mcu toolhead]\nmethod: katapult\nbootloader: serial\n\n[mcu bed]\nmethod: katapult\n`);
  const sim = (section: string, board: VirtualDevice, type: string) => ({
    section,
    settings: { serial: board.path, baud: opts.baud },
    mcu_constants: { MCU: type },
    mcu_version: OLD_KLIPPER_VERSION,
    versionFrom: () => versionIn(board),
  });
  const old = OLD_KLIPPER_VERSION;
  const moonraker = await startFakeMoonraker({
    dataDir: fx.dataDir,
    timing: opts.timing,
    klipper: {
      softwareVersion: host,
      checkMcuVersions: true,
      state: "error",
      stateMessage: mcuProtocolErrorMessage(host, [{ name: "mcu", version: old }, { name: "toolhead", version: old }, { name: "bed", version: old }], []),
      ...(opts.macroFile ? { macroFile: opts.macroFile } : {}),
      mcus: [sim("mcu", boards.mcu, "stm32f446xx"), sim("mcu toolhead", boards.toolhead, "rp2040"), sim("mcu bed", boards.bed, "stm32f446xx")],
    },
  });
  return {
    fx,
    host,
    boards,
    moonraker,
    agentPath: `${fx.bin}:${process.env.PATH ?? ""}`,
    async close() {
      await moonraker.stop();
      for (const board of Object.values(boards)) await board.stop();
      await fx.cleanup();
    },
  };
}
