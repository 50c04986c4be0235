// Moonraker restarts at each step of a flash, briefly (back well within service_timeout). The table: support/moonraker-faults.ts.
import { faultTable } from "./support/moonraker-faults.js";

faultTable("short");
