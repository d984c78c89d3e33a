import assert from "node:assert/strict"
import { describe, test } from "node:test"
import * as Schema from "effect/Schema"
import { defineEvent, InvalidEventError, registryOf } from "../src/index.ts"

const schema = Schema.Struct({ n: Schema.Number })

describe("defineEvent", () => {
  test("a topic that could not be the tail of a NATS subject is refused where it is defined", () => {
    for (const topic of ["label changed", "esl.*", "esl.>", "esl..label", ".esl", "esl.", ""]) {
      assert.throws(
        () => defineEvent({ type: `${topic}.changed.v1`, topic, schema }),
        (err: Error) =>
          err.message.includes(JSON.stringify(topic)) && /NATS subject/.test(err.message),
        `topic ${JSON.stringify(topic)}`,
      )
    }
  })

  test("a type name must start with its topic", () => {
    assert.throws(
      () => defineEvent({ type: "gps.position.v1", topic: "esl.label", schema }),
      /"gps.position.v1": its name must be its topic/,
    )
    assert.throws(
      () => defineEvent({ type: "esl.label", topic: "esl.label", schema }),
      /its name must be its topic, a dot/,
    )
    // Without its version nothing tells it from the v2 that will follow it.
    for (const type of ["esl.label.changed", "esl.label.changed.v0", "esl.label.v1"]) {
      assert.throws(
        () => defineEvent({ type, topic: "esl.label", schema }),
        /then its version/,
        type,
      )
    }
  })

  test("a well-formed definition decodes and names the bad field", () => {
    const def = defineEvent({ type: "gps-tracker.position_2.v1", topic: "gps-tracker", schema })
    assert.deepEqual(def.decode({ n: 1 }), { n: 1 })
    assert.throws(
      () => def.decode({ n: "one" }),
      (err: unknown) => err instanceof InvalidEventError && /\["n"\]/.test(err.message),
    )
  })

  test("a writer's check refuses a field the schema does not name; a reader's decode drops it", () => {
    const def = defineEvent({ type: "t.item.changed.v1", topic: "t.item", schema })
    assert.throws(
      () => def.check({ n: 1, promo: 1.5 }),
      (err: unknown) => err instanceof InvalidEventError && /\["promo"\]/.test(err.message),
    )
    assert.deepEqual(def.check({ n: 1 }), { n: 1 })
    assert.deepEqual(def.decode({ n: 1, promo: 1.5 }), { n: 1 })
  })

  test("the registry refuses two types of one name", () => {
    const a = defineEvent({ type: "t.item.changed.v1", topic: "t.item", schema })
    const copy = defineEvent({ type: "t.item.changed.v1", topic: "t.item", schema })
    assert.throws(() => registryOf([a, copy]), /event type t.item.changed.v1 is defined twice/)
    assert.equal(registryOf([a]).get("t.item.changed.v1"), a)
  })

  test("the registry refuses versions of one event under two topics", () => {
    const v1 = defineEvent({ type: "esl.label.render.v1", topic: "esl.label", schema })
    const v2 = defineEvent({ type: "esl.label.render.v2", topic: "esl", schema })
    assert.throws(
      () => registryOf([v1, v2]),
      /esl\.label\.render\.v1 and esl\.label\.render\.v2 are versions of one event under two topics, esl\.label and esl/,
    )
    const v3 = defineEvent({ type: "esl.label.render.v3", topic: "esl.label", schema })
    assert.equal(registryOf([v1, v3]).size, 2)
  })
})
