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
  /** Returns the decoded payload or throws {@link InvalidEventError}. */
  decode(payload: unknown): P
}

/** A payload that does not satisfy its event type's schema. */
export class InvalidEventError extends Error {
  override name = "InvalidEventError"
  constructor(
    readonly type: string,
    readonly reason: string,
    options?: ErrorOptions,
  ) {
    super(`invalid ${type} event: ${reason}`, options)
  }
}

export function defineEvent<S extends Schema.Codec<any, any>>(definition: {
  type: string
  topic: string
  schema: S
}): EventType<S["Type"]> {
  const decode = Schema.decodeUnknownResult(definition.schema as Schema.Codec<S["Type"], unknown>)
  return {
    type: definition.type,
    topic: definition.topic,
    schema: definition.schema,
    decode(payload) {
      // errors: "all" reports every bad field at once, which is what a writer fixing a
      // rejected event wants to read.
      const result = decode(payload, { errors: "all" })
      if (Result.isSuccess(result)) return result.success
      throw new InvalidEventError(definition.type, result.failure.message, {
        cause: result.failure,
      })
    },
  }
}
