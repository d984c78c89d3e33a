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
