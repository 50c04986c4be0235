// How a user names an MCU section when asking for a flash: Klipper's section "mcu toolhead" is typed "toolhead"
// (FLASH_MCU MCU=toolhead, moonflash flash toolhead); the main "mcu" stays "mcu". The inverse of engine.ts
// mcuSectionName, kept apart so the Katapult flasher can name the retry without importing the engine.

/** "mcu" → "mcu", "mcu toolhead" → "toolhead". */
export function mcuUserName(section: string): string {
  const words = section.trim().split(/\s+/).filter(Boolean);
  if (words[0] === "mcu" && words.length > 1) words.shift();
  return words.join(" ") || "mcu";
}

/** The two ways to ask for a flash of this section again, for messages. */
export function flashCommandsFor(section: string): string {
  const name = mcuUserName(section);
  return `FLASH_MCU MCU=${name} in a macro, or moonflash flash ${name}`;
}
