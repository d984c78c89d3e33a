import * as Schema from "effect/Schema"
import { defineEvent } from "./define-event.ts"

/**
 * Topic `demo.item`: the event the demo traffic, the tests and the benchmarks write. It
 * carries a counter so a checker can tell versions apart from the payload alone.
 */
export const DemoItemChanged = defineEvent({
  type: "demo.item.changed.v1",
  topic: "demo.item",
  schema: Schema.Struct({
    n: Schema.Number.pipe(Schema.check(Schema.isInt())),
    note: Schema.optional(Schema.String.pipe(Schema.check(Schema.isMaxLength(1000)))),
  }),
})

/**
 * Topic `demo.command`: what the demo sends from the cloud to a factory, the reverse
 * direction of `demo.item`.
 */
export const DemoCommandSent = defineEvent({
  type: "demo.command.sent.v1",
  topic: "demo.command",
  schema: Schema.Struct({
    n: Schema.Number.pipe(Schema.check(Schema.isInt())),
    command: Schema.String.pipe(Schema.check(Schema.isMaxLength(200))),
  }),
})
