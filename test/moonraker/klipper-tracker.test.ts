// The tracker keeps Klipper's state and message consistent when Moonraker and printer.info disagree for a moment.

import { expect, it } from "vitest";
import pino from "pino";
import { KlipperTracker } from "../../src/moonraker/klipper-tracker.js";

it("takes the message of a starting Klipper from printer.info, but not a 'ready' Moonraker has not announced yet", () => {
  const tracker = new KlipperTracker(pino({ level: "silent" }));
  tracker.serverInfo({ klippy_connected: true, klippy_state: "startup" });
  tracker.printerInfo({ state: "startup", state_message: "Printer is not ready\nThe klippy host software is attempting to connect.\n" });
  expect(tracker.state).toMatchObject({ klippyState: "startup", stateMessage: "Printer is not ready\nThe klippy host software is attempting to connect." });
  // Seen on a real rig: printer.info says ready ~0.7 s before notify_klippy_ready.
  tracker.printerInfo({ state: "ready", state_message: "Printer is ready" });
  expect(tracker.state).toMatchObject({ klippyState: "startup", stateMessage: "Printer is not ready\nThe klippy host software is attempting to connect." });
  tracker.klippyReady();
  expect(tracker.state).toMatchObject({ klippyState: "ready", stateMessage: "Printer is ready" });
});
