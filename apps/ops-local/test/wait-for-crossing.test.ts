// `up`'s wait for demo traffic both ways, against real databases: which errors mean "not yet"
// and which end the wait at once.
import assert from "node:assert/strict"
import { test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { createDb } from "@keyway/db"
import { createTestDatabase } from "@keyway/testkit"
import { sql } from "kysely"
import { waitForCrossing } from "../src/wait-for-crossing.ts"

test("a demo_effect the worker has not created yet is 'not yet'; new rows on both sides end the wait", async () => {
  await using cloud = await createTestDatabase({ prefix: "keyway_crossing" })
  await using factory = await createTestDatabase({ prefix: "keyway_crossing" })
  const waiting = waitForCrossing(
    [
      { name: cloud.name, db: cloud.db },
      { name: factory.name, db: factory.db },
    ],
    30_000,
  )
  await sleep(600)
  for (const t of [cloud, factory]) {
    await sql`create table demo_effect (id int)`.execute(t.db)
    await sql`insert into demo_effect values (1)`.execute(t.db)
  }
  assert.deepEqual(await waiting, [1, 1])
})

test("an error that waiting will not mend ends the wait at once, with its cause and the database", async () => {
  await using cloud = await createTestDatabase({ prefix: "keyway_crossing" })
  const factory = await createTestDatabase({ prefix: "keyway_crossing" })
  await sql`create table demo_effect (id int)`.execute(factory.db)
  // A pool of its own, as up's: the drop below ends the testkit's.
  const db = createDb({ connectionString: factory.url, max: 1 })
  try {
    const started = Date.now()
    const waiting = waitForCrossing(
      [
        { name: cloud.name, db: cloud.db },
        { name: factory.name, db },
      ],
      20_000,
    )
    waiting.catch(() => {})
    // Counted a few times first, then the database is gone (sessions ended, as by a restart
    // of Postgres or an operator's drop).
    await sleep(800)
    await factory.drop()
    await assert.rejects(waiting, (err: Error) => {
      assert.match(err.message, new RegExp(`^cannot count ${factory.name}'s demo_effect: `))
      assert.doesNotMatch(err.message, /not ready after/)
      return true
    })
    assert.ok(Date.now() - started < 10_000, `ended after ${Date.now() - started} ms`)
  } finally {
    await db.destroy()
    await factory.drop()
  }
})
