// Moonraker's ServerError: an HTTP-like status that JSON-RPC passes through (404 → -32601, 401 → -32602).

export class ServerError extends Error {
  constructor(
    message: string,
    readonly status = 400,
    readonly data?: unknown,
  ) {
    super(message);
    this.name = "ServerError";
  }

  /** The JSON-RPC error object Moonraker sends for this error (`common.py: JsonRPC.build_error`). */
  toRpcError(): { code: number; message: string; data?: unknown } {
    const code = this.status === 404 ? -32601 : this.status === 401 ? -32602 : this.status;
    return this.data === undefined ? { code, message: this.message } : { code, message: this.message, data: this.data };
  }
}

/**
 * `web_request.get_str(key)`: a required argument, converted with Python's `str()` as Moonraker does
 * (moonraker/common.py: WebRequest._get_converted_arg), so `{"service": 5}` asks for the service "5".
 */
export function requireString(params: Record<string, unknown>, key: string): string {
  if (!(key in params)) throw new ServerError(`No data for argument: ${key}`);
  return pythonStr(params[key]);
}

/** Python's str() of a JSON value. */
function pythonStr(value: unknown): string {
  return typeof value === "string" ? value : pythonRepr(value);
}

/** Python's repr() of a JSON value (a float that JSON wrote as 5.0 arrives here as the integer 5). */
export function pythonRepr(value: unknown): string {
  if (value === null || value === undefined) return "None";
  if (typeof value === "boolean") return value ? "True" : "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") {
    const quote = value.includes("'") && !value.includes('"') ? '"' : "'";
    return `${quote}${value.replace(/\\/g, "\\\\").replace(new RegExp(quote, "g"), `\\${quote}`)}${quote}`;
  }
  if (Array.isArray(value)) return `[${value.map(pythonRepr).join(", ")}]`;
  const entries = Object.entries(value as Record<string, unknown>);
  return `{${entries.map(([k, v]) => `${pythonRepr(k)}: ${pythonRepr(v)}`).join(", ")}}`;
}
