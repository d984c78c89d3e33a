import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { createTcpProxy, createTestDatabase, type TestDatabase } from "@keyway/testkit"
import { sql } from "kysely"
import { connectTimeoutMillis, createDb, DEFAULT_CONNECT_TIMEOUT_MS } from "../src/index.ts"

let t: TestDatabase

before(async () => {
  t = await createTestDatabase({ prefix: "keyway_connect" })
})
after(async () => {
  await t?.drop()
})

test("connect_timeout is read from the connection string as libpq reads it", () => {
  const url = "postgres://127.0.0.1:5432/db"
  assert.equal(connectTimeoutMillis(url), DEFAULT_CONNECT_TIMEOUT_MS)
  assert.equal(connectTimeoutMillis(`${url}?connect_timeout=5`), 5000)
  assert.equal(connectTimeoutMillis(`${url}?sslmode=disable&connect_timeout=7`), 7000)
  assert.equal(connectTimeoutMillis(`${url}?connect_timeout=0`), 0, "0: no limit")
  assert.equal(connectTimeoutMillis(`${url}?connect_timeout=-3`), 0, "negative: no limit")
  assert.equal(connectTimeoutMillis(`${url}?connect_timeout=1`), 2000, "libpq's floor of 2 s")
  assert.equal(
    connectTimeoutMillis(`${url}?connect_timeout=3000000`),
    0,
    "past what a Node timer can wait: no limit, not a timer that fires at once",
  )
  assert.equal(connectTimeoutMillis("/var/run/postgresql"), DEFAULT_CONNECT_TIMEOUT_MS)
  assert.throws(
    () => connectTimeoutMillis(`${url}?connect_timeout=5s`),
    /connect_timeout must be a whole number of seconds .*"5s"/,
  )
  assert.throws(
    () => createDb({ connectionString: `${url}?connect_timeout=soon` }),
    /connect_timeout/,
    "createDb refuses it at once, not at the first statement",
  )
})

test("a pool's statement fails once its connection has waited connect_timeout on a server that never answers; the next one connects", {
  // Without the bound the statement waits for ever: this makes that a failure, not a hang.
  timeout: 60_000,
}, async () => {
  const target = new URL(t.url)
  await using proxy = await createTcpProxy({ host: target.hostname, port: Number(target.port) })
  const url = new URL(t.url)
  url.host = `${proxy.host}:${proxy.port}`
  url.searchParams.set("connect_timeout", "2")
  const db = createDb({ connectionString: url.toString(), max: 1 })
  try {
    proxy.stall()
    await assert.rejects(sql`select 1`.execute(db), /timeout/i)
    proxy.resume()
    const { rows } = await sql<{ n: number }>`select 41 + 1 as n`.execute(db)
    assert.deepEqual(rows, [{ n: 42 }])
  } finally {
    await db.destroy()
  }
})
