// `moonflash virtual-device`: a virtual Katapult board on a pseudo-terminal, so anyone can try moonflash
// without hardware. Serves until SIGINT/SIGTERM.

import { startVirtualDevice } from "../sim/virtual-device.js";
import { parseFault } from "../sim/katapult-device.js";

export async function runVirtualDevice(opts: {
  path: string;
  mcu: string;
  mode: "katapult" | "app";
  baud?: number;
  blockSize: number;
  flashSize?: number;
  reappearPath?: string;
  fault?: string[];
}): Promise<number> {
  const faults = (opts.fault ?? []).map(parseFault);
  const device = await startVirtualDevice({
    path: opts.path,
    mcuType: opts.mcu,
    mode: opts.mode,
    blockSize: opts.blockSize,
    ...(opts.baud ? { baud: opts.baud } : {}),
    ...(opts.flashSize ? { flashSize: opts.flashSize } : {}),
    ...(opts.reappearPath ? { reappearPath: opts.reappearPath } : {}),
    faults,
  });
  process.stdout.write(`virtual ${opts.mcu} board (${opts.mode} mode) at ${device.path}; Ctrl-C to stop\n`);
  device.on("bootloader", () => process.stdout.write("entered Katapult (bootloader request received)\n"));
  device.on("complete", () => process.stdout.write(`flash complete: ${device.model.written} bytes written; back in the application\n`));
  device.on("disconnect", () => process.stdout.write("disconnected (fault)\n"));
  await new Promise<void>((resolve) => {
    process.once("SIGINT", resolve);
    process.once("SIGTERM", resolve);
  });
  await device.stop();
  return 0;
}
