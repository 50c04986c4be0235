// Values the fake reports as they were recorded on the rig (test/fixtures/moonraker/objects_query.jsonl, written by
// scripts/record-moonraker.ts): Moonraker v0.10.0-31 on Debian 12 with supervisord_cli, Klipper v0.13.0-730 with
// the Linux host MCU. Where the recording has a "<...>" placeholder (host details such as hostname, CPU, system
// versions), any string conforms; the values here are the earlier rig's.

export const MOONRAKER_VERSION = "v0.10.0-31-gd5ee171";
export const API_VERSION = [1, 5, 0];
export const API_VERSION_STRING = "1.5.0";
export const KLIPPER_VERSION = "v0.13.0-730-g84104bbbd";

export const COMPONENTS = [
  "secrets", "template", "klippy_connection", "jsonrpc", "internal_transport", "application", "websockets",
  "database", "dbus_manager", "file_manager", "authorization", "klippy_apis", "shell_command", "machine",
  "data_store", "proc_stats", "job_state", "job_queue", "history", "http_client", "announcements", "webcam",
  "extensions",
];

export const REGISTERED_DIRECTORIES = ["config", "logs", "gcodes", "config_examples", "docs"];

export const CLIENT_TYPES = ["web", "mobile", "desktop", "display", "bot", "agent", "other"];

// Remote methods Moonraker registers itself: machine.py (shutdown/reboot) and job_queue.py (pause/start).
export const MOONRAKER_REMOTE_METHODS = ["shutdown_machine", "reboot_machine", "pause_job_queue", "start_job_queue"];

export function printerInfoStatic(): Record<string, unknown> {
  return {
    hostname: "127.0.0.1",
    klipper_path: "~/klipper",
    python_path: "~/venv/bin/python",
    process_id: process.pid,
    user_id: 0,
    group_id: 0,
    log_file: "~/printer_data/logs/klippy.log",
    config_file: "~/printer_data/config/printer.cfg",
    cpu_info: "2 core AMD EPYC",
  };
}

/** The parts of machine.system_info that do not depend on service state. */
export function systemInfoStatic(): Record<string, unknown> {
  return {
    python: { version: [3, 11, 2, "final", 0], version_string: "3.11.2 (main, Apr 28 2025, 14:11:48) [GCC 12.2.0]" },
    cpu_info: {
      cpu_count: 2, bits: "64bit", processor: "x86_64", cpu_desc: "AMD EPYC", serial_number: "",
      hardware_desc: "", model: "", total_memory: 24684092, memory_units: "kB",
    },
    sd_info: {},
    distribution: {
      name: "Debian GNU/Linux 12 (bookworm)", id: "debian", version: "12",
      version_parts: { major: "12", minor: "", build_number: "" }, like: "", codename: "bookworm",
      release_info: {}, kernel_version: "6.18.44-fc-v657",
    },
    virtualization: { virt_type: "container", virt_identifier: "docker" },
    network: {
      eth0: {
        mac_address: "00:00:00:00:00:00",
        ip_addresses: [
          { family: "ipv4", address: "127.0.0.1", is_link_local: false },
          { family: "ipv6", address: "::1", is_link_local: false },
          { family: "ipv6", address: "::1", is_link_local: true },
        ],
      },
    },
    canbus: {},
  };
}

/** Config sections the rig's printer.cfg had besides [mcu*] and [gcode_macro *], as configfile.settings shows them. */
export function baseConfigSettings(): Record<string, Record<string, unknown>> {
  const heatersOff = "\n{% if 'heaters' in printer %}\n   TURN_OFF_HEATERS\n{% endif %}\n";
  return {
    respond: { default_type: "echo", default_prefix: "echo:" },
    virtual_sdcard: { path: "~/printer_data/gcodes", on_error_gcode: heatersOff },
    pause_resume: { recover_velocity: 50.0 },
    printer: { max_velocity: 1.0, max_accel: 1.0, minimum_cruise_ratio: 0.5, square_corner_velocity: 5.0, kinematics: "none" },
    idle_timeout: { timeout: 600.0, gcode: `${heatersOff}M84\n` },
  };
}

/** The mcu object's last_stats as recorded; the fake does not simulate the serial link. */
export function mcuLastStats(): Record<string, unknown> {
  return {
    mcu_awake: 0.0, mcu_task_avg: 4e-6, mcu_task_stddev: 9e-6, bytes_write: 1188, bytes_read: 6239,
    bytes_retransmit: 0, bytes_invalid: 0, send_seq: 154, receive_seq: 154, retransmit_seq: 0, srtt: 0.0,
    rttvar: 0.0, rto: 0.025, ready_bytes: 0, upcoming_bytes: 0, freq: 49999949,
  };
}
