import { describe, expect, it } from "vitest";
import { parseIni } from "../../src/core/ini.js";
import { isMoonflashError, type MoonflashError } from "../../src/core/errors.js";

function parseError(text: string): MoonflashError {
  try {
    parseIni(text, "/cfg/moonflash.conf");
  } catch (err) {
    if (isMoonflashError(err)) return err;
    throw err;
  }
  throw new Error("expected a CONFIG_INVALID error");
}

describe("parseIni", () => {
  it("reads sections with spaces, both separators and the line of everything", () => {
    const doc = parseIni("[moonflash]\nklipper_path: ~/klipper\n\n[mcu toolhead]\nbaud = 500000\n", "f.conf");
    expect([...doc.sections.keys()]).toEqual(["moonflash", "mcu toolhead"]);
    const mcu = doc.sections.get("mcu toolhead")!;
    expect(mcu.line).toBe(4);
    expect(mcu.options.get("baud")).toEqual({ name: "baud", value: "500000", line: 5 });
    expect(doc.sections.get("moonflash")!.options.get("klipper_path")).toEqual({ name: "klipper_path", value: "~/klipper", line: 2 });
  });

  it("splits on the first separator so URLs keep their colons", () => {
    const doc = parseIni("[moonflash]\nmoonraker_url = ws://host:7125/websocket\nother: a=b\n", "f.conf");
    const options = doc.sections.get("moonflash")!.options;
    expect(options.get("moonraker_url")!.value).toBe("ws://host:7125/websocket");
    expect(options.get("other")!.value).toBe("a=b");
  });

  it("drops comment lines and inline comments after whitespace, keeps # without whitespace", () => {
    const text = "# top\n; also\n[ota]  # section comment\nmanifest_url: https://x/m.json#frag  # why\nchannel: beta ; inline\nempty: # nothing\n";
    const options = parseIni(text, "f.conf").sections.get("ota")!.options;
    expect(options.get("manifest_url")!.value).toBe("https://x/m.json#frag");
    expect(options.get("channel")!.value).toBe("beta");
    expect(options.get("empty")!.value).toBe("");
  });

  it("joins indented continuation lines with newlines, keeping inner blank lines but not trailing ones", () => {
    const text = "[s]\ngcode:\n  G28\n\n  # a comment\n  M84  ; inline\n\n\nnext: 1\n";
    const options = parseIni(text, "f.conf").sections.get("s")!.options;
    expect(options.get("gcode")!.value).toBe("G28\n\nM84");
    expect(options.get("next")).toEqual({ name: "next", value: "1", line: 9 });
  });

  it("continues a value that starts on the option line", () => {
    const options = parseIni("[s]\nmethod: katapult,\n\tmake\n", "f.conf").sections.get("s")!.options;
    expect(options.get("method")!.value).toBe("katapult,\nmake");
  });

  it("accepts CRLF line ends and a byte order mark", () => {
    const doc = parseIni("\uFEFF[mcu]\r\nbaud: 1\r\n", "f.conf");
    expect(doc.sections.get("mcu")!.options.get("baud")!.value).toBe("1");
  });

  it("rejects a duplicate section, naming both lines", () => {
    const err = parseError("[mcu]\nbaud: 1\n[mcu]\n");
    expect(err.code).toBe("CONFIG_INVALID");
    expect(err.message).toBe("/cfg/moonflash.conf:3: [mcu] duplicate section (first at line 1); merge the two");
    expect(err.details).toEqual({ file: "/cfg/moonflash.conf", line: 3, section: "mcu", option: null });
  });

  it("rejects a duplicate option with file, line, section and option", () => {
    const err = parseError("[mcu toolhead]\nbaud: 1\nbaud = 2\n");
    expect(err.message).toBe("/cfg/moonflash.conf:3: [mcu toolhead] baud: duplicate option (first at line 2); keep one");
    expect(err.details).toEqual({ file: "/cfg/moonflash.conf", line: 3, section: "mcu toolhead", option: "baud" });
  });

  it("rejects an option outside any section", () => {
    const err = parseError("# comment\nbaud: 1\n[mcu]\n");
    expect(err.message).toMatch(/^\/cfg\/moonflash\.conf:2: baud: option outside a section/);
    expect(err.details).toMatchObject({ line: 2, section: null, option: "baud" });
  });

  it("rejects text without a separator", () => {
    const err = parseError("[mcu]\nbaud 250000\n");
    expect(err.message).toBe("/cfg/moonflash.conf:2: [mcu] expected 'option: value', got 'baud 250000'");
  });

  it("rejects an indented line that follows no option", () => {
    expect(parseError("[mcu]\n  baud: 1\n").details).toMatchObject({ line: 2, section: "mcu" });
  });

  it("rejects malformed and empty section headers", () => {
    expect(parseError("[mcu\n").details).toMatchObject({ line: 1 });
    expect(parseError("[mcu]\nbaud: 1\n[ ]\n").details).toMatchObject({ line: 3 });
  });
});
