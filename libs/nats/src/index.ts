export {
  applyStreams,
  loadStreamDefinitions,
  parseDuration,
  type StreamDefinition,
} from "./apply-streams.ts"
export { connectNats, type NatsConfig } from "./connect-nats.ts"
