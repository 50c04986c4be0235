// Where moonflash keeps its files inside Klipper's data directory (~/printer_data), in one place.

import { homedir } from "node:os";
import { join } from "node:path";

export interface DataPaths {
  /** moonflash.conf, next to moonraker.conf. */
  config: string;
  logs: string;
  log: string;
  /** moonflash's own state directory. */
  state: string;
  history: string;
  lock: string;
  journal: string;
  firmware: string;
  /** Moonraker's unix socket. */
  socket: string;
}

/** The layout of moonflash's files under a data directory such as ~/printer_data. */
export function dataPaths(dataDir: string): DataPaths {
  const state = join(dataDir, "moonflash");
  return {
    config: join(dataDir, "config", "moonflash.conf"),
    logs: join(dataDir, "logs"),
    log: join(dataDir, "logs", "moonflash.log"),
    state,
    history: join(state, "history.json"),
    lock: join(state, "job.lock"),
    journal: join(state, "journal.json"),
    firmware: join(state, "firmware"),
    socket: join(dataDir, "comms", "moonraker.sock"),
  };
}

/** Klipper's installers put the data directory at ~/printer_data. */
export function defaultDataDir(): string {
  return join(homedir(), "printer_data");
}

/** Expands a leading `~` or `~/` to the home directory; other paths are returned unchanged. */
export function expandHome(path: string, home: string = homedir()): string {
  if (path === "~") return home;
  if (path.startsWith("~/")) return join(home, path.slice(2));
  return path;
}
