// The recorded Moonraker traffic (test/fixtures/moonraker, written by scripts/record-moonraker.ts) and how a message
// is compared with a recorded one, and the fake configured like the printer it came from; shared by the replay
// against the fake and the recorder's own test.
import fs from "node:fs";
import path from "node:path";
import type { FakeMoonrakerOptions } from "../support/fake-moonraker/index.js";

export const fixturesDir = path.resolve(import.meta.dirname, "../fixtures/moonraker");
export const fixtureFiles = fs.readdirSync(fixturesDir).filter((f) => f.endsWith(".jsonl")).sort();

export type Message = Record<string, unknown>;
export interface RecordedLine {
  conn: string;
  dir: "send" | "recv";
  msg: Message;
}

// Moonraker pushes proc stats about once a second on every connection; they carry nothing the replay checks.
export const isProcStat = (m: unknown): boolean => (m as Message | null)?.method === "notify_proc_stat_update";

export function loadScenario(file: string, dir = fixturesDir): RecordedLine[] {
  return fs
    .readFileSync(path.join(dir, file), "utf8")
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => JSON.parse(line) as RecordedLine)
    .filter((line) => !(line.dir === "recv" && isProcStat(line.msg)));
}

/** The recorder writes "<...>" where a value describes the host (hostname, CPU, system versions), not Moonraker. */
const HOST_PLACEHOLDER = /^<[a-z][a-z ]*>$/;

/**
 * Compares a recorded message with one the fake sent. Strings, booleans, null, key sets and array lengths must be
 * equal (a "<...>" placeholder stands for any string); numbers must be numbers and equal only for error codes and
 * api_version (ids, times and stats vary). The top-level id of a server-made request (an agent call) may differ;
 * every other id must be equal.
 */
export function compareMessages(expected: Message, actual: unknown): string[] {
  const problems: string[] = [];
  const walk = (exp: unknown, act: unknown, at: string, exactNumbers: boolean): void => {
    if (exp === null || typeof exp !== "object") {
      if (typeof exp === "number") {
        if (typeof act !== "number") problems.push(`${at}: expected a number, got ${JSON.stringify(act)}`);
        else if (exactNumbers && act !== exp) problems.push(`${at}: expected ${exp}, got ${act}`);
      } else if (typeof exp === "string" && HOST_PLACEHOLDER.test(exp)) {
        if (typeof act !== "string") problems.push(`${at}: expected a string, got ${JSON.stringify(act)}`);
      } else if (exp !== act) {
        problems.push(`${at}: expected ${JSON.stringify(exp)}, got ${JSON.stringify(act)}`);
      }
      return;
    }
    if (Array.isArray(exp)) {
      if (!Array.isArray(act) || act.length !== exp.length) {
        problems.push(`${at}: expected an array of ${exp.length}, got ${JSON.stringify(act)}`);
        return;
      }
      exp.forEach((item, i) => walk(item, act[i], `${at}[${i}]`, exactNumbers));
      return;
    }
    if (act === null || typeof act !== "object" || Array.isArray(act)) {
      problems.push(`${at}: expected an object, got ${JSON.stringify(act)}`);
      return;
    }
    const actObj = act as Message;
    const expKeys = Object.keys(exp).sort();
    const actKeys = Object.keys(actObj).sort();
    if (JSON.stringify(expKeys) !== JSON.stringify(actKeys)) {
      problems.push(`${at}: keys differ, expected [${expKeys.join(", ")}], got [${actKeys.join(", ")}]`);
      return;
    }
    for (const key of expKeys) {
      const exact = exactNumbers || key === "code" || key === "api_version";
      walk((exp as Message)[key], actObj[key], `${at}.${key}`, exact);
    }
  };
  const isServerRequest = typeof expected.method === "string" && expected.id !== undefined;
  const { id: expId, ...expRest } = expected;
  const { id: actId, ...actRest } = (actual ?? {}) as Message;
  if (isServerRequest) {
    if (typeof actId !== "number") problems.push(`id: expected a server-made numeric id, got ${JSON.stringify(actId)}`);
  } else if (expId !== actId) {
    problems.push(`id: expected ${JSON.stringify(expId)}, got ${JSON.stringify(actId)}`);
  }
  walk(expRest, actRest, "msg", false);
  return problems;
}

/**
 * The services the rig's Moonraker could manage and their states at the start, as machine.system_info reported them
 * in objects_query.jsonl: the rig's supervisord programs, its setup rather than Moonraker's behaviour.
 */
function recordedServices(): Record<string, { active_state: string; sub_state: string }> {
  for (const line of loadScenario("objects_query.jsonl")) {
    const info = (line.msg.result as { system_info?: { service_state?: unknown } } | undefined)?.system_info;
    if (line.dir === "recv" && info?.service_state !== undefined) {
      return info.service_state as Record<string, { active_state: string; sub_state: string }>;
    }
  }
  throw new Error("objects_query.jsonl has no machine.system_info reply");
}

/** The fake configured like the recording rig (test/fixtures/moonraker/README.md). */
export function rigFakeOptions(dataDir: string): FakeMoonrakerOptions {
  return {
    dataDir,
    services: recordedServices(),
    klipper: {
      mcus: [{ section: "mcu", settings: { serial: "/tmp/klipper_host_mcu" } }],
      macros: { RECORD_REMOTE_CALL: { method: "recorder.test", params: { device: "abc", dry_run: 1 } } },
    },
  };
}
