// The simulated Klipper's G-code macros, rendered by macro-render.py with real Jinja2 as Klipper v0.13 renders them
// (klippy/extras/gcode_macro.py): a macro that fails in Klipper fails here with the same message.
import { fileURLToPath } from "node:url";
import { execa, execaSync } from "execa";

const SCRIPT = fileURLToPath(new URL("./macro-render.py", import.meta.url));
const PYTHON = "python3";
const TIMEOUT_MS = 15_000;

/** A `[gcode_macro NAME]` section as Klipper loads it. */
export interface MacroDefinition {
  /** The section name as written, e.g. "gcode_macro FLASH_MCU"; Klipper's error messages quote it. */
  section: string;
  /** The command, upper-cased. */
  name: string;
  description: string;
  gcode: string;
  /** `variable_*` options, evaluated as Python literals. */
  variables: Record<string, unknown>;
  /**
   * Set for a one-line `{action_call_remote_method("m", k=v, ...)}` macro of the fake's simple table: run without
   * Python (so the demo needs no jinja2), with the same signature check Klipper's helper makes.
   */
  remoteCall?: { method: string; params: Record<string, unknown> };
}

export type MacroEvent =
  | { type: "remote_method"; method: string; params: Record<string, unknown> }
  | { type: "respond_info"; message: string }
  | { type: "shutdown"; message: string };

export interface RenderRequest {
  macro: MacroDefinition;
  /** The command's parameters, keys upper-cased, values as typed. */
  params: Record<string, string>;
  rawparams: string;
  /** Every printer object's status, for `printer[...]`. */
  printer: Record<string, unknown>;
  /** Remote methods registered with Klipper; calls to others are dropped, as Klipper drops them. */
  remoteMethods: string[];
}

/** Events in the order the template ran them; then either the rendered G-code or Klipper's error message. */
export type RenderResult = { events: MacroEvent[] } & ({ output: string } | { error: string });

/** Reads the `[gcode_macro NAME]` sections of a Klipper config file; throws Klipper's config error text. */
export function loadMacroFile(file: string): MacroDefinition[] {
  const run = execaSync(PYTHON, [SCRIPT, "load", file], { timeout: TIMEOUT_MS, reject: false });
  if (run.exitCode !== 0) throw new Error(`${file}: ${run.stderr || run.message}`);
  return (JSON.parse(run.stdout) as { macros: MacroDefinition[] }).macros;
}

export async function renderMacro(req: RenderRequest): Promise<RenderResult> {
  const input = JSON.stringify({
    name: `${req.macro.section}:gcode`,
    gcode: req.macro.gcode,
    variables: req.macro.variables,
    params: req.params,
    rawparams: req.rawparams,
    printer: req.printer,
    remote_methods: req.remoteMethods,
  });
  const run = await execa(PYTHON, [SCRIPT, "render"], { input, timeout: TIMEOUT_MS, reject: false });
  if (run.exitCode !== 0) throw new Error(`macro-render.py: ${run.stderr || run.message}`);
  return JSON.parse(run.stdout) as RenderResult;
}
