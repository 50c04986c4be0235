// The printer as engines see it. The Moonraker agent session implements this port; engines and the CLI's
// offline mode depend on it, never on the transport.

export type KlippyState = "ready" | "startup" | "shutdown" | "error" | "disconnected";

export interface ServiceState {
  active_state: string;
  sub_state: string;
}

export interface PrinterState {
  /** The agent currently has an identified Moonraker connection. */
  moonrakerConnected: boolean;
  klippyConnected: boolean;
  klippyState: KlippyState;
  stateMessage: string;
  /** print_stats.state: standby | printing | paused | complete | cancelled | error. */
  printState: string | null;
  /** idle_timeout.state: Idle | Ready | Printing. */
  idleState: string | null;
  /** Systemd/supervisor unit Klipper runs as (machine.system_info.instance_ids.klipper). */
  klipperService: string;
  services: Record<string, ServiceState>;
  moonrakerVersion: string | null;
}

/** One `[mcu]` / `[mcu NAME]` section of Klipper's config with what Klipper reports about it. */
export interface McuInfo {
  /** Config section name: "mcu" or "mcu toolhead". */
  section: string;
  /** Short name: "mcu" for the main MCU, else the part after "mcu ". */
  name: string;
  serial?: string;
  canbusUuid?: string;
  canbusInterface?: string;
  baud?: number;
  restartMethod?: string;
  /** mcu_version reported by the running firmware (absent while Klipper is stopped). */
  mcuVersion?: string;
  mcuBuildVersions?: string;
  /** mcu_constants.MCU, e.g. "stm32f446xx". */
  mcuType?: string;
}

export interface McuReport {
  /** Host Klipper software_version (printer.info). */
  hostVersion: string | null;
  mcus: McuInfo[];
}

/** One entry of machine.peripherals.serial. */
export interface SerialPeripheral {
  device_type: string;
  device_path: string;
  device_name: string;
  path_by_id: string | null;
  path_by_hardware: string | null;
  usb_location?: string | null;
  driver_name?: string;
}

export interface CanbusNode {
  uuid: string;
  application: string;
}

/** What is known before Moonraker has told anything: nothing connected, Klipper's default unit name. */
export function initialPrinterState(): PrinterState {
  return {
    moonrakerConnected: false,
    klippyConnected: false,
    klippyState: "disconnected",
    stateMessage: "",
    printState: null,
    idleState: null,
    klipperService: "klipper",
    services: {},
    moonrakerVersion: null,
  };
}

export interface PrinterPort {
  state(): PrinterState;
  /** print_stats printing/paused, or idle_timeout Printing. */
  isPrinting(): boolean;
  /** Called on every state change; returns an unsubscribe function. */
  onStateChange(listener: (state: PrinterState) => void): () => void;
  /**
   * machine.services.stop; resolves only once Moonraker reports the service inactive.
   * Rejects with SERVICE_TIMEOUT after `timeoutMs`. Defaults to the Klipper unit.
   */
  stopService(service?: string, timeoutMs?: number): Promise<void>;
  /** machine.services.start; resolves once the service is active and, for Klipper, Klippy is connected. */
  startService(service?: string, timeoutMs?: number): Promise<void>;
  /** printer.gcode.script. Rejects with KLIPPER_NOT_CONNECTED while Klipper is down. */
  gcode(script: string): Promise<void>;
  /** connection.send_event (notify_agent_event to every other client). */
  sendEvent(event: string, data?: unknown): Promise<void>;
  /** configfile.settings of every [mcu*] section plus each MCU's versions (empty list while Klipper is down). */
  mcuReport(): Promise<McuReport>;
  serialPeripherals(): Promise<SerialPeripheral[]>;
  canbusNodes(iface: string): Promise<CanbusNode[]>;
}
