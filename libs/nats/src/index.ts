export {
  applyStreams,
  destructiveChanges,
  fieldsNotKept,
  loadStreamDefinitions,
  parseDuration,
  StreamChangeRefusedError,
  type StreamDefinition,
} from "./apply-streams.ts"
export { closeNats } from "./close-nats.ts"
export { connectNats, type NatsConfig } from "./connect-nats.ts"
export { inboxPrefixFor } from "./inbox-prefix-for.ts"
export { leafRemoteUrl } from "./leaf-remote-url.ts"
