import assert from "node:assert/strict"
import { test } from "node:test"
import { parseConfig } from "../src/config.ts"

const base = { KEYWAY_SITE: "cloud", DATABASE_URL: "postgres://postgres@127.0.0.1:5432/keyway" }

test("a batch or window past 10,000 is refused at start: a batch is claimed into memory whole", () => {
  assert.equal(parseConfig({ ...base, RELAY_BATCH_SIZE: "10000" }).batchSize, 10_000)
  assert.throws(() => parseConfig({ ...base, RELAY_BATCH_SIZE: "10001" }), /RELAY_BATCH_SIZE/)
  assert.equal(parseConfig(base).batchBytes, 16 * 1024 * 1024)
  assert.equal(parseConfig({ ...base, RELAY_BATCH_BYTES: "1048576" }).batchBytes, 1_048_576)
  assert.throws(() => parseConfig({ ...base, RELAY_WINDOW: "10001" }), /RELAY_WINDOW/)
})

test("a KEYWAY_SITE createRelay would refuse is refused here, at once, by name", () => {
  assert.equal(parseConfig({ ...base, KEYWAY_SITE: `a${"b".repeat(63)}` }).site.length, 64)
  for (const site of [`a${"b".repeat(64)}`, "Cloud", "9cloud", "cloud.eu"]) {
    assert.throws(
      () => parseConfig({ ...base, KEYWAY_SITE: site }),
      /KEYWAY_SITE must be 1-64 lowercase letters, digits and dashes/,
      site,
    )
  }
  // A password given without its user: the NATS client would send neither.
  assert.throws(
    () => parseConfig({ ...base, NATS_PASS: "p" }),
    /NATS_PASS is set without NATS_USER/,
  )
})
