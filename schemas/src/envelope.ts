import * as Result from "effect/Result"
import * as Schema from "effect/Schema"

/**
 * What travels in a JetStream message body. The per-key version is in the envelope, not only
 * in the stream order, because consumers restore order from it: JetStream may redeliver or
 * deliver out of order, and a sourced copy interleaves several origins.
 */
export interface EventEnvelope {
  /** Globally unique: `<site>:<seq>`. Also the Nats-Msg-Id and the inbox dedupe key. */
  id: string
  site: string
  seq: number
  topic: string
  key: string
  ver: number
  type: string
  payload: unknown
  /** When the writer inserted the outbox row (ISO 8601). */
  createdAt: string
}

const Envelope = Schema.Struct({
  id: Schema.String,
  site: Schema.String,
  seq: Schema.Number,
  topic: Schema.String,
  key: Schema.String,
  ver: Schema.Number.pipe(Schema.check(Schema.isInt(), Schema.isGreaterThanOrEqualTo(1))),
  type: Schema.String,
  payload: Schema.Unknown,
  createdAt: Schema.String,
})
const decodeStruct = Schema.decodeUnknownResult(Envelope)

export class EnvelopeError extends Error {
  override name = "EnvelopeError"
}

const encoder = new TextEncoder()
const decoder = new TextDecoder()

export function encodeEnvelope(envelope: EventEnvelope): Uint8Array {
  return encoder.encode(JSON.stringify(envelope))
}

/** Parses a message body; throws {@link EnvelopeError} saying what is wrong with it. */
export function decodeEnvelope(data: Uint8Array): EventEnvelope {
  let json: unknown
  try {
    json = JSON.parse(decoder.decode(data))
  } catch (cause) {
    throw new EnvelopeError("message body is not JSON", { cause })
  }
  const result = decodeStruct(json, { errors: "all" })
  if (Result.isFailure(result)) {
    throw new EnvelopeError(`message body is not an event envelope: ${result.failure.message}`, {
      cause: result.failure,
    })
  }
  return result.success as EventEnvelope
}
