import * as Result from "effect/Result"
import * as Schema from "effect/Schema"

/**
 * One versioned event type: its name (`<topic>.<name>.v<n>`), the topic whose per-key order
 * it takes part in, and the schema its payload must satisfy.
 */
export interface EventType<P = unknown> {
  readonly type: string
  readonly topic: string
  readonly schema: Schema.Codec<P, unknown>
  /**
   * The payload field that must equal the event's key, where the payload names what it is
   * keyed by (a label's MAC). An event keyed otherwise would take its place in another key's
   * order; enqueue refuses it, in the writer's transaction.
   */
  readonly keyField?: string
  /**
   * Returns the decoded payload or throws {@link InvalidEventError}. A reader's decode:
   * fields the schema does not name are dropped, so an event a newer writer sent with an
   * added field still reads.
   */
  decode(payload: unknown): P
  /**
   * A writer's check: as {@link decode}, and a field the schema does not name is refused.
   * Stored, it would travel unchecked in the stream for as long as the stream keeps it, and
   * a later version of the schema that gives the name a meaning would find it there.
   */
  check(payload: unknown): P
  /**
   * Why a decoded (or checked) payload cannot travel under `key`, or undefined if it can: its
   * {@link keyField} names another. The writer refuses such an event, and a consumer holds
   * one that reached it anyway (another publisher, an older writer) dead rather than run it
   * in the order of a key it does not belong to.
   */
  wrongKey(key: string, payload: P): string | undefined
}

/** A payload that does not satisfy its event type's schema. */
export class InvalidEventError extends Error {
  override name = "InvalidEventError"
  /**
   * @param options.at which event of several, for the message: `#2 (key b)`.
   */
  constructor(
    readonly type: string,
    readonly reason: string,
    options?: ErrorOptions & { at?: string },
  ) {
    super(`invalid ${type} event${options?.at ? ` ${options.at}` : ""}: ${reason}`, options)
  }
}

// A topic is the tail of the NATS subject its events are published on (`<site>.<topic>`), so
// it must be a subject's tokens and never a wildcard: a space, `*` or `>` there would make
// every publish of the topic fail. Letters, digits, `_` and `-` between dots are what every
// NATS tool, permission and stream filter reads the same way.
const TOPIC = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/
// What follows the topic in a type's name: at least one token, then `.v<n>`.
const VERSIONED = /^(\.[A-Za-z0-9_-]+)+\.v[1-9][0-9]*$/

/**
 * Defines an event type. Fails at once, where the module is loaded, on a topic that cannot
 * be a subject's tail, or a type name that is not `<topic>.<name>`.
 */
export function defineEvent<S extends Schema.Codec<any, any>>(definition: {
  type: string
  topic: string
  schema: S
  keyField?: keyof S["Type"] & string
}): EventType<S["Type"]> {
  if (!TOPIC.test(definition.topic)) {
    throw new Error(
      `event type ${JSON.stringify(definition.type)}: topic ${JSON.stringify(definition.topic)} must be dot-separated tokens of letters, digits, "_" and "-" (it becomes a NATS subject)`,
    )
  }
  // The version suffix is what tells a v2 from its v1 (registryOf keeps their topics one).
  if (
    !definition.type.startsWith(`${definition.topic}.`) ||
    !TOPIC.test(definition.type) ||
    !VERSIONED.test(definition.type.slice(definition.topic.length))
  ) {
    throw new Error(
      `event type ${JSON.stringify(definition.type)}: its name must be its topic, a dot, more tokens of letters, digits, "_" and "-", then its version (such as "${definition.topic}.changed.v1")`,
    )
  }
  const decode = Schema.decodeUnknownResult(definition.schema as Schema.Codec<S["Type"], unknown>)
  const decoded = (payload: unknown, onExcessProperty: "ignore" | "error") => {
    // errors: "all" reports every bad field at once, which is what a writer fixing a
    // rejected event wants to read.
    const result = decode(payload, { errors: "all", onExcessProperty })
    if (Result.isSuccess(result)) return result.success
    throw new InvalidEventError(definition.type, result.failure.message, {
      cause: result.failure,
    })
  }
  const keyField = definition.keyField
  return {
    type: definition.type,
    topic: definition.topic,
    schema: definition.schema,
    ...(keyField === undefined ? {} : { keyField }),
    decode: (payload) => decoded(payload, "ignore"),
    check: (payload) => decoded(payload, "error"),
    wrongKey: (key, payload) => {
      if (keyField === undefined) return undefined
      const keyed = (payload as Record<string, unknown>)[keyField]
      if (keyed === key) return undefined
      return `its key must be its ${keyField}, ${JSON.stringify(keyed)}: an event keyed otherwise would take its place in another key's order`
    },
  }
}
