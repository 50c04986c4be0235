// `moonflash serve`: the long-running agent. Stops cleanly on SIGINT/SIGTERM, letting a running job finish
// (its guard starts Klipper again) before the Moonraker session closes.

import { createAgent } from "../app.js";

export async function runServe(opts: { dataDir: string; configFile?: string }): Promise<number> {
  const agent = await createAgent({ dataDir: opts.dataDir, ...(opts.configFile ? { configFile: opts.configFile } : {}), pretty: process.stdout.isTTY === true });
  agent.start();
  await new Promise<void>((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals): void => {
      if (stopping) return;
      stopping = true;
      agent.logger.info({ signal }, "stopping");
      agent.stop().finally(resolve);
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  });
  return 0;
}
