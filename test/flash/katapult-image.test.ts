import { randomBytes } from "node:crypto";
import { deflateSync } from "node:zlib";
import { describe, expect, it } from "vitest";
import { detectImageMcu } from "../../src/flash/katapult/image.js";

const dictionary = (dict: unknown): Buffer => deflateSync(JSON.stringify(dict));

describe("detectImageMcu", () => {
  it("finds the zlib-compressed Klipper dictionary between firmware bytes", () => {
    const image = Buffer.concat([randomBytes(30_000), dictionary({ version: "v0.13.0-1", config: { MCU: "stm32f446xx" } }), randomBytes(12_000)]);
    expect(detectImageMcu(image)).toEqual({ mcu: "stm32f446xx", version: "v0.13.0-1" });
  });

  it("finds it with any zlib level (other header bytes)", () => {
    const dict = JSON.stringify({ version: "v0.12.0", config: { MCU: "rp2040" } });
    for (const level of [0, 1, 6, 9]) {
      const image = Buffer.concat([randomBytes(1000), deflateSync(dict, { level }), randomBytes(1000)]);
      expect(detectImageMcu(image)).toEqual({ mcu: "rp2040", version: "v0.12.0" });
    }
  });

  it("finds a dictionary as large as Klipper's (a dynamic Huffman block) and a short one (fixed codes)", () => {
    const commands = Object.fromEntries(Array.from({ length: 400 }, (_, i) => [`command_${i} oid=%c value=%u`, i]));
    for (const dict of [
      { version: "v0.13.0-730", commands, config: { MCU: "stm32f446xx", CLOCK_FREQ: 180000000 } },
      { version: "v0", config: { MCU: "avr" } },
    ]) {
      const image = Buffer.concat([randomBytes(64 * 1024), deflateSync(JSON.stringify(dict), { level: 9 }), randomBytes(4096)]);
      expect(detectImageMcu(image)).toEqual({ mcu: dict.config.MCU, version: dict.version });
    }
  });

  it("skips compressed JSON that is not a Klipper dictionary and keeps looking", () => {
    const image = Buffer.concat([dictionary({ something: "else" }), randomBytes(500), dictionary({ version: "v1", config: { MCU: "lpc1769" } })]);
    expect(detectImageMcu(image)).toEqual({ mcu: "lpc1769", version: "v1" });
  });

  it("returns null for an image without a dictionary", () => {
    expect(detectImageMcu(randomBytes(50_000))).toBeNull();
    expect(detectImageMcu(Buffer.alloc(0))).toBeNull();
  });

  it("returns null when the dictionary lacks the MCU", () => {
    expect(detectImageMcu(Buffer.concat([randomBytes(100), dictionary({ version: "v1", config: {} })]))).toBeNull();
  });
});
