// `moonflash console-filters [--remove]`: Moonraker stores every script an agent sends as a "command" line of its
// gcode_store, so each moonflash console message (`RESPOND TYPE=… MSG="moonflash: …"`) shows twice in Mainsail and
// Fluidd once they reload the console: the message, and the command that printed it. Both UIs let the user hide
// console lines with a regex, kept in Moonraker's database; this adds one named "moonflash" that matches only our
// stored commands (the messages themselves start with "// moonflash:" or "!! moonflash:"), for each UI that has
// been used on this printer (its namespace exists), and --remove takes exactly that one away again.
//
// Mainsail: namespace "mainsail", key console.consolefilters.<id>, value {bool, name, regex}.
// Fluidd: namespace "fluidd", key console.consoleFilters, ONE array of {id, name, type, value, enabled} holding
// the user's filters too (read, append, write back; Fluidd compiles the regex without a try, so it must be valid).

import { randomUUID } from "node:crypto";
import { connectPrinter, createRuntime } from "../app.js";
import type { AgentSession } from "../moonraker/session.js";
import { reportFailure } from "./render.js";

export const FILTER_NAME = "moonflash";
/** Our stored RESPOND lines, and our dialogs (their titles start with "moonflash") and their closing. */
export const FILTER_REGEX = '^RESPOND TYPE=\\w+ MSG="(moonflash|action:prompt_begin moonflash|action:prompt_end")';

type Change = "added" | "updated" | "removed" | "present" | "outdated" | "absent" | "no namespace";

interface MainsailFilter {
  bool?: boolean;
  name?: string;
  regex?: string;
}

interface FluiddFilter {
  id?: string;
  name?: string;
  type?: string;
  value?: string;
  enabled?: boolean;
}

type Mode = "add" | "remove" | "check";

async function mainsail(session: AgentSession, mode: Mode): Promise<Change> {
  const filters = ((await session.databaseGet("mainsail", "console.consolefilters")) ?? {}) as Record<string, MainsailFilter>;
  const ours = Object.entries(filters).filter(([, f]) => f?.name === FILTER_NAME);
  // A filter an older moonflash added: its regex is brought up to date (one filter named moonflash is kept).
  const stale = ours.filter(([, f]) => f.regex !== FILTER_REGEX || f.bool !== true);
  if (mode === "check") return ours.length ? (stale.length ? "outdated" : "present") : "absent";
  if (mode === "remove") {
    for (const [id] of ours) await session.databaseDelete("mainsail", `console.consolefilters.${id}`);
    return ours.length ? "removed" : "absent";
  }
  if (ours.length) {
    for (const [id, f] of stale) await session.databasePost("mainsail", `console.consolefilters.${id}`, { ...f, bool: true, regex: FILTER_REGEX });
    return stale.length ? "updated" : "present";
  }
  await session.databasePost("mainsail", `console.consolefilters.${randomUUID()}`, { bool: true, name: FILTER_NAME, regex: FILTER_REGEX });
  return "added";
}

async function fluidd(session: AgentSession, mode: Mode): Promise<Change> {
  const stored = await session.databaseGet("fluidd", "console.consoleFilters");
  const filters = (Array.isArray(stored) ? stored : []) as FluiddFilter[];
  const others = filters.filter((f) => f?.name !== FILTER_NAME);
  const stale = filters.some((f) => f?.name === FILTER_NAME && (f.value !== FILTER_REGEX || f.type !== "expression" || f.enabled !== true));
  if (mode === "check") return others.length === filters.length ? "absent" : stale ? "outdated" : "present";
  if (mode === "remove") {
    if (others.length === filters.length) return "absent";
    await session.databasePost("fluidd", "console.consoleFilters", others);
    return "removed";
  }
  if (others.length !== filters.length) {
    if (!stale) return "present";
    await session.databasePost("fluidd", "console.consoleFilters", filters.map((f) => (f?.name === FILTER_NAME ? { ...f, type: "expression", value: FILTER_REGEX, enabled: true } : f)));
    return "updated";
  }
  await session.databasePost("fluidd", "console.consoleFilters", [...filters, { id: randomUUID(), name: FILTER_NAME, type: "expression", value: FILTER_REGEX, enabled: true }]);
  return "added";
}

/** `mode` check changes nothing: it says for each UI whether the filter is there (install.sh asks only when not). */
export async function runConsoleFilters(opts: { dataDir: string; mode: Mode; json: boolean }): Promise<number> {
  let session: AgentSession | null = null;
  try {
    const rt = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    session = await connectPrinter(rt, 10_000);
    const namespaces = new Set(await session.databaseNamespaces());
    const result = {
      mainsail: namespaces.has("mainsail") ? await mainsail(session, opts.mode) : ("no namespace" as Change),
      fluidd: namespaces.has("fluidd") ? await fluidd(session, opts.mode) : ("no namespace" as Change),
      regex: FILTER_REGEX,
    };
    if (opts.json) {
      process.stdout.write(`${JSON.stringify({ ok: true, result })}\n`);
    } else {
      for (const ui of ["mainsail", "fluidd"] as const) {
        const said: Record<Change, string> = {
          added: `console filter "${FILTER_NAME}" added (reload the page to apply it)`,
          updated: `console filter "${FILTER_NAME}" brought up to date (reload the page to apply it)`,
          removed: `console filter "${FILTER_NAME}" removed`,
          present: `console filter "${FILTER_NAME}" ${opts.mode === "check" ? "is there" : "already there"}`,
          outdated: `console filter "${FILTER_NAME}" is there but from an older moonflash: run moonflash console-filters to bring it up to date`,
          absent: `no console filter "${FILTER_NAME}"`,
          "no namespace": "not used on this printer (no settings in Moonraker's database); nothing to do",
        };
        process.stdout.write(`${ui === "mainsail" ? "Mainsail" : "Fluidd"}: ${said[result[ui]]}\n`);
      }
    }
    return 0;
  } catch (err) {
    return reportFailure(err, opts.json);
  } finally {
    await session?.stop();
  }
}
