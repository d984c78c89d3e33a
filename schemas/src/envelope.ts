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

/**
 * The longest key an event may have, in UTF-16 units; also the bound on the envelope's other
 * names. The outbox refuses longer keys from writers; consumers refuse longer names from
 * whatever else publishes to a stream. The inbox indexes them, and a btree entry over its
 * limit (about 2.7 kB) fails the statement that stores it: the whole ingest batch, retried
 * for ever, and the group's messages behind it.
 */
export const MAX_KEY_LENGTH = 256

// Never empty: an empty id is every such event's dedupe key at once, and an empty key one
// order for whatever publisher left it out.
const Name = Schema.String.pipe(
  Schema.check(Schema.isMinLength(1), Schema.isMaxLength(MAX_KEY_LENGTH)),
)

// Up to 2^53 - 1: beyond it a JSON number is not the integer that was written, and Postgres'
// bigint comes back through Number(). A version of 2^60 was taken, and its key held a gap for
// good that no operator could skip: the admin refuses versions it cannot represent.
const isSafe = Schema.makeFilter<number>((n) =>
  Number.isSafeInteger(n) ? true : "must be an integer of at most 2^53 - 1",
)
const Counter = Schema.Number.pipe(
  Schema.check(Schema.isInt(), Schema.isGreaterThanOrEqualTo(1), isSafe),
)

const Envelope = Schema.Struct({
  id: Name,
  site: Name,
  seq: Counter,
  topic: Name,
  key: Name,
  ver: Counter,
  type: Name,
  payload: Schema.Unknown,
  createdAt: Schema.String,
})
const decodeStruct = Schema.decodeUnknownResult(Envelope)

export class EnvelopeError extends Error {
  override name = "EnvelopeError"
}

const encoder = new TextEncoder()
// Fatal: replaced with U+FFFD, a byte that is not UTF-8 inside a key made another key, and
// the event took its place in that key's order.
const decoder = new TextDecoder("utf-8", { fatal: true })

export function encodeEnvelope(envelope: EventEnvelope): Uint8Array {
  return encoder.encode(JSON.stringify(envelope))
}

/** Parses a message body; throws {@link EnvelopeError} saying what is wrong with it. */
export function decodeEnvelope(data: Uint8Array): EventEnvelope {
  let json: unknown
  let text: string
  try {
    text = decoder.decode(data)
  } catch (cause) {
    throw new EnvelopeError("message body is not UTF-8", { cause })
  }
  try {
    json = JSON.parse(text)
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
