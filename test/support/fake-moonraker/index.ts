// Public entry of the fake Moonraker test double (also used by the demo).
import { FakeMoonrakerServer, type FakeMoonraker, type FakeMoonrakerOptions } from "./server.js";

export { connectTestClient, RpcCallError, type TestClient, type TestClientTarget } from "./client.js";
export { EtxDecoder, encodeEtxFrame, ETX } from "./framing.js";
export { SimKlipper, mcuProtocolErrorMessage, type KlippyState, type SimMacro, type SimMcu } from "./klipper-sim.js";
export type { MacroDefinition } from "./macro-render.js";
export type { ConnectClientOptions, FakeMoonraker, FakeMoonrakerOptions } from "./server.js";

/** Starts a fake Moonraker listening on `<dataDir>/comms/moonraker.sock` and (unless disabled) a websocket on 127.0.0.1. */
export async function startFakeMoonraker(opts: FakeMoonrakerOptions): Promise<FakeMoonraker> {
  const server = new FakeMoonrakerServer(opts);
  await server.listen();
  return server;
}
