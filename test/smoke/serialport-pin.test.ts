// src/flash/link.ts reads private fields (fd, poller) of @serialport/bindings-cpp's LinuxPortBinding, checked
// against one version. package.json pins it and serialport exactly; this checks that what `npm ci` installs from
// the lock file is that one copy, and that serialport does not get another one nested under it.

import { expect, it } from "vitest";
import { readFile } from "node:fs/promises";
import { join, resolve } from "node:path";

const repo = resolve(import.meta.dirname, "../..");

interface Lock {
  packages: Record<string, { version?: string }>;
}

it("serialport and @serialport/bindings-cpp are pinned exactly, and the lock installs one binding, the pinned one", async () => {
  const pkg = JSON.parse(await readFile(join(repo, "package.json"), "utf8")) as { dependencies: Record<string, string> };
  const lock = JSON.parse(await readFile(join(repo, "package-lock.json"), "utf8")) as Lock;
  const binding = pkg.dependencies["@serialport/bindings-cpp"];
  const serialport = pkg.dependencies["serialport"];
  expect(binding).toMatch(/^\d+\.\d+\.\d+$/);
  expect(serialport).toMatch(/^\d+\.\d+\.\d+$/);

  expect(lock.packages["node_modules/serialport"]?.version).toBe(serialport);
  const bindings = Object.entries(lock.packages).filter(([path]) => path.endsWith("node_modules/@serialport/bindings-cpp"));
  expect(bindings.map(([path, entry]) => [path, entry.version])).toEqual([["node_modules/@serialport/bindings-cpp", binding]]);
});
