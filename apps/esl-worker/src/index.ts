export {
  type AimsClient,
  type AimsClientConfig,
  AimsError,
  createAimsClient,
  DEFAULT_SETTLE_MS,
  type PushImageOptions,
} from "./aims-client.ts"
export {
  createEslWorker,
  ESL_LABEL_POLICY,
  type EslWorker,
  type EslWorkerConfig,
} from "./create-esl-worker.ts"
export { eventIdOfPushKey, pushKey } from "./drawn-pages.ts"
export {
  formatPrice,
  LABEL_HEIGHT,
  LABEL_WIDTH,
  RenderError,
  renderLabel,
  requireFont,
} from "./render-label.ts"
