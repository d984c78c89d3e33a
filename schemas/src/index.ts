export { defineEvent, type EventType, InvalidEventError } from "./define-event.ts"
export { DemoCommandSent, DemoItemChanged } from "./demo.ts"
export {
  decodeEnvelope,
  EnvelopeError,
  type EnvelopePlace,
  type EventEnvelope,
  encodeEnvelope,
  MAX_KEY_LENGTH,
  nameProblem,
} from "./envelope.ts"
export {
  canonicalLabelCode,
  currencyMinorDigits,
  EslFields,
  EslLabelPages,
  type EslLabelPagesPayload,
  EslLabelRender,
  type EslLabelRenderPayload,
  type EslPageContent,
  isKnownCurrency,
  knownCurrency,
  LABEL_CODE_PATTERN,
} from "./esl-label.ts"
export { eventTypes, findEventType, registryOf } from "./registry.ts"
