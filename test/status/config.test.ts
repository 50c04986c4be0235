// [status_page] in moonflash.conf, validated by src/status/config.ts and assembled by src/moonflash-conf.ts.

import { describe, expect, it } from "vitest";
import { isMoonflashError, type MoonflashError } from "../../src/core/errors.js";
import { configSummary, parseConfig } from "../../src/moonflash-conf.js";
import { STATUS_PAGE_DEFAULTS } from "../../src/status/config.js";

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

describe("[status_page]", () => {
  it("is on by default, on port 7180 of every address, as a webcam, with no public URL", () => {
    const defaults = { enabled: true, port: 7180, bind: "0.0.0.0", webcam: true, public_url: null };
    expect(STATUS_PAGE_DEFAULTS).toEqual(defaults);
    expect(parseConfig("", FILE, "/data").status_page).toEqual(defaults);
    expect(parseConfig("[status_page]\n", FILE, "/data").status_page).toEqual(defaults);
  });

  it("reads every option", () => {
    const cfg = parseConfig(
      "[status_page]\nenabled: False\nport: 8099\nbind: 127.0.0.1\nwebcam: no\npublic_url: https://printer.local/moonflash/\n",
      FILE,
      "/data",
    );
    expect(cfg.status_page).toEqual({ enabled: false, port: 8099, bind: "127.0.0.1", webcam: false, public_url: "https://printer.local/moonflash/" });
    expect(parseConfig("[status_page]\nbind: ::\n", FILE, "/data").status_page.bind).toBe("::");
  });

  it.each([
    ["port: 0", "port: expected an integer from 1 to 65535, got '0'"],
    ["port: 70000", "port: expected an integer from 1 to 65535, got '70000'"],
    ["enabled: maybe", "enabled: expected True or False, got 'maybe'"],
    ["bind: everywhere", "bind: expected an IP address to listen on, such as 0.0.0.0 (every address) or 127.0.0.1, got 'everywhere'"],
    ["public_url: ftp://printer.local/", "public_url: expected an http:// or https:// URL such as http://printer.local:7180/, got 'ftp://printer.local/'"],
    ["public_url: printer.local:7180", "public_url: expected an http:// or https:// URL"],
    ["public_url: https://admin:pw@printer.local/", "public_url: expected a URL without user:password@"],
  ])("rejects %s", (line, message) => {
    const err = configError(`[status_page]\n${line}\n`);
    expect(err.code).toBe("CONFIG_INVALID");
    expect(err.message).toContain(`${FILE}:2: [status_page] ${message}`);
  });

  it("names unknown options and misspelt sections", () => {
    expect(configError("[status_page]\nprot: 1\n").message).toBe(`${FILE}:2: [status_page] prot: unknown option; did you mean 'port'?`);
    expect(configError("[status_pge]\n").message).toBe(`${FILE}:1: [status_pge] unknown section; did you mean [status_page]?`);
  });

  it("is in the config summary (agent.info)", () => {
    const cfg = parseConfig("[status_page]\nport: 8099\n", FILE, "/data");
    expect(configSummary(cfg).status_page).toEqual({ ...STATUS_PAGE_DEFAULTS, port: 8099 });
  });
});
