// The one table of remote methods. Each is declared once — name, params schema, handler, description — and
// serves both paths: Klipper macros (action_call_remote_method, fire-and-forget) and clients
// (server.extensions.request, request/response). The agent derives registration, dispatch and help from it.

import * as z from "zod/mini";
import "../core/zod.js";
import type { JobRunner } from "../core/jobs.js";
import type { JobKind } from "../core/events.js";
import type { FlashEngine } from "../flash/engine.js";
import { FLASH_METHODS } from "../flash/types.js";
import { flag } from "./params.js";

export interface RemoteMethod {
  name: string;
  description: string;
  params: z.ZodMiniType;
  handler(params: never): Promise<unknown>;
  /** One console line for a macro caller, from the handler's result. */
  summary?(result: never): string;
}

export interface MethodDeps {
  runner: JobRunner;
  /** A getter, because the engine is built after the table (it needs the session, which needs the names). */
  flash: () => FlashEngine;
  /** agent.info's content; built by the agent, which knows the session and config. */
  info(): Record<string, unknown>;
}

const noParams = z.strictObject({});

function define<S extends z.ZodMiniType, R>(m: {
  name: string;
  description: string;
  params: S;
  handler: (params: z.infer<S>) => Promise<R>;
  summary?: (result: R) => string;
}): RemoteMethod {
  return m as unknown as RemoteMethod;
}

function jobStatus(runner: JobRunner, kind: JobKind) {
  const current = runner.current();
  return {
    current: current && current.kind === kind ? current : null,
    // A job of the other kind also blocks this one (one job at a time); say so instead of hiding it.
    other: current && current.kind !== kind ? { id: current.id, kind: current.kind, target: current.target } : null,
    last: runner.history(kind, 10),
  };
}

function describeStatus(kind: JobKind, status: ReturnType<typeof jobStatus>): string {
  const c = status.current;
  if (c) {
    const pct = c.progress && c.progress.total > 0 ? ` ${Math.floor((100 * c.progress.done) / c.progress.total)}%` : "";
    return `moonflash: ${kind} job ${c.id} on ${c.target}: ${c.stage}${pct}`;
  }
  const last = status.last[0];
  if (!last) return `moonflash: no ${kind} job has run yet`;
  const outcome = last.ok ? "ok" : `failed (${last.code}: ${last.message})`;
  return `moonflash: idle; last ${kind} job ${last.id} on ${last.target}: ${outcome}`;
}

export function buildMethodTable(deps: MethodDeps): RemoteMethod[] {
  const { runner } = deps;
  return [
    define({
      name: "agent.info",
      description: "Version, configuration summary and the Moonraker/Klipper state the agent sees.",
      params: noParams,
      handler: async () => deps.info(),
      summary: (info) => `moonflash ${String(info.version)}: Klipper ${String((info.klipper as Record<string, unknown>)?.state)}`,
    }),
    define({
      name: "flash.status",
      description: "The running flash job with its progress, and the last flash results.",
      params: noParams,
      handler: async () => jobStatus(runner, "flash"),
      summary: (s) => describeStatus("flash", s),
    }),
    define({
      name: "ota.status",
      description: "The running OTA job with its progress, and the last OTA results.",
      params: noParams,
      handler: async () => jobStatus(runner, "ota"),
      summary: (s) => describeStatus("ota", s),
    }),
    define({
      name: "flash.devices",
      description: "Serial devices and CAN nodes found, classified and mapped to Klipper's [mcu] sections.",
      params: noParams,
      handler: async () => deps.flash().devices(),
      summary: (r) => {
        const serial = r.devices.map((d) => `${d.byId ?? d.path}${d.mcu ? ` → [${d.mcu}]` : ""}`).join(", ") || "none";
        const can = r.canbus.map((c) => (c.error ? `${c.interface}: ${c.error.message}` : `${c.interface}: ${c.nodes.map((n) => `${n.uuid} ${n.application}${n.mcu ? ` → [${n.mcu}]` : ""}`).join(", ") || "no unassigned nodes"}`));
        return `moonflash: ${r.devices.length} serial device(s): ${serial}${can.length ? `; CAN ${can.join("; ")}` : ""}`;
      },
    }),
    define({
      name: "flash.mcu",
      description: "Flash one MCU: pre-flight, stop Klipper, flash with fallback, verify, start Klipper.",
      params: z.strictObject({
        mcu: z.string({ error: "expected the MCU section name, e.g. \"mcu\" or \"toolhead\"" }).check(z.minLength(1)),
        firmware: z.optional(z.string().check(z.minLength(1))),
        method: z.optional(z.enum(FLASH_METHODS, { error: `expected one of ${FLASH_METHODS.join(", ")}` })),
        dry_run: z.optional(flag),
      }),
      handler: async (p) => deps.flash().flash(p),
      summary: (r) =>
        "plan" in r
          ? `moonflash: dry run for [${r.mcu}]: would flash ${r.firmware} to ${r.device} with ${r.methods.join(" → ")}`
          : `moonflash: [${r.mcu}] flashed with ${r.method} in ${(r.elapsed_ms / 1000).toFixed(1)} s (${r.bytes} bytes${r.verified ? ", verified" : ""})`,
    }),
    define({
      name: "flash.cancel",
      description: "Cancel the running flash job; allowed until writing starts.",
      params: noParams,
      handler: async () => ({ cancelled: deps.flash().cancel().id }),
      summary: (r) => `moonflash: cancelling flash job ${r.cancelled}`,
    }),
  ];
}
