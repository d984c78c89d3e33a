export { defineEvent, type EventType, InvalidEventError } from "./define-event.ts"
export { DemoCommandSent, DemoItemChanged } from "./demo.ts"
export { decodeEnvelope, EnvelopeError, type EventEnvelope, encodeEnvelope } from "./envelope.ts"
export { eventTypes, findEventType } from "./registry.ts"
