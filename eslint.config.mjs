import js from "@eslint/js";
import tseslint from "typescript-eslint";

// The design's "never"s, as import rules. Folders: core (errors, jobs, config values, paths), moonraker (transport
// and agent session), flash and ota (engines), sim (virtual hardware), agent (remote methods and progress
// adapters), status (the read-only status page), cli; src/app.ts is the composition root and src/moonflash-conf.ts
// assembles the config file.
// test/lint/boundaries.test.ts proves each rule fires.
const banned = (names, why) => ({
  group: names.flatMap((name) => (name.endsWith(".js") ? [`**/${name}`, `./${name}`] : [`**/${name}/**`])),
  message: why,
});
const ROOT = ["app.js", "moonflash-conf.js"];

export default tseslint.config(
  { ignores: ["dist/**", "node_modules/**", "coverage/**", "test/lint/fixtures/**"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { process: "readonly", console: "readonly", setTimeout: "readonly", clearTimeout: "readonly", setInterval: "readonly", clearInterval: "readonly", Buffer: "readonly", URL: "readonly", AbortController: "readonly", AbortSignal: "readonly" } },
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      "no-constant-condition": ["error", { checkLoops: false }],
    },
  },
  {
    files: ["src/core/**/*.ts"],
    rules: { "no-restricted-imports": ["error", { patterns: [
      banned(["flash", "ota", "moonraker", "agent", "cli", "sim", ...ROOT], "core knows no engine, transport, agent or CLI: they build on core, never the reverse"),
    ] }] },
  },
  {
    files: ["src/flash/**/*.ts"],
    rules: { "no-restricted-imports": ["error", { patterns: [
      banned(["moonraker", "agent", "cli", "ota", ...ROOT], "the flash engine gets a PrinterPort and its settings; it never imports the transport, the agent, the CLI, OTA or the composition root"),
    ] }] },
  },
  {
    files: ["src/ota/**/*.ts"],
    rules: { "no-restricted-imports": ["error", { patterns: [
      banned(["moonraker", "agent", "cli", ...ROOT], "the OTA engine gets a PrinterPort and its settings; it never imports the transport, the agent, the CLI or the composition root"),
    ] }] },
  },
  {
    files: ["src/moonraker/**/*.ts"],
    rules: { "no-restricted-imports": ["error", { patterns: [
      banned(["flash", "ota", "agent", "cli", "sim", ...ROOT], "the Moonraker transport and session know no engine, agent or CLI"),
    ] }] },
  },
  {
    files: ["src/sim/**/*.ts"],
    rules: { "no-restricted-imports": ["error", { patterns: [
      banned(["moonraker", "agent", "cli", "ota", ...ROOT], "virtual hardware speaks bytes; it knows no transport, agent or CLI"),
    ] }] },
  },
  {
    // The page listens on every address without a login: it reads the runner and the printer port and renders.
    // Of flash it may use pure naming helpers only; loading an engine or the transport would also cost idle memory.
    files: ["src/status/**/*.ts"],
    rules: { "no-restricted-imports": ["error", {
      paths: ["node:child_process", "child_process"].map((name) => ({ name, message: "the status page only shows: it runs no program" })),
      patterns: [
        banned(["moonraker", "agent", "cli", "ota", "sim", ...ROOT], "the status page reads the job runner and the printer port (core) only; it never imports the transport, an engine, the agent, the CLI or the composition root"),
        { group: ["**/flash/**", "!**/flash/mcu-name.js"], message: "of flash, the status page may import pure naming helpers (flash/mcu-name.js) only, never the engine" },
      ],
    }] },
  },
  {
    files: ["src/agent/**/*.ts"],
    rules: { "no-restricted-imports": ["error", { patterns: [
      banned(["cli", "app.js"], "the agent is built by the composition root (src/app.ts) and knows no CLI"),
    ] }] },
  },
);
