// Mainsail's sidebar entry for the status page (config/.theme/navi.json): the user's own entries are kept as they
// are, ours follows the printer's address, removal gives back the file as it was, and a file we cannot read is
// never rewritten.

import { afterEach, describe, expect, it } from "vitest";
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { sidebarLink } from "../../src/cli/sidebar-link.js";

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

async function configDir(navi?: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-navi-"));
  dirs.push(dir);
  if (navi !== undefined) {
    await mkdir(join(dir, ".theme"));
    await writeFile(join(dir, ".theme", "navi.json"), navi);
  }
  return dir;
}

const USER_ENTRY = { title: "Octo", href: "http://octo.local/", target: "_blank", icon: "M0,0Z", position: 10 };
const read = async (dir: string): Promise<unknown> => JSON.parse(await readFile(join(dir, ".theme", "navi.json"), "utf8"));

describe("moonflash sidebar-link", () => {
  it("creates .theme/navi.json with one entry; a second call changes nothing; --remove deletes what it created", async () => {
    const dir = await configDir();
    const href = "http://192.168.1.20:7180/";
    expect(await sidebarLink({ configDir: dir, href, mode: "check" })).toMatchObject({ change: "absent" });
    expect(await sidebarLink({ configDir: dir, href, mode: "add" })).toMatchObject({ change: "added", href });
    expect(await read(dir)).toEqual([{ title: "moonflash", href, target: "_blank", icon: expect.any(String), position: 90 }]);
    const before = await readFile(join(dir, ".theme", "navi.json"), "utf8");
    expect(await sidebarLink({ configDir: dir, href, mode: "add" })).toMatchObject({ change: "present" });
    expect(await readFile(join(dir, ".theme", "navi.json"), "utf8")).toBe(before);
    expect(await sidebarLink({ configDir: dir, href, mode: "remove" })).toMatchObject({ change: "removed" });
    expect(await readdir(dir)).toEqual([]);
  });

  it("keeps the user's entries and their order; a changed address updates ours in place, keeping the position the user gave it", async () => {
    const dir = await configDir(JSON.stringify([USER_ENTRY, { title: "moonflash", href: "http://10.0.0.5:7180/", position: 3 }, { ...USER_ENTRY, title: "Cam" }]));
    const href = "http://10.0.0.9:7180/";
    expect(await sidebarLink({ configDir: dir, href, mode: "check" })).toMatchObject({ change: "outdated" });
    expect(await sidebarLink({ configDir: dir, href, mode: "add" })).toMatchObject({ change: "updated" });
    expect(await read(dir)).toEqual([USER_ENTRY, { title: "moonflash", href, target: "_blank", icon: expect.any(String), position: 3 }, { ...USER_ENTRY, title: "Cam" }]);
    expect(await sidebarLink({ configDir: dir, href, mode: "remove" })).toMatchObject({ change: "removed" });
    expect(await read(dir)).toEqual([USER_ENTRY, { ...USER_ENTRY, title: "Cam" }]);
    expect(await sidebarLink({ configDir: dir, href, mode: "remove" })).toMatchObject({ change: "absent" });
  });

  it("refuses a navi.json that is not a JSON array with CONFIG_INVALID and leaves it byte for byte", async () => {
    for (const text of ["{ not json", '{"title": "x"}']) {
      const dir = await configDir(text);
      await expect(sidebarLink({ configDir: dir, href: "http://h:7180/", mode: "add" })).rejects.toMatchObject({ code: "CONFIG_INVALID", message: expect.stringContaining("is not a JSON array") });
      expect(await readFile(join(dir, ".theme", "navi.json"), "utf8")).toBe(text);
    }
  });
});
