import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import { test } from "node:test"
import pg from "pg"
import { ensureDatabase } from "../src/index.ts"

const server = process.env.KEYWAY_TEST_PG_URL ?? "postgres://postgres@127.0.0.1:5432/postgres"

test("processes creating one database at once: one creates it, the others find it", async () => {
  const name = `keyway_ensure_${randomBytes(4).toString("hex")}`
  const url = new URL(server)
  url.pathname = `/${name}`
  const admin = new pg.Client({ connectionString: server })
  await admin.connect()
  try {
    // Rounds, because which attempt loses, and how, depends on timing.
    for (let round = 0; round < 5; round++) {
      const created = await Promise.all(
        Array.from({ length: 6 }, () => ensureDatabase(url.toString())),
      )
      assert.equal(created.filter(Boolean).length, 1, `round ${round}: ${JSON.stringify(created)}`)
      assert.equal(await ensureDatabase(url.toString()), false, "there now")
      await admin.query(`drop database ${name}`)
    }
  } finally {
    await admin.query(`drop database if exists ${name}`)
    await admin.end()
  }
})
