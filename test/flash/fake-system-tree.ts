// Builds a fake /dev + /sys + /proc tree from real files and symlinks laid out like Linux's, so discovery can be
// run against USB devices this machine does not have (simulated USB).

import { mkdir, mkdtemp, realpath, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

export interface FakeUsbTty {
  /** tty name, e.g. ttyACM0. */
  name: string;
  /** USB bus path of the device, e.g. "1-1.3"; omitted for a UART without USB (ttyS0). */
  usbPath?: string;
  vendorId?: string;
  productId?: string;
  manufacturer?: string;
  product?: string;
  serial?: string;
  byId?: string;
  byPath?: string;
  /** serial_core `type` attribute (0 = no UART behind a legacy ttyS slot). */
  uartType?: string;
}

export interface FakeSystemTree {
  root: string;
  devRoot: string;
  sysRoot: string;
  procRoot: string;
  /** Real path of /dev/<name> inside the tree. */
  dev(name: string): string;
  /** Makes a fake process hold /dev/<name> open (a /proc/<pid>/fd link). */
  hold(name: string, pid: number, comm: string): Promise<void>;
  cleanup(): Promise<void>;
}

export async function buildFakeSystemTree(ttys: readonly FakeUsbTty[]): Promise<FakeSystemTree> {
  const root = await realpath(await mkdtemp(path.join(os.tmpdir(), "moonflash-fake-sys-")));
  const devRoot = path.join(root, "dev");
  const sysRoot = path.join(root, "sys");
  const procRoot = path.join(root, "proc");
  const classTty = path.join(sysRoot, "class", "tty");
  await mkdir(path.join(devRoot, "serial", "by-id"), { recursive: true });
  await mkdir(path.join(devRoot, "serial", "by-path"), { recursive: true });
  await mkdir(classTty, { recursive: true });
  await mkdir(procRoot, { recursive: true });

  for (const tty of ttys) {
    await writeFile(path.join(devRoot, tty.name), "");
    const classDir = path.join(classTty, tty.name);
    await mkdir(classDir, { recursive: true });
    if (tty.uartType !== undefined) await writeFile(path.join(classDir, "type"), `${tty.uartType}\n`);
    if (tty.usbPath) {
      // devices/.../usb1/<usbPath> holds the ids; the tty's `device` is its interface <usbPath>:1.0.
      const usbDevice = path.join(sysRoot, "devices", "pci0000:00", "0000:00:14.0", "usb1", tty.usbPath);
      const usbInterface = path.join(usbDevice, `${tty.usbPath}:1.0`);
      await mkdir(usbInterface, { recursive: true });
      const attrs: Array<[string, string | undefined]> = [
        ["idVendor", tty.vendorId],
        ["idProduct", tty.productId],
        ["manufacturer", tty.manufacturer],
        ["product", tty.product],
        ["serial", tty.serial],
      ];
      for (const [file, value] of attrs) {
        if (value !== undefined) await writeFile(path.join(usbDevice, file), `${value}\n`);
      }
      await symlink(path.relative(classDir, usbInterface), path.join(classDir, "device"));
    } else {
      const platform = path.join(sysRoot, "devices", "platform", "serial8250", tty.name);
      await mkdir(platform, { recursive: true });
      await symlink(path.relative(classDir, platform), path.join(classDir, "device"));
    }
    if (tty.byId) await symlink(`../../${tty.name}`, path.join(devRoot, "serial", "by-id", tty.byId));
    if (tty.byPath) await symlink(`../../${tty.name}`, path.join(devRoot, "serial", "by-path", tty.byPath));
  }

  return {
    root,
    devRoot,
    sysRoot,
    procRoot,
    dev: (name) => path.join(devRoot, name),
    async hold(name, pid, comm) {
      const fdDir = path.join(procRoot, String(pid), "fd");
      await mkdir(fdDir, { recursive: true });
      await writeFile(path.join(procRoot, String(pid), "comm"), `${comm}\n`);
      await symlink("/dev/null", path.join(fdDir, "0"));
      await symlink(path.join(devRoot, name), path.join(fdDir, "7"));
    },
    cleanup: () => rm(root, { recursive: true, force: true }),
  };
}

export const CH340_ADAPTER: Omit<FakeUsbTty, "name" | "usbPath"> = {
  vendorId: "1a86",
  productId: "7523",
  product: "USB Serial",
};
