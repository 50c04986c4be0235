// USB ids moonflash recognises, one row per id with where it comes from: the only such table. Discovery
// classifies serial devices with it; the flashers ask discovery for the kind (Katapult's bootloader entry,
// wchisp's port autodetect) and never compare ids themselves.

export const USB_DEVICE_KINDS = [
  "klipper",
  "katapult",
  "usb-can-bridge",
  "wch-isp",
  "stm32-dfu",
  "rp2-boot",
  "uart-adapter",
  "unknown",
] as const;
export type UsbDeviceKind = (typeof USB_DEVICE_KINDS)[number];

export interface UsbIdEntry {
  /** Four lower-case hex digits, as sysfs `idVendor` spells it. */
  vendorId: string;
  productId: string;
  kind: UsbDeviceKind;
  label: string;
  /** Where the id is defined or documented. */
  source: string;
}

export const USB_IDS: readonly UsbIdEntry[] = [
  {
    vendorId: "1d50",
    productId: "614e",
    kind: "klipper",
    label: "Klipper (USB)",
    source: "Klipper src/Kconfig USB_DEVICE_ID default; Katapult scripts/flashtool.py KLIPPER_USB_ID",
  },
  {
    vendorId: "1d50",
    productId: "6177",
    kind: "katapult",
    label: "Katapult bootloader (USB)",
    source: "Katapult src/Kconfig USB_DEVICE_ID; flashtool.py KATAPULT_USB_ID; Moonraker utils/sysfs_devs.py",
  },
  {
    vendorId: "1d50",
    productId: "606f",
    kind: "usb-can-bridge",
    label: "Klipper USB-CAN bridge",
    source: "Klipper src/Kconfig USB_DEVICE_ID for USBCANBUS; flashtool.py _search_canbus_bridge",
  },
  {
    vendorId: "4348",
    productId: "55e0",
    kind: "wch-isp",
    label: "WCH ISP bootloader (USB)",
    source: "ch32-rs/wchisp src/transport/usb.rs device ids",
  },
  {
    vendorId: "1a86",
    productId: "55e0",
    kind: "wch-isp",
    label: "WCH ISP bootloader (USB)",
    source: "ch32-rs/wchisp src/transport/usb.rs device ids",
  },
  {
    vendorId: "0483",
    productId: "df11",
    kind: "stm32-dfu",
    label: "STM32 ROM DFU bootloader",
    source: "ST AN3156 USB DFU ROM bootloader id; Klipper docs/Bootloaders.md `make flash FLASH_DEVICE=0483:df11`",
  },
  {
    vendorId: "2e8a",
    productId: "0003",
    kind: "rp2-boot",
    label: "RP2040 BOOTSEL",
    source: "Klipper scripts/flash_usb.py flash_rp2040 raw id",
  },
  {
    vendorId: "2e8a",
    productId: "000f",
    kind: "rp2-boot",
    label: "RP2350 BOOTSEL",
    source: "Klipper scripts/flash_usb.py flash_rp2040 raw id for rp2350",
  },
  {
    vendorId: "1a86",
    productId: "7523",
    kind: "uart-adapter",
    label: "CH340 USB-UART adapter",
    source: "Linux drivers/usb/serial/ch341.c id_table",
  },
  {
    vendorId: "10c4",
    productId: "ea60",
    kind: "uart-adapter",
    label: "CP210x USB-UART adapter",
    source: "Linux drivers/usb/serial/cp210x.c id_table",
  },
  {
    vendorId: "0403",
    productId: "6001",
    kind: "uart-adapter",
    label: "FTDI FT232 USB-UART adapter",
    source: "Linux drivers/usb/serial/ftdi_sio_ids.h FTDI_8U232AM_PID",
  },
  {
    vendorId: "067b",
    productId: "2303",
    kind: "uart-adapter",
    label: "PL2303 USB-UART adapter",
    source: "Linux drivers/usb/serial/pl2303.h PL2303_PRODUCT_ID",
  },
];

export interface UsbClassification {
  kind: UsbDeviceKind;
  label: string;
}

function normaliseId(id: string | undefined): string | undefined {
  if (id === undefined) return undefined;
  const hex = id.trim().toLowerCase().replace(/^0x/, "");
  return /^[0-9a-f]{1,4}$/.test(hex) ? hex.padStart(4, "0") : undefined;
}

/**
 * Classifies a device by USB id, falling back to the USB manufacturer string the way flashtool.py does
 * (`manufacturer == "klipper"` / `"katapult"`), so boards built with a custom USB id are still recognised.
 */
export function classifyUsbDevice(ids: { vendorId?: string; productId?: string; manufacturer?: string }): UsbClassification {
  const vendorId = normaliseId(ids.vendorId);
  const productId = normaliseId(ids.productId);
  const row = USB_IDS.find((r) => r.vendorId === vendorId && r.productId === productId);
  if (row) return { kind: row.kind, label: row.label };
  const manufacturer = ids.manufacturer?.trim().toLowerCase();
  if (manufacturer === "klipper") return { kind: "klipper", label: "Klipper (USB, custom id)" };
  if (manufacturer === "katapult") return { kind: "katapult", label: "Katapult bootloader (USB, custom id)" };
  if (vendorId !== undefined && productId !== undefined) {
    return { kind: "unknown", label: `USB device ${vendorId}:${productId}` };
  }
  return { kind: "unknown", label: "Serial port" };
}
