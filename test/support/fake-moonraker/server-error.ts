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

/** `web_request.get_str(key)`: a required string argument. */
export function requireString(params: Record<string, unknown>, key: string): string {
  const value = params[key];
  if (value === undefined || value === null) throw new ServerError(`No data for argument: ${key}`);
  if (typeof value !== "string") throw new ServerError(`Invalid argument type for '${key}': expected a string`);
  return value;
}
