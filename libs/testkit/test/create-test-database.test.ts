import assert from "node:assert/strict"
import { cp, mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { after, before, test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { migrationsDir } from "@keyway/db"
import { type Kysely, sql } from "kysely"
import pg from "pg"
import { createTestDatabase, type TestDatabase, waitFor } from "../src/index.ts"
import { sweepOldTemplates } from "../src/internal/leftovers.ts"

// Catalog queries work from any database of the server, so one test database watches the others.
let observer: TestDatabase

before(async () => {
  observer = await createTestDatabase({ prefix: "keyway_testkit_observer" })
})

after(() => observer.drop())

async function databaseExists(name: string): Promise<boolean> {
  const { rows } = await sql`select 1 from pg_database where datname = ${name}`.execute(observer.db)
  return rows.length === 1
}

async function hasOutbox(db: Kysely<any>): Promise<boolean> {
  const { rows } = await sql<{
    t: string | null
  }>`select to_regclass('keyway.outbox')::text as t`.execute(db)
  return rows[0]?.t === "keyway.outbox"
}

test("two databases created in parallel are distinct and migrated", async () => {
  const [a, b] = await Promise.all([createTestDatabase(), createTestDatabase()])
  try {
    assert.notEqual(a.name, b.name)
    assert.equal(a.template, b.template)
    assert.match(a.template, /^keyway_tpl_[0-9a-f]{12}$/)
    assert.ok(await hasOutbox(a.db))
    assert.ok(await hasOutbox(b.db))

    // Independent of the outbox's own functions, which change while migrations are drafted.
    await sql`create table public.only_in_a (id int)`.execute(a.db)
    const exists = async (db: Kysely<any>) =>
      (
        await sql<{ t: string | null }>`select to_regclass('public.only_in_a')::text as t`.execute(
          db,
        )
      ).rows[0]?.t === "only_in_a"
    assert.equal(await exists(a.db), true)
    assert.equal(await exists(b.db), false)
  } finally {
    await Promise.all([a.drop(), b.drop()])
  }
  assert.equal(await databaseExists(a.name), false)
  assert.equal(await databaseExists(b.name), false)
})

test("drop is idempotent and kicks out other sessions", async () => {
  const t = await createTestDatabase({ prefix: "keyway_testkit" })
  assert.match(t.name, /^keyway_testkit_/)
  const other = new pg.Client({ connectionString: t.url })
  other.on("error", () => {})
  await other.connect()
  await Promise.all([t.drop(), t.drop()])
  await t[Symbol.asyncDispose]()
  assert.equal(await databaseExists(t.name), false)
  await other.end().catch(() => {})
})

test("drop returns while the test still holds connections of the pool", async () => {
  const t = await createTestDatabase({ prefix: "keyway_testkit", poolSize: 2 })
  try {
    // What a test that failed half-way leaves: a transaction parked at a gate nobody opens,
    // which never gives its connection back, and a statement waiting on the server.
    let began!: () => void
    const inTransaction = new Promise<void>((resolve) => {
      began = resolve
    })
    void t.db
      .transaction()
      .execute(() => {
        began()
        return new Promise(() => {})
      })
      .catch(() => {})
    const sleeping = sql`select pg_sleep(600)`.execute(t.db)
    sleeping.catch(() => {})
    await inTransaction
    await waitFor(
      async () =>
        (
          await sql`select 1 from pg_stat_activity where datname = ${t.name} and query like 'select pg_sleep%'`.execute(
            observer.db,
          )
        ).rows.length === 1,
      { timeoutMs: 10_000, message: "pg_sleep running" },
    )
    // A bound on liveness only: before the fix drop() waited for ever.
    await Promise.race([
      t.drop(),
      sleep(20_000, undefined, { ref: false }).then(() => {
        throw new Error("drop() did not return within 20 s")
      }),
    ])
    assert.equal(await databaseExists(t.name), false)
    await assert.rejects(sleeping)
  } finally {
    // Kicks out the held sessions if drop() hung, so that this file can still end.
    await sql.raw(`drop database if exists "${t.name}" with (force)`).execute(observer.db)
  }
})

test("a new migrations folder builds its template once under concurrent callers", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-migrations-"))
  await cp(migrationsDir, dir, { recursive: true })
  // A unique extra migration gives the folder a hash no template exists for yet.
  await writeFile(
    join(dir, "9999_testkit_marker.sql"),
    `create table keyway.testkit_marker (id int); -- ${Date.now()} ${Math.random()}\n`,
  )
  const dbs = await Promise.all(
    Array.from({ length: 4 }, () => createTestDatabase({ migrationsDir: dir })),
  )
  const template = dbs[0]!.template
  try {
    for (const t of dbs) {
      assert.equal(t.template, template)
      const { rows } = await sql<{
        t: string | null
      }>`select to_regclass('keyway.testkit_marker')::text as t`.execute(t.db)
      assert.equal(rows[0]?.t, "keyway.testkit_marker")
    }
  } finally {
    await Promise.all(dbs.map((t) => t.drop()))
    await rm(dir, { recursive: true, force: true })
    await sql.raw(`alter database "${template}" with is_template false`).execute(observer.db)
    await sql.raw(`drop database "${template}"`).execute(observer.db)
  }
})

test("rejects a prefix that would need quoting", async () => {
  await assert.rejects(createTestDatabase({ prefix: "Bad-Name" }), /not a valid database name/)
})

test("templates of other migrations are dropped once a day old; those of these migrations stay", async () => {
  // A family of the test's own: a sweep of any age here leaves the real templates alone.
  const family = "keyway_tplsweep"
  const names = [
    `${family}_0000000000aa`,
    `${family}_0000000000aa_icu_en_us`,
    `${family}_0000000000bb`,
    `${family}_0000000000bb_icu_en_us`,
  ]
  const client = new pg.Client({ connectionString: observer.url })
  await client.connect()
  try {
    for (const name of names) {
      await client.query(`create database "${name}"`)
      await client.query(`alter database "${name}" is_template true`)
    }
    // Made a moment ago: a run of another checkout may be using them.
    assert.deepEqual(await sweepOldTemplates(client, true, "0000000000bb", { family }), [])
    const dropped = await sweepOldTemplates(client, true, "0000000000bb", {
      family,
      olderThanMs: 0,
    })
    assert.deepEqual(dropped.sort(), names.slice(0, 2))
    for (const name of names) assert.equal(await databaseExists(name), !dropped.includes(name))
  } finally {
    for (const name of names) {
      await client.query(`alter database "${name}" is_template false`).catch(() => {})
      await client.query(`drop database if exists "${name}"`)
    }
    await client.end()
  }
})
