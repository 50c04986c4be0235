// Moonraker restarts at each step of a flash, for longer than service_timeout. The table: support/moonraker-faults.ts.
import { faultTable } from "./support/moonraker-faults.js";

faultTable("long");
