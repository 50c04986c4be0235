import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { configSummary, loadConfig, parseConfig } from "../../src/moonflash-conf.js";
import { isMoonflashError, type MoonflashError } from "../../src/core/errors.js";

const FILE = "/data/config/moonflash.conf";

function configError(text: string): MoonflashError {
  try {
    parseConfig(text, FILE, "/data");
  } catch (err) {
    if (isMoonflashError(err)) return err;
    throw err;
  }
  throw new Error("expected a CONFIG_INVALID error");
}

describe("parseConfig", () => {
  it("gives all defaults for an empty file", () => {
    const cfg = parseConfig("", FILE, "/data");
    expect(cfg).toEqual({
      file: FILE,
      exists: true,
      dataDir: "/data",
      moonflash: {
        moonraker_socket: "/data/comms/moonraker.sock",
        moonraker_url: null,
        api_key: null,
        klipper_path: join(homedir(), "klipper"),
        katapult_path: join(homedir(), "katapult"),
        python: "/usr/bin/python3",
        wchisp_path: null,
        log_level: "info",
        service_timeout: 90,
      },
      mcus: {},
      ota: {
        roots: {}, public_key: null, http_port: null, http_bind: "127.0.0.1", callback_url: null, probation_timeout: 120, keep_backups: 2, limits: {},
      },
      status_page: { enabled: true, port: 7180, bind: "0.0.0.0", webcam: true, public_url: null },
    });
  });

  it("reads every option of every section", () => {
    const cfg = parseConfig(
      [
        "[moonflash]",
        "moonraker_socket: ~/printer_data/comms/moonraker.sock",
        "moonraker_url: ws://printer.local:7125/websocket",
        "api_key: 0123abcd",
        "klipper_path: /opt/klipper",
        "katapult_path: ~/src/katapult",
        "python: python3",
        "wchisp_path: /usr/local/bin/wchisp",
        "log_level: debug",
        "service_timeout: 120",
        "",
        "[mcu]",
        "serial: /dev/serial/by-id/usb-Klipper_stm32f446xx_1234-if00",
        "baud: 500000",
        "method: katapult, make",
        "firmware: ~/klipper/out/klipper.bin",
        "kconfig: ~/klipper/.config.main",
        "out_dir: /tmp/out-main",
        "mcu_type: stm32f446xx",
        "flash_size: 480K",
        "bootloader: usb",
        "timeout: 60",
        "",
        "[mcu toolhead]",
        "canbus_uuid: 0A1B2C3D4E5F",
        "canbus_interface: can1",
        "method: flashtool",
        "flash_size: 1M",
        "",
        "[mcu ch32]",
        "serial: /dev/ttyUSB0",
        "method: wchisp",
        "wchisp_transport: serial",
        "flash_size: 65536",
        "",
        "[ota]",
        "roots:",
        "  config = ~/printer_data/config/",
        "  klipper=/opt/klipper",
        `public_key: ${"A".repeat(43)}=`,
        "http_port: 7130",
        "http_bind: 0.0.0.0",
        "callback_url: https://vendor.example.com/ota/result",
        "probation_timeout: 300",
        "keep_backups: 3",
        "limits:",
        "  file_size=64M",
        "  download_size=1G",
      ].join("\n"),
      FILE,
      "/data",
    );
    expect(cfg.moonflash).toEqual({
      moonraker_socket: join(homedir(), "printer_data/comms/moonraker.sock"),
      moonraker_url: "ws://printer.local:7125/websocket",
      api_key: "0123abcd",
      klipper_path: "/opt/klipper",
      katapult_path: join(homedir(), "src/katapult"),
      python: "python3",
      wchisp_path: "/usr/local/bin/wchisp",
      log_level: "debug",
      service_timeout: 120,
    });
    expect(cfg.mcus.mcu).toEqual({
      section: "mcu",
      serial: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1234-if00",
      canbus_uuid: null,
      canbus_interface: "can0",
      baud: 500000,
      method: ["katapult", "make"],
      firmware: join(homedir(), "klipper/out/klipper.bin"),
      kconfig: join(homedir(), "klipper/.config.main"),
      out_dir: "/tmp/out-main/",
      mcu_type: "stm32f446xx",
      flash_size: 480 * 1024,
      bootloader: "usb",
      wchisp_transport: "usb",
      linux_mcu_path: null,
      linux_mcu_service: null,
      backup_before_flash: null,
      timeout: 60,
    });
    expect(cfg.mcus["mcu toolhead"]).toMatchObject({
      section: "mcu toolhead",
      serial: null,
      canbus_uuid: "0a1b2c3d4e5f",
      canbus_interface: "can1",
      baud: 250000,
      method: ["flashtool"],
      flash_size: 1024 * 1024,
      bootloader: "auto",
      timeout: 300,
    });
    expect(cfg.mcus["mcu ch32"]).toMatchObject({ method: ["wchisp"], wchisp_transport: "serial", flash_size: 65536 });
    expect(cfg.ota).toEqual({
      roots: { config: join(homedir(), "printer_data/config"), klipper: "/opt/klipper" },
      public_key: `${"A".repeat(43)}=`,
      http_port: 7130,
      http_bind: "0.0.0.0",
      callback_url: "https://vendor.example.com/ota/result",
      probation_timeout: 300,
      keep_backups: 3,
      limits: { maxFileBytes: 64 * 1024 ** 2, maxDownloadBytes: 1024 ** 3 },
    });
  });

  it("treats an empty option as not set and leaves method null (auto) by default", () => {
    const cfg = parseConfig("[mcu]\nmethod:\nbaud:\nfirmware:\n", FILE, "/data");
    expect(cfg.mcus.mcu).toMatchObject({ method: null, baud: 250000, firmware: null });
    expect(parseConfig("[mcu]\nmethod: auto\n", FILE, "/data").mcus.mcu!.method).toBeNull();
  });

  it("keys [mcu NAME] the way Klipper names it, whatever the spacing", () => {
    const cfg = parseConfig("[mcu   toolhead]\nbaud: 1\n", FILE, "/data");
    expect(Object.keys(cfg.mcus)).toEqual(["mcu toolhead"]);
    expect(configError("[mcu toolhead]\n[mcu  toolhead]\n").message).toBe(
      `${FILE}:2: [mcu  toolhead] duplicate of [mcu toolhead] at line 1; merge the two`,
    );
  });

  it.each([
    ["[mcu]\nbaud: fast\n", 2, "baud", "expected a positive integer, got 'fast'"],
    ["[mcu]\nbaud: 0\n", 2, "baud", "expected a positive integer, got '0'"],
    ["[mcu]\ntimeout: 5\n", 2, "timeout", "expected an integer from 10 to 3600, got '5'"],
    ["[moonflash]\nservice_timeout: 601\n", 2, "service_timeout", "expected an integer from 5 to 600, got '601'"],
    ["[mcu]\nserial: ttyACM0\n", 2, "serial", "expected an absolute device path, e.g. /dev/serial/by-id/..., got 'ttyACM0'"],
    ["[mcu]\ncanbus_uuid: 0a1b2c3d4e\n", 2, "canbus_uuid", "expected 12 hex digits (the canbus_uuid from Klipper's config), got '0a1b2c3d4e'"],
    ["[mcu]\nbootloader: dfu\n", 2, "bootloader", "expected one of auto | usb | serial | none, got 'dfu'"],
    ["[mcu]\nflash_size: 1G\n", 2, "flash_size", "expected a size in bytes such as 131072, 256K or 1M, got '1G'"],
    ["[mcu]\nfirmware: out/klipper.bin\n", 2, "firmware", "expected an absolute path (or one starting with ~/), got 'out/klipper.bin'"],
    ["[mcu]\nmethod: katapul\n", 2, "method", "unknown method 'katapul' (did you mean 'katapult'?); expected a comma list of katapult, flashtool, make, wchisp, linux or auto"],
    ["[mcu]\nmethod: make, make\n", 2, "method", "method 'make' is listed twice"],
    ["[mcu]\nbackup_before_flash: maybe\n", 2, "backup_before_flash", "expected True or False, got 'maybe'"],
    ["[mcu]\nlinux_mcu_path: klipper_mcu\n", 2, "linux_mcu_path", "expected an absolute path (or one starting with ~/), got 'klipper_mcu'"],
    ["[moonflash]\nlog_level: verbose\n", 2, "log_level", "expected one of debug | info | warn | error, got 'verbose'"],
    ["[moonflash]\nmoonraker_url: http://host:7125\n", 2, "moonraker_url", "expected a websocket URL such as ws://host:7125/websocket, got 'http://host:7125'"],
    ["[ota]\nprobation_timeout: 1\n", 2, "probation_timeout", "expected an integer from 5 to 3600, got '1'"],
    ["[ota]\n\nkeep_backups: 0\n", 3, "keep_backups", "expected an integer from 1 to 20, got '0'"],
    ["[ota]\nroots:\n  config=relative/dir\n", 2, "roots", "expected an absolute directory (or one starting with ~/) for root 'config', got 'relative/dir'"],
    ["[ota]\ncallback_url: ftp://vendor.example.com/\n", 2, "callback_url", "expected an http:// or https:// URL, got 'ftp://vendor.example.com/'"],
  ])("rejects a bad value: %j", (text, line, option, problem) => {
    const section = /^\[([^\]]+)\]/.exec(text)![1]!;
    const err = configError(text);
    expect(err.code).toBe("CONFIG_INVALID");
    expect(err.message).toBe(`${FILE}:${line}: [${section}] ${option}: ${problem}`);
    expect(err.details).toEqual({ file: FILE, line, section, option });
  });

  it("rejects serial together with canbus_uuid", () => {
    const err = configError("[mcu]\nserial: /dev/ttyACM0\ncanbus_uuid: 0a1b2c3d4e5f\n");
    expect(err.message).toBe(`${FILE}:3: [mcu] canbus_uuid: serial and canbus_uuid are mutually exclusive; keep the one the board uses`);
  });

  it("rejects an unknown option with a did-you-mean hint when one is close", () => {
    const err = configError("[mcu]\nserail: /dev/ttyACM0\n");
    expect(err.message).toBe(`${FILE}:2: [mcu] serail: unknown option; did you mean 'serial'?`);
    expect(err.details).toEqual({ file: FILE, line: 2, section: "mcu", option: "serail", suggestion: "serial" });
  });

  it("rejects an unknown option without a hint by listing what the section accepts, even when empty", () => {
    const err = configError("[ota]\nkeep_backups: 3\nfrobnicate:\n");
    expect(err.message).toBe(
      `${FILE}:3: [ota] frobnicate: unknown option; [ota] accepts roots, public_key, http_port, http_bind, callback_url, probation_timeout, keep_backups, limits`,
    );
    // The options of the placeholder section before OTA was wired are errors now.
    expect(configError("[ota]\nmanifest_url: https://example.com/m.json\n").message).toContain("[ota] manifest_url: unknown option");
  });

  it("rejects unknown sections, with a hint when close", () => {
    expect(configError("[moonflsh]\n").message).toBe(`${FILE}:1: [moonflsh] unknown section; did you mean [moonflash]?`);
    expect(configError("[printer]\n").message).toBe(
      `${FILE}:1: [printer] unknown section; moonflash.conf has [moonflash], [mcu], [mcu NAME], [ota] and [status_page]`,
    );
  });

  it("reports the first error by line and lists all of them in details.errors", () => {
    const err = configError("[mcu]\nbsud: 1\nbaud: fast\n[moonflsh]\n");
    expect(err.details.line).toBe(2);
    expect(err.details.errors).toEqual([
      `${FILE}:2: [mcu] bsud: unknown option; did you mean 'baud'?`,
      `${FILE}:3: [mcu] baud: expected a positive integer, got 'fast'`,
      `${FILE}:4: [moonflsh] unknown section; did you mean [moonflash]?`,
    ]);
  });

  it("passes syntax errors through with their location", () => {
    expect(configError("[mcu]\nbaud: 1\nbaud: 2\n").details).toMatchObject({ line: 3, section: "mcu", option: "baud" });
  });
});

describe("loadConfig", () => {
  let dataDir: string;
  beforeEach(async () => {
    dataDir = await mkdtemp(join(tmpdir(), "moonflash-config-"));
  });
  afterEach(async () => {
    await rm(dataDir, { recursive: true, force: true });
  });

  it("returns defaults with exists=false when the file is missing", async () => {
    const cfg = await loadConfig(dataDir);
    expect(cfg.exists).toBe(false);
    expect(cfg.file).toBe(join(dataDir, "config", "moonflash.conf"));
    expect(cfg.moonflash.moonraker_socket).toBe(join(dataDir, "comms", "moonraker.sock"));
    expect(cfg.mcus).toEqual({});
  });

  it("reads <data>/config/moonflash.conf", async () => {
    await mkdir(join(dataDir, "config"));
    await writeFile(join(dataDir, "config", "moonflash.conf"), "[mcu]\nserial: /dev/ttyACM0\n");
    const cfg = await loadConfig(dataDir);
    expect(cfg.exists).toBe(true);
    expect(cfg.mcus.mcu!.serial).toBe("/dev/ttyACM0");
  });

  it("names the file in errors and reports an unreadable path as CONFIG_INVALID", async () => {
    const file = join(dataDir, "other.conf");
    await writeFile(file, "[mcu]\nbaud: fast\n");
    await expect(loadConfig(dataDir, file)).rejects.toMatchObject({
      code: "CONFIG_INVALID",
      message: `${file}:2: [mcu] baud: expected a positive integer, got 'fast'`,
    });
    await expect(loadConfig(dataDir, dataDir)).rejects.toMatchObject({ code: "CONFIG_INVALID", details: { file: dataDir } });
  });
});

describe("configSummary", () => {
  it("hides the api key and URL credentials but shows everything else", () => {
    const cfg = parseConfig(
      "[moonflash]\napi_key: s3cret\nmoonraker_url: wss://user:pw@host/websocket\n[mcu]\nbaud: 1\n[ota]\ncallback_url: https://vendor:t0ken@example.com/ota\nroots:\n  config=/data/config\n",
      FILE,
      "/data",
    );
    const summary = configSummary(cfg);
    const text = JSON.stringify(summary);
    expect(text).not.toContain("s3cret");
    expect(text).not.toContain("pw@");
    expect(summary.moonflash).toMatchObject({ api_key: "(set, hidden)", moonraker_url: "wss://host/websocket", log_level: "info" });
    expect(summary.mcus).toEqual(cfg.mcus);
    expect(text).not.toContain("t0ken");
    expect(summary.ota).toMatchObject({ callback_url: "https://example.com/ota", roots: { config: "/data/config" } });
    expect(cfg.moonflash.api_key).toBe("s3cret");
    expect(cfg.ota.callback_url).toBe("https://vendor:t0ken@example.com/ota");
  });
});
