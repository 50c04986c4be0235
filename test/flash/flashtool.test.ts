// FlashtoolFlasher against a fake flashtool.py run as a real child process: the fake prints the real tool's
// output (byte-by-byte progress, chained FlashError tracebacks), so parsing and error mapping are exercised end to end.

import { mkdir, readFile, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import type { CanbusNode, PrinterPort, PrinterState } from "../../src/core/printer.js";
import { discoverCanNodes } from "../../src/flash/discovery.js";
import { FlashtoolFlasher } from "../../src/flash/methods/flashtool.js";
import { runTool } from "../../src/core/tool.js";
import { RecordingContext } from "./support/recording-context.js";
import { rejection } from "./support/rejection.js";
import { useToolFixture } from "./support/tool-fixture.js";

const fixtureBin = fileURLToPath(new URL("../fixtures/bin/", import.meta.url));
let katapultPath: string;
/** Stand-ins for device nodes: flashtool's preflight checks that the configured path exists. */
let byIdDevice: string;
let ttyDevice: string;

const tool = useToolFixture({
  name: "flashtool",
  // 200 blocks of 64 bytes: the fake prints all 50 progress hashes.
  firmware: { file: "klipper firmware.bin", bytes: Buffer.alloc(200 * 64, 0x5a) },
  env: { mode: "FAKE_FLASHTOOL_MODE", record: "FAKE_FLASHTOOL_ARGS" },
  async setup(dir) {
    katapultPath = path.join(dir, "katapult");
    await mkdir(path.join(katapultPath, "scripts"), { recursive: true });
    await symlink(path.join(fixtureBin, "fake-flashtool.py"), path.join(katapultPath, "scripts", "flashtool.py"));
    ttyDevice = path.join(dir, "ttyACM0");
    await writeFile(ttyDevice, "");
    byIdDevice = path.join(dir, "usb-Klipper_stm32f103xe_ABC-if00");
    await symlink(ttyDevice, byIdDevice);
  },
  target: () => ({ device: byIdDevice }),
});
const { useMode, target: serialTarget, recordedLines: recordedArgs } = tool;

function flasher(): FlashtoolFlasher {
  return new FlashtoolFlasher({ python: "python3", katapultPath });
}

describe("FlashtoolFlasher", () => {
  it("flashes over serial: arguments, byte-stream progress of both bars, stages, SHA and page count", async () => {
    useMode("success");
    const ctx = new RecordingContext();
    const target = serialTarget();
    const outcome = await flasher().flash(target, ctx);

    expect(await recordedArgs()).toEqual(["-d", target.device, "-b", "250000", "-f", tool.firmware]);
    expect(outcome.verified).toBe(true);
    expect(outcome.bytes).toBe(200 * 64);
    expect(outcome.device).toBe(target.device);
    expect(outcome.details).toMatchObject({ pages: 13, exitCode: 0 });
    expect(outcome.details?.sha1).toMatch(/^[0-9a-f]{40}$/);

    const write = ctx.progressEvents().filter((p) => p.phase === "write");
    const verify = ctx.progressEvents().filter((p) => p.phase === "verify");
    expect(write).toHaveLength(50);
    expect(verify).toHaveLength(50);
    expect(write[0]).toEqual({ done: 2, total: 100, unit: "percent", phase: "write" });
    expect(write.at(-1)?.done).toBe(100);
    expect(verify.at(-1)?.done).toBe(100);
    expect(ctx.stages()).toEqual(["connect", "write", "verify"]);
    expect(ctx.cancellableCalls()).toEqual([{ cancellable: false, reason: "flashtool.py is writing the firmware" }]);
    const messages = ctx.logs().map((l) => l.message);
    expect(messages).toContain("Software Version: v0.0.1-72-g1e3c54b");
    expect(messages).toContain("Programming Complete");
  });

  it("reports the new path when a USB Klipper board re-enumerates in Katapult", async () => {
    useMode("usb-klipper");
    const outcome = await flasher().flash(serialTarget({ device: ttyDevice }), new RecordingContext());
    expect(outcome.device).toBe("/dev/ttyACM1");
    expect(outcome.verified).toBe(true);
  });

  it("flashes a CAN node with -i/-u and a lower-cased UUID", async () => {
    useMode("success");
    const target = serialTarget({ device: undefined, canbusUuid: "0A1B2C3D4E5F", canbusInterface: "can1" });
    const outcome = await flasher().flash(target, new RecordingContext());
    expect(await recordedArgs()).toEqual(["-i", "can1", "-u", "0a1b2c3d4e5f", "-f", tool.firmware]);
    expect(outcome.device).toBe("can1:0A1B2C3D4E5F");
  });

  it("treats exit 0 with 'Device is not Katapult' / 'Bootloader Request Complete' as FLASH_FAILED", async () => {
    useMode("not-katapult");
    const err = await rejection(flasher().flash(serialTarget(), new RecordingContext()));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.message).toContain("the board did not enter Katapult");
    expect(err.details.exitCode).toBe(0);
  });

  it("maps 'Checksum mismatch' to VERIFY_FAILED", async () => {
    useMode("checksum");
    const ctx = new RecordingContext();
    const err = await rejection(flasher().flash(serialTarget(), ctx));
    expect(err.code).toBe("VERIFY_FAILED");
    expect(err.message).toMatch(/flashtool\.py failed: Checksum mismatch: Expected [0-9A-F]{40}, Received 0{40}/);
    expect(err.details.exitCode).toBe(1);
    expect((err.details.stderrTail as string[])[0]).toBe("ERROR:root:Flash Tool Error");
    const verify = ctx.progressEvents().filter((p) => p.phase === "verify");
    expect(verify.at(-1)?.done).toBe(20);
  });

  it("maps a device held by Klipper to DEVICE_IN_USE", async () => {
    useMode("in-use");
    const err = await rejection(flasher().flash(serialTarget({ device: ttyDevice }), new RecordingContext()));
    expect(err.code).toBe("DEVICE_IN_USE");
    expect(err.message).toContain(`Serial device ${ttyDevice} in use`);
  });

  it("takes the first FlashError of a chained traceback: CONNECT timeout ⇒ DEVICE_TIMEOUT", async () => {
    useMode("no-connect");
    const err = await rejection(flasher().flash(serialTarget(), new RecordingContext()));
    expect(err.code).toBe("DEVICE_TIMEOUT");
    expect(err.message).toContain("Error sending command [CONNECT] to Device");
    expect(err.message).not.toContain("[COMPLETE]");
  });

  it("stops a tool that runs past its timeout with TOOL_TIMEOUT", async () => {
    useMode("sleep");
    const err = await rejection(flasher().flash(serialTarget({ timeoutMs: 1000 }), new RecordingContext()));
    expect(err.code).toBe("TOOL_TIMEOUT");
    expect(err.details).toMatchObject({ command: "python3" });
    expect(err.message).toContain("did not finish within 1000 ms");
  });

  it("does not start flashtool when the job is cancelled before writing", async () => {
    useMode("success");
    const ctx = new RecordingContext();
    ctx.controller.abort();
    const err = await rejection(flasher().flash(serialTarget(), ctx));
    expect(err.code).toBe("CANCELLED");
    await expect(readFile(tool.recordFile, "utf8")).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("preflight: missing python, missing flashtool.py, missing device and a malformed CAN UUID", async () => {
    const noPython = new FlashtoolFlasher({ python: path.join(tool.dir, "no-python"), katapultPath });
    expect((await rejection(noPython.preflight(serialTarget()))).code).toBe("TOOL_NOT_FOUND");
    const noScript = new FlashtoolFlasher({ python: "python3", katapultPath: path.join(tool.dir, "nowhere") });
    const missing = await rejection(noScript.preflight(serialTarget()));
    expect(missing.code).toBe("TOOL_NOT_FOUND");
    expect(missing.message).toContain("katapult_path");
    const noDevice = await rejection(flasher().preflight(serialTarget({ device: path.join(tool.dir, "ttyACM9") })));
    expect(noDevice.code).toBe("DEVICE_NOT_FOUND");
    const badUuid = await rejection(flasher().preflight(serialTarget({ device: undefined, canbusUuid: "12345" })));
    expect(badUuid.code).toBe("INVALID_PARAMS");
    await expect(flasher().preflight(serialTarget())).resolves.toBeUndefined();
  });
});

describe("runTool", () => {
  it("turns a missing executable into TOOL_NOT_FOUND with the command in the details", async () => {
    const err = await rejection(runTool({ command: path.join(tool.dir, "no-such-tool"), args: ["x"], timeoutMs: 5000 }));
    expect(err.code).toBe("TOOL_NOT_FOUND");
    expect(err.details).toMatchObject({ command: path.join(tool.dir, "no-such-tool"), args: ["x"] });
  });

  it("returns a non-zero exit with the stderr tail instead of throwing", async () => {
    const result = await runTool({
      command: "python3",
      args: ["-c", "import sys; [print('line', i, file=sys.stderr) for i in range(60)]; sys.exit(3)"],
      timeoutMs: 5000,
      tailLines: 5,
    });
    expect(result.exitCode).toBe(3);
    expect(result.stderrTail).toEqual(["line 55", "line 56", "line 57", "line 58", "line 59"]);
  });
});

describe("discoverCanNodes", () => {
  const flashtool = (): { python: string; script: string } => ({
    python: "python3",
    script: path.join(katapultPath, "scripts", "flashtool.py"),
  });

  it("parses flashtool.py -q output when there is no Moonraker", async () => {
    useMode("success");
    const nodes = await discoverCanNodes({ iface: "can0", flashtool: flashtool() });
    expect(nodes).toEqual([
      { uuid: "0a1b2c3d4e5f", application: "Katapult" },
      { uuid: "112233445566", application: "Klipper" },
    ]);
    expect(await recordedArgs()).toEqual(["-i", "can0", "-q"]);
  });

  it("maps 'Unable to bind socket' to DEVICE_NOT_FOUND", async () => {
    useMode("bind-fail");
    const err = await rejection(discoverCanNodes({ iface: "can7", flashtool: flashtool() }));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.message).toContain("Unable to bind socket to can7");
  });

  it("asks Moonraker first when the printer port is connected (simulated CAN bus)", async () => {
    const asked: string[] = [];
    const nodes: CanbusNode[] = [{ uuid: "aabbccddeeff", application: "Katapult" }];
    const printer = {
      state: () => ({ moonrakerConnected: true }) as PrinterState,
      canbusNodes: async (iface: string) => {
        asked.push(iface);
        return nodes;
      },
    } as unknown as PrinterPort;
    await expect(discoverCanNodes({ iface: "can0", printer, flashtool: flashtool() })).resolves.toEqual(nodes);
    expect(asked).toEqual(["can0"]);
  });

  it("refuses with TOOL_NOT_FOUND when neither Moonraker nor flashtool is available", async () => {
    const err = await rejection(discoverCanNodes({ iface: "can0" }));
    expect(err.code).toBe("TOOL_NOT_FOUND");
  });
});
