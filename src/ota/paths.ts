// Where OTA keeps its files: apart from the engine, so that the agent can tell whether an earlier process left
// anything to recover without loading the OTA code.

import { join } from "node:path";
import { dataPaths } from "../core/paths.js";

export function otaPaths(dataDir: string) {
  const root = join(dataPaths(dataDir).state, "ota");
  return {
    root,
    state: join(root, "state.json"),
    download: join(root, "download"),
    package: join(root, "download", "package.zip"),
    staging: join(root, "staging"),
    backups: join(root, "backup"),
    /** The MCU devices Klipper's config gave, kept for a firmware rollback while Klipper is stopped. */
    mcuDevices: join(root, "mcu-devices.json"),
  };
}
