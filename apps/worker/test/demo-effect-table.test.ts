// The demo's effect table as every worker start ensures it, while other workers write to it:
// a start must neither queue their inserts behind it nor wait without a word, and workers
// starting together must each find the table whole when their start returns.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { createDb } from "@keyway/db"
import { createTestDatabase, gate, type TestDatabase } from "@keyway/testkit"
import { type Kysely, sql } from "kysely"
import { ensureDemoEffectTable } from "../src/handlers/demo-handlers.ts"

let t: TestDatabase
let db: Kysely<any>
before(async () => {
  t = await createTestDatabase()
  db = createDb({ connectionString: t.url, max: 8 })
})
after(async () => {
  await db?.destroy()
  await t?.drop()
})

const hasRunsColumn = async (on: Kysely<any>) =>
  (
    await sql<{ n: number }>`
      select count(*)::int as n from pg_attribute
       where attrelid = to_regclass('demo_effect') and attname = 'runs' and not attisdropped`.execute(
      on,
    )
  ).rows[0]!.n === 1

/**
 * Holds a transaction that has written to demo_effect (a running worker's insert, not yet
 * committed) until the returned `release` is called.
 */
async function holdInsert(): Promise<{ release: () => Promise<void> }> {
  const holder = createDb({ connectionString: t.url, max: 1 })
  const inserted = gate()
  const done = gate()
  const held = holder.transaction().execute(async (trx) => {
    await sql`insert into demo_effect (event_id, topic, key, ver, type, n, created_at)
              values (gen_random_uuid()::text, 'demo.item', 'k', 1, 'demo.item.changed.v1', 1,
                      now())`.execute(trx)
    inserted.open()
    await done.opened
  })
  await Promise.race([inserted.opened, held])
  return {
    release: async () => {
      done.open()
      await held
      await holder.destroy()
    },
  }
}

/** The step's outcome, or "still waiting" once `ms` have passed: the old step waited for ever. */
const within = <T>(step: Promise<T>, ms: number) =>
  Promise.race([
    step.then(
      () => "done" as const,
      (err: Error) => err,
    ),
    sleep(ms).then(() => "still waiting" as const),
  ])

test("a start while a worker's insert is open on demo_effect returns at once", async () => {
  await ensureDemoEffectTable(db)
  const insert = await holdInsert()
  const started = Date.now()
  const step = ensureDemoEffectTable(db)
  try {
    assert.equal(await within(step, 3000), "done")
    assert.ok(Date.now() - started < 3000)
  } finally {
    await insert.release()
    await step.catch(() => {})
  }
})

test("a table an older release made, held by an open transaction: the start gives up within the lock timeout, naming the table, then adds the column", async () => {
  await sql`drop table if exists demo_effect`.execute(db)
  await sql`create table demo_effect (
              id bigint generated always as identity primary key,
              event_id text not null unique, topic text not null, key text not null,
              ver bigint not null, type text not null, n bigint not null,
              created_at timestamptz not null,
              handled_at timestamptz not null default now())`.execute(db)
  const insert = await holdInsert()
  const started = Date.now()
  const step = ensureDemoEffectTable(db)
  let outcome: Awaited<ReturnType<typeof within>>
  try {
    // applyAppSchema's lock_timeout is 5 s.
    outcome = await within(step, 8000)
  } finally {
    await insert.release()
    await step.catch(() => {})
  }
  assert.ok(outcome instanceof Error, `expected a failure, got ${String(outcome)}`)
  assert.match(outcome.message, /^demo_effect's schema step gave up on a lock/)
  assert.equal((outcome.cause as { code?: string }).code, "55P03")
  assert.ok(Date.now() - started < 8000)
  assert.equal(await hasRunsColumn(db), false)
  // Once the transaction has ended, the start's retry adds the column; the held row counts 1.
  await ensureDemoEffectTable(db)
  assert.equal(await hasRunsColumn(db), true)
  const runs = await sql<{ runs: number }>`select runs from demo_effect`.execute(db)
  assert.deepEqual(
    runs.rows.map((r) => r.runs),
    [1],
  )
})

test("workers starting together each find the table whole, runs column included, when their start returns", async () => {
  // A start that lost the race to create the table returned before the winner had added the
  // column: its first insert could meet a table without it. Some rounds, since a race may
  // not show in one.
  for (let round = 0; round < 10; round++) {
    await sql`drop table if exists demo_effect`.execute(db)
    const starts = Array.from({ length: 6 }, async () => {
      await ensureDemoEffectTable(db)
      return hasRunsColumn(db)
    })
    assert.deepEqual(await Promise.all(starts), Array(6).fill(true), `round ${round}`)
  }
})
