// Moonraker-style INI parser (pure): sections, `option: value` / `option = value`, comments, indented
// continuation lines, and the line of everything so config errors can point at it.

import { MoonflashError } from "./errors.js";

export interface IniOption {
  name: string;
  /** Trimmed value without comments; continuation lines joined with "\n". Empty when nothing was written. */
  value: string;
  line: number;
}

export interface IniSection {
  name: string;
  line: number;
  /** In file order. */
  options: Map<string, IniOption>;
}

export interface IniDocument {
  file: string;
  /** In file order. */
  sections: Map<string, IniSection>;
}

export interface ConfigErrorLocation {
  file: string;
  line: number;
  section?: string;
  option?: string;
}

/** The one shape of every config error: "<file>:<line>: [section] option: problem". */
export function configError(where: ConfigErrorLocation, problem: string, extra: Record<string, unknown> = {}): MoonflashError {
  const section = where.section === undefined ? "" : `[${where.section}] `;
  const option = where.option === undefined ? "" : `${where.option}: `;
  return new MoonflashError("CONFIG_INVALID", `${where.file}:${where.line}: ${section}${option}${problem}`, {
    file: where.file,
    line: where.line,
    section: where.section ?? null,
    option: where.option ?? null,
    ...extra,
  });
}

// Klipper and Moonraker treat `#` and `;` as inline comments only after whitespace, so URLs keep their `#`.
const INLINE_COMMENT = /\s[#;]/;

function stripInlineComment(text: string): string {
  const match = INLINE_COMMENT.exec(text);
  return (match ? text.slice(0, match.index) : text).trim();
}

/** Parses INI text; throws CONFIG_INVALID (with file, line, section, option) on the first syntax error. */
export function parseIni(text: string, file: string): IniDocument {
  const doc: IniDocument = { file, sections: new Map() };
  const lines = text.replace(/^\uFEFF/, "").split(/\r?\n/);
  let section: IniSection | null = null;
  let option: IniOption | null = null;
  // Continuation lines of the current option, kept apart so blank lines between them survive but trailing ones do not.
  let continuation: string[] = [];

  const finishOption = (): void => {
    if (option && continuation.length > 0) {
      while (continuation.length > 0 && continuation[continuation.length - 1] === "") continuation.pop();
      option.value = [option.value, ...continuation].filter((part, i) => i > 0 || part !== "").join("\n");
    }
    option = null;
    continuation = [];
  };

  lines.forEach((raw, index) => {
    const line = index + 1;
    const trimmed = raw.trim();
    if (trimmed === "") {
      if (option) continuation.push("");
      return;
    }
    if (trimmed.startsWith("#") || trimmed.startsWith(";")) return;

    if (/^\s/.test(raw)) {
      if (!option) {
        throw configError(
          { file, line, section: section?.name },
          "indented line continues no option; remove the indentation or put it under an option",
        );
      }
      const value = stripInlineComment(raw);
      if (value !== "") continuation.push(value);
      return;
    }

    finishOption();

    if (trimmed.startsWith("[")) {
      const header = /^\[([^\]]*)\]$/.exec(stripInlineComment(trimmed));
      const name = header?.[1]?.trim() ?? "";
      if (!header || name === "") {
        throw configError({ file, line }, `malformed section header '${trimmed}'; expected [name]`);
      }
      const previous = doc.sections.get(name);
      if (previous) {
        throw configError(
          { file, line, section: name },
          `duplicate section (first at line ${previous.line}); merge the two`,
        );
      }
      section = { name, line, options: new Map() };
      doc.sections.set(name, section);
      return;
    }

    const separator = trimmed.search(/[:=]/);
    if (separator <= 0) {
      throw configError(
        { file, line, section: section?.name },
        `expected 'option: value', got '${trimmed}'`,
      );
    }
    const name = trimmed.slice(0, separator).trim();
    if (!section) {
      throw configError({ file, line, option: name }, "option outside a section; put it under a [section] header");
    }
    const previous = section.options.get(name);
    if (previous) {
      throw configError(
        { file, line, section: section.name, option: name },
        `duplicate option (first at line ${previous.line}); keep one`,
      );
    }
    option = { name, value: stripInlineComment(" " + trimmed.slice(separator + 1)), line };
    section.options.set(name, option);
  });
  finishOption();
  return doc;
}
