import assert from "node:assert/strict"
import { test } from "node:test"
import { parseConfig } from "../src/config.ts"

const base = { KEYWAY_SITE: "cloud", DATABASE_URL: "postgres://postgres@127.0.0.1:5432/keyway" }

test("the demo's filter goes with the demo's stream and group only", () => {
  assert.equal(parseConfig(base).filterSubject, "factory.demo.item")
  assert.equal(
    parseConfig({ ...base, KEYWAY_STREAM: "FACTORY_IN", KEYWAY_GROUP: "cloud-demo" }).filterSubject,
    "factory.demo.item",
  )
  assert.equal(
    parseConfig({
      ...base,
      KEYWAY_GROUP: "cloud-billing",
      KEYWAY_FILTER_SUBJECT: "factory.billing.>",
    }).filterSubject,
    "factory.billing.>",
  )
})

test("a group named explicitly without KEYWAY_FILTER_SUBJECT is refused: it would take every event", () => {
  // The worker's handlers are the demo's: every other event of an unfiltered durable went dead
  // at once as having no handler, and blocked its key. Not given the demo's filter either: a
  // durable's filter stays for good.
  for (const env of [
    { ...base, KEYWAY_GROUP: "cloud-billing" },
    { ...base, KEYWAY_STREAM: "FACTORY_IN", KEYWAY_GROUP: "cloud-billing" },
    { ...base, KEYWAY_STREAM: "OTHER_IN" },
    { ...base, KEYWAY_SITE: "plant-7", KEYWAY_STREAM: "CLOUD_IN", KEYWAY_GROUP: "plant-demo" },
    { ...base, KEYWAY_GROUP: "cloud-billing", KEYWAY_FILTER_SUBJECT: "  " },
  ]) {
    assert.throws(
      () => parseConfig(env),
      (err: Error) =>
        err.name === "ConfigError" &&
        err.message.startsWith("KEYWAY_FILTER_SUBJECT is required for group ") &&
        err.message.includes("demo.item.changed.v1"),
      JSON.stringify(env),
    )
  }
})

test("the Postgres pool is sized on its own, not by the concurrency", () => {
  assert.equal(parseConfig({ ...base, WORKER_CONCURRENCY: "256" }).pgPoolSize, 20)
  assert.equal(parseConfig({ ...base, WORKER_PG_POOL_SIZE: "8" }).pgPoolSize, 8)
  assert.throws(() => parseConfig({ ...base, WORKER_PG_POOL_SIZE: "0" }), /WORKER_PG_POOL_SIZE/)
})

test("a stream or group name JetStream cannot take is refused at start, by name", () => {
  for (const [name, value] of [
    ["KEYWAY_GROUP", "cloud.billing"],
    ["KEYWAY_GROUP", "cloud billing"],
    ["KEYWAY_STREAM", "FACTORY_IN.>"],
  ] as const) {
    assert.throws(
      () => parseConfig({ ...base, KEYWAY_STREAM: "FACTORY_IN", KEYWAY_GROUP: "g", [name]: value }),
      (err: Error) => err.message.startsWith(`${name} must be letters, digits`),
      value,
    )
  }
  assert.throws(
    () => parseConfig({ ...base, WORKER_CONCURRENCY: "10000000" }),
    /WORKER_CONCURRENCY/,
  )
})

test("a REDIS_URL that ioredis could not read is refused at start, without repeating it", () => {
  assert.equal(parseConfig(base).redisUrl, "redis://127.0.0.1:6379")
  assert.throws(
    () => parseConfig({ ...base, REDIS_URL: "redis://:pa/ss@127.0.0.1:6379" }),
    (err: Error) => /^REDIS_URL must be/.test(err.message) && !err.message.includes("pa/ss"),
  )
})
