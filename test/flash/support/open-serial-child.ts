// Run in a child process (katapult-link.test.ts starts it as an unprivileged user): opens a serial device with
// openSerialLink and prints the outcome as one JSON line, {opened: true} or the MoonflashError's code and message.

import { isMoonflashError } from "../../../src/core/errors.js";
import { openSerialLink } from "../../../src/flash/link.js";

const path = process.argv[2];
if (!path) throw new Error("usage: open-serial-child.ts <device>");
try {
  const link = await openSerialLink(path, 250000);
  await link.close();
  console.log(JSON.stringify({ opened: true }));
} catch (err) {
  if (!isMoonflashError(err)) throw err;
  console.log(JSON.stringify({ code: err.code, message: err.message, device: err.details.device }));
}
