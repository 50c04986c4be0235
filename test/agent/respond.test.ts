// RESPOND lines must survive Klipper's G-code parser: one quoted MSG, no newline, no ';' (a comment in gcode.py).

import { expect, it } from "vitest";
import { respondScript } from "../../src/agent/progress.js";

it("keeps a message whole through Klipper's G-code parser", () => {
  expect(respondScript('katapult failed: "no reply"; trying make\nline two', "error")).toBe(
    "RESPOND TYPE=error MSG=\"katapult failed: 'no reply', trying make line two\"",
  );
  expect(respondScript("plain")).toBe('RESPOND TYPE=command MSG="plain"');
});
