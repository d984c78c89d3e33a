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

// biome-ignore lint/suspicious/noControlCharactersInRegex: refusing control characters is the point
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/

/**
 * Why `name` cannot be an event's key (or topic), or undefined if it can. The writer
 * (enqueue) and the reader (decodeEnvelope) apply the same rule. Never empty: an empty key is
 * one order for whatever publisher left it out. No control characters: keys end up in logs
 * and admin commands, and Postgres text holds no NUL. Well-formed: the pg driver writes half
 * of a surrogate pair as U+FFFD, so two such keys were stored as one, and their events
 * shared one order.
 */
export function nameProblem(name: string): string | undefined {
  return (
    lengthProblem(name) ?? (CONTROL.test(name) ? "must not hold control characters" : undefined)
  )
}

// The other names (id, site, type) only keep their bounds and stay themselves in Postgres.
// A NUL there Postgres refuses, and the consumer holds the version's place with the refusal;
// refused here, the version would be a gap.
function lengthProblem(name: string): string | undefined {
  if (name.length === 0) return "must not be empty"
  if (name.length > MAX_KEY_LENGTH) return `must be at most ${MAX_KEY_LENGTH} characters`
  if (!name.isWellFormed()) return "must not hold half of a surrogate pair"
  return undefined
}

const Key = Schema.String.pipe(
  Schema.check(Schema.makeFilter((s: string) => nameProblem(s) ?? true)),
)
const Name = Schema.String.pipe(
  Schema.check(Schema.makeFilter((s: string) => lengthProblem(s) ?? true)),
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
  topic: Key,
  key: Key,
  ver: Counter,
  type: Name,
  payload: Schema.Unknown,
  createdAt: Schema.String,
})
const decodeStruct = Schema.decodeUnknownResult(Envelope)

/** The parts of an envelope that place an event in its key's order. */
export type EnvelopePlace = Pick<
  EventEnvelope,
  "id" | "site" | "seq" | "topic" | "key" | "ver" | "type"
>

export class EnvelopeError extends Error {
  override name = "EnvelopeError"
  /**
   * For a body refused only because some of its bytes are not UTF-8 (in the payload, say),
   * where its names read whole: the version's place, which a consumer holds with the refusal
   * rather than leave its key waiting on a gap an operator must skip.
   */
  readonly place?: EnvelopePlace

  constructor(message: string, options?: ErrorOptions & { place?: EnvelopePlace }) {
    super(message, options)
    if (options?.place) this.place = options.place
  }
}

const encoder = new TextEncoder()
// Fatal: replaced with U+FFFD, a byte that is not UTF-8 inside a key made another key, and
// the event took its place in that key's order.
const decoder = new TextDecoder("utf-8", { fatal: true })
const lenient = new TextDecoder("utf-8")

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
    const place = placeOf(lenient.decode(data))
    throw new EnvelopeError("message body is not UTF-8", { cause, ...(place && { place }) })
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

/**
 * The place of an envelope read with its bad bytes replaced, if none of its names holds a
 * replacement: a replaced byte inside a key would make it another key.
 */
function placeOf(text: string): EnvelopePlace | undefined {
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    return undefined
  }
  const result = decodeStruct(json)
  if (Result.isFailure(result)) return undefined
  const { id, site, seq, topic, key, ver, type } = result.success
  if ([id, site, topic, key, type].some((name) => name.includes("\uFFFD"))) return undefined
  return { id, site, seq, topic, key, ver, type }
}
