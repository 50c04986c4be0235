// Klipper's config as MCU sections: every `[mcu]` / `[mcu NAME]` with its serial/CAN settings and what the
// running firmware reports (printer objects mcu*: mcu_version, mcu_build_versions, mcu_constants).

import type { McuInfo, McuReport } from "../core/printer.js";
import { asRecord } from "./klipper-tracker.js";
import { isKlipperAway, requestFailed } from "./failures.js";
import type { RpcPeer } from "./rpc.js";

const MCU_OBJECT_FIELDS = ["mcu_version", "mcu_build_versions", "mcu_constants"];
const MCU_SECTION = /^mcu(\s|$)/i;

/** The MCU sections and versions Klipper reports; empty while Klipper is not reachable. */
export async function readMcuReport(peer: RpcPeer): Promise<McuReport> {
  try {
    const listed = await peer.request<{ objects?: unknown }>("printer.objects.list");
    const objectNames = (Array.isArray(listed.objects) ? listed.objects : []).filter(
      (name): name is string => typeof name === "string" && MCU_SECTION.test(name),
    );
    const query: Record<string, string[]> = { configfile: ["settings"] };
    for (const name of objectNames) query[name] = MCU_OBJECT_FIELDS;
    const queried = await peer.request<{ status?: unknown }>("printer.objects.query", { objects: query });
    const printerInfo = await peer.request<{ software_version?: unknown }>("printer.info");
    const status = asRecord(queried.status) ?? {};
    const settings = asRecord(asRecord(status.configfile)?.settings) ?? {};
    return {
      hostVersion: typeof printerInfo.software_version === "string" ? printerInfo.software_version : null,
      mcus: buildMcuList(objectNames, settings, status),
    };
  } catch (err) {
    if (isKlipperAway(err)) return { hostVersion: null, mcus: [] };
    throw requestFailed(err);
  }
}

/** One McuInfo per `[mcu*]` section, in Klipper's object order; config sections without an object come last. */
function buildMcuList(
  objectNames: string[],
  settings: Record<string, unknown>,
  status: Record<string, unknown>,
): McuInfo[] {
  // configfile.settings keys are lower-case; printer object names keep the config's spelling.
  const sections = new Map<string, string>();
  for (const name of objectNames) sections.set(name.toLowerCase(), name);
  for (const key of Object.keys(settings)) {
    if (MCU_SECTION.test(key) && !sections.has(key.toLowerCase())) sections.set(key.toLowerCase(), key);
  }
  return [...sections].map(([key, section]) =>
    toMcuInfo(section, asRecord(settings[key]) ?? {}, asRecord(status[section]) ?? {}),
  );
}

function toMcuInfo(section: string, settings: Record<string, unknown>, object: Record<string, unknown>): McuInfo {
  const name = section.replace(MCU_SECTION, "").trim();
  const info: McuInfo = { section, name: name === "" ? "mcu" : name };
  const text = (value: unknown): string | undefined =>
    typeof value === "string" && value !== "" ? value : undefined;
  const serial = text(settings.serial);
  if (serial) info.serial = serial;
  const canbusUuid = text(settings.canbus_uuid);
  if (canbusUuid) info.canbusUuid = canbusUuid;
  const canbusInterface = text(settings.canbus_interface);
  if (canbusInterface) info.canbusInterface = canbusInterface;
  const baud = typeof settings.baud === "string" ? Number(settings.baud) : settings.baud;
  if (typeof baud === "number" && Number.isFinite(baud)) info.baud = baud;
  const restartMethod = text(settings.restart_method);
  if (restartMethod) info.restartMethod = restartMethod;
  const mcuVersion = text(object.mcu_version);
  if (mcuVersion) info.mcuVersion = mcuVersion;
  const buildVersions = text(object.mcu_build_versions);
  if (buildVersions) info.mcuBuildVersions = buildVersions;
  const mcuType = text(asRecord(object.mcu_constants)?.MCU);
  if (mcuType) info.mcuType = mcuType;
  return info;
}
