export {
  type ConsumerAdmin,
  type ConsumerAdminConfig,
  ConsumerAdminError,
  createConsumerAdmin,
  type DeadTask,
  type GroupSummary,
  type KeyGap,
  type RejectedMessage,
  type TaskSelector,
} from "./create-consumer-admin.ts"
export {
  createKeyedConsumer,
  type KeyedConsumer,
  type KeyedConsumerConfig,
  type KeyedConsumerLogger,
  type KeyedConsumerStatus,
} from "./create-keyed-consumer.ts"
export { KeyedConsumerConfigError } from "./internal/check-settings.ts"
export {
  type CompleteOptions,
  type DeadPolicy,
  FencedError,
  type FencingToken,
  type Handler,
  type HandlerContext,
  type KeyedEvent,
  PoisonError,
  type TopicPolicy,
  UncommittedError,
} from "./types.ts"
