// `moonflash init-conf --template FILE`: the text of a first moonflash.conf (install.sh writes it), with a commented
// section for each [mcu] of the printer's own Klipper config, read from Moonraker, so that the user uncomments the
// boards they have instead of copying names. Without Moonraker (or with Klipper stopped) it is the template alone.

import { readFile } from "node:fs/promises";
import { connectPrinter, createRuntime } from "../app.js";
import type { McuInfo } from "../core/printer.js";
import type { AgentSession } from "../moonraker/session.js";
import { reportFailure } from "./render.js";

/** The template's first example section: the printer's sections go just before it. */
const EXAMPLES_START = /^#\[mcu\]$/m;

/** How moonflash would flash a board Klipper reaches this way (a suggestion the user may change). */
function suggestedMethod(mcu: McuInfo): string {
  if (mcu.canbusUuid) return "flashtool";
  if (mcu.serial?.startsWith("/tmp/klipper_host_mcu")) return "linux";
  return "katapult, make";
}

/** The template with a commented section for each of the printer's MCUs (pure). */
export function confWithPrinterMcus(template: string, mcus: McuInfo[]): string {
  if (mcus.length === 0) return template;
  const block = [
    "# Klipper's config has these MCUs (read from Moonraker when this file was written). Uncomment a section to say how",
    "# moonflash flashes that board; the device shown is Klipper's, used unless you set serial: or canbus_uuid: here.",
    ...mcus.flatMap((m) => {
      const where = m.serial ? `serial ${m.serial}` : m.canbusUuid ? `canbus_uuid ${m.canbusUuid} on ${m.canbusInterface ?? "can0"}` : "no serial: or canbus_uuid: in Klipper's config";
      return [`#[${m.section}]`, `#  (Klipper: ${where}${m.mcuType ? `, ${m.mcuType}` : ""})`, `#method: ${suggestedMethod(m)}`, "#"];
    }),
    "# More examples:",
  ];
  const at = template.search(EXAMPLES_START);
  if (at < 0) return `${template.trimEnd()}\n\n${block.join("\n")}\n`;
  return `${template.slice(0, at)}${block.join("\n")}\n${template.slice(at)}`;
}

export async function runInitConf(opts: { dataDir: string; template: string }): Promise<number> {
  let session: AgentSession | null = null;
  try {
    const template = await readFile(opts.template, "utf8");
    const rt = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    let mcus: McuInfo[] = [];
    try {
      session = await connectPrinter(rt, 5000);
      mcus = (await session.mcuReport()).mcus;
    } catch (err) {
      // The template alone is a good start too; say why the printer's MCUs are missing.
      process.stderr.write(`moonflash: the printer's [mcu] sections were not read (${(err as Error).message}); the template is written as it is\n`);
    }
    process.stdout.write(confWithPrinterMcus(template, mcus));
    return 0;
  } catch (err) {
    return reportFailure(err, false);
  } finally {
    await session?.stop();
  }
}
