// The Moonraker side of moonflash: the agent session (a PrinterPort) and what it is built from.

export { AgentSession, type AgentSessionOptions } from "./session.js";
export { MoonrakerRpcError, RpcPeer, type IncomingCall, type IncomingHandler, type RpcPeerOptions } from "./rpc.js";
export {
  describeEndpoint,
  openTransport,
  type MoonrakerEndpoint,
  type Transport,
  type TransportHandlers,
  type TransportOptions,
} from "./transport.js";
export { EtxDecoder, encodeEtx } from "./unix-transport.js";
