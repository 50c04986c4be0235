// `moonflash sidebar-link [--remove|--check]`: a "moonflash" entry in Mainsail's sidebar that opens the status page.
// Mainsail reads custom sidebar entries from <config>/.theme/navi.json, an array of {title, href, target, icon,
// position} (mainsail src/components/mixins/navigation.ts), and keeps showing them while Klipper is stopped, when
// its Console entry is gone. The file may hold the user's own entries: they are kept as they are; ours is the one
// titled "moonflash". The address is the one the agent announces (src/agent/status-webcam.ts).

import { mkdir, readFile, rm, rmdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { createRuntime } from "../app.js";
import { writeFileDurable } from "../core/durable.js";
import { MoonflashError } from "../core/errors.js";
import { statusPageUrl } from "../agent/status-webcam.js";
import { reportFailure } from "./render.js";

export const LINK_TITLE = "moonflash";
/** A chip with pins on a 24×24 grid (Mainsail takes an SVG path, as its own icons are). */
const ICON = "M6,4H18V5H21V7H18V9H21V11H18V13H21V15H18V17H21V19H18V20H6V19H3V17H6V15H3V13H6V11H3V9H6V7H3V5H6V4M11,15V18H12V15H11M13,15V18H14V15H13M15,15V18H16V15H15Z";

type Change = "added" | "updated" | "present" | "removed" | "absent" | "outdated";

export interface SidebarLinkResult {
  file: string;
  href: string;
  change: Change;
}

/** The link for this printer's status page; pure apart from reading navi.json and writing it back. */
export async function sidebarLink(opts: { configDir: string; href: string; mode: "add" | "remove" | "check" }): Promise<SidebarLinkResult> {
  const file = join(opts.configDir, ".theme", "navi.json");
  let entries: unknown[] = [];
  let exists = true;
  try {
    const parsed: unknown = JSON.parse(await readFile(file, "utf8"));
    if (!Array.isArray(parsed)) throw new SyntaxError("not an array");
    entries = parsed;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") exists = false;
    else {
      // Never rewrite a file we cannot read: it is the user's.
      throw new MoonflashError("CONFIG_INVALID", `${file} is not a JSON array (${(err as Error).message}); Mainsail ignores it too. Fix or remove it, then run moonflash sidebar-link again.`, { file });
    }
  }
  const isOurs = (e: unknown): boolean => typeof e === "object" && e !== null && (e as { title?: unknown }).title === LINK_TITLE;
  const ours = entries.filter(isOurs) as Array<Record<string, unknown>>;
  const link = { title: LINK_TITLE, href: opts.href, target: "_blank", icon: ICON, position: 90 };
  const result = (change: Change): SidebarLinkResult => ({ file, href: opts.href, change });

  if (opts.mode === "check") return result(ours.length === 0 ? "absent" : ours.some((e) => e.href !== opts.href) ? "outdated" : "present");
  if (opts.mode === "remove") {
    if (ours.length === 0) return result("absent");
    const kept = entries.filter((e) => !isOurs(e));
    if (kept.length > 0) await writeFileDurable(file, `${JSON.stringify(kept, null, 2)}\n`);
    else {
      // Ours was the only entry: the file (and .theme/, when nothing else is in it) goes as it came.
      await rm(file);
      await rmdir(dirname(file)).catch(() => undefined);
    }
    return result("removed");
  }
  if (ours.length > 0 && ours.every((e) => e.href === opts.href)) return result("present");
  const others = entries.filter((e) => !isOurs(e));
  if (!exists) await mkdir(dirname(file), { recursive: true });
  // An entry of ours with another address (the printer's address changed) is replaced in its place.
  const at = entries.findIndex(isOurs);
  const next = at < 0 ? [...others, link] : [...others.slice(0, at), { ...ours[0], ...link, position: ours[0]!.position ?? link.position }, ...others.slice(at)];
  await writeFileDurable(file, `${JSON.stringify(next, null, 2)}\n`);
  return result(ours.length > 0 ? "updated" : "added");
}

export async function runSidebarLink(opts: { dataDir: string; mode: "add" | "remove" | "check"; json: boolean }): Promise<number> {
  try {
    const rt = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    const sp = rt.config.status_page;
    const r = await sidebarLink({ configDir: join(rt.config.dataDir, "config"), href: statusPageUrl(sp.port, sp.public_url), mode: opts.mode });
    if (opts.json) process.stdout.write(`${JSON.stringify({ ok: true, result: r })}\n`);
    else {
      const said: Record<Change, string> = {
        added: `Mainsail sidebar: "moonflash" added, opening ${r.href} (reload the page)`,
        updated: `Mainsail sidebar: "moonflash" now opens ${r.href} (reload the page)`,
        present: `Mainsail sidebar: "moonflash" ${opts.mode === "check" ? "is there" : "already there"}, opening ${r.href}`,
        outdated: `Mainsail sidebar: "moonflash" opens another address than ${r.href}: run moonflash sidebar-link to update it`,
        removed: `Mainsail sidebar: "moonflash" removed from ${r.file}`,
        absent: `Mainsail sidebar: no "moonflash" entry in ${r.file}`,
      };
      process.stdout.write(`${said[r.change]}\n`);
    }
    return 0;
  } catch (err) {
    return reportFailure(err, opts.json);
  }
}
