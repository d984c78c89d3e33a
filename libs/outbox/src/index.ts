export {
  DEFAULT_MAX_PAYLOAD_BYTES,
  type EnqueuedEvent,
  EnqueueError,
  type EnqueueOptions,
  enqueue,
  type OutboxEvent,
} from "./enqueue.ts"
export type { PublishedRow } from "./internal/outbox-row.ts"
export { subjectOf } from "./internal/publish-batch.ts"
export {
  createRelay,
  type Relay,
  type RelayConfig,
  RelayError,
  type RelayLogger,
  type RelayRole,
  type RelayStatus,
} from "./relay.ts"
