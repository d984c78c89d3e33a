import assert from "node:assert/strict"
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import { createTestDatabase, waitFor } from "@keyway/testkit"
import { sql } from "kysely"
import pg from "pg"
import {
  assertMigrated,
  createDb,
  MigrationError,
  migrateToLatest,
  migrationsDir,
  pendingMigrations,
} from "../src/index.ts"

const shipped = (await readdir(migrationsDir))
  .filter((f) => f.endsWith(".sql"))
  .sort()
  .map((f) => f.replace(/\.sql$/, ""))

test("a database with every migration applied has none pending and passes the check", async () => {
  await using t = await createTestDatabase({ prefix: "keyway_mig" })
  assert.deepEqual(await pendingMigrations(t.db), [])
  await assertMigrated(t.db)
})

test("a database that lacks the newest migration is refused, naming it and the fix", async () => {
  await using t = await createTestDatabase({ prefix: "keyway_mig" })
  const newest = shipped.at(-1)!
  await sql`delete from public.kysely_migration where name = ${newest}`.execute(t.db)
  assert.deepEqual(await pendingMigrations(t.db), [newest])
  await assert.rejects(assertMigrated(t.db), (err: Error) => {
    assert.ok(err instanceof MigrationError)
    assert.equal(err.permanent, false, "`just migrate` mends it while the processes wait")
    assert.match(err.message, new RegExp(`lacks 1 migration\\(s\\).*\\(${newest}\\)`))
    assert.match(err.message, /just migrate/)
    return true
  })
})

test("a database never migrated has every migration pending", async () => {
  // Built from an empty migrations folder: Postgres and the bookkeeping table, no keyway schema.
  const empty = await mkdtemp(join(tmpdir(), "keyway-no-migrations-"))
  try {
    await using t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: empty })
    assert.deepEqual(await pendingMigrations(t.db), shipped)
    await assert.rejects(assertMigrated(t.db), MigrationError)
  } finally {
    await rm(empty, { recursive: true })
  }
})

/**
 * A migrations folder of `files` is refused, permanently and with a message matching
 * `message`, by migrate and by the pending check alike, before anything runs.
 */
async function refusedBeforeAnyRuns(files: Record<string, string>, message: RegExp) {
  const dir = await mkdtemp(join(tmpdir(), "keyway-refused-migrations-"))
  for (const [name, text] of Object.entries(files)) await writeFile(join(dir, name), text)
  const empty = await mkdtemp(join(tmpdir(), "keyway-no-migrations-"))
  await using t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: empty })
  try {
    const refused = (err: Error) => {
      assert.ok(err instanceof MigrationError, String(err))
      assert.equal(err.permanent, true, "not something the processes wait out")
      assert.match(err.message, message)
      return true
    }
    await assert.rejects(migrateToLatest(t.db, { dir }), refused)
    await assert.rejects(pendingMigrations(t.db, { dir }), refused)
    assert.equal(
      (await sql<{ t: string | null }>`select to_regclass('public.t')::text as t`.execute(t.db))
        .rows[0]!.t,
      null,
      "nothing applied",
    )
  } finally {
    await rm(dir, { recursive: true })
    await rm(empty, { recursive: true })
  }
}

test("a migration file named otherwise is refused by name, not left out", async () => {
  await refusedBeforeAnyRuns(
    {
      "0001_table.sql": "create table public.t (id int);",
      "0002_Add_index.sql": "create index on public.t (id);",
      "README.md": "not a migration",
    },
    /0002_Add_index\.sql not named NNNN_slug\.sql/,
  )
})

test("two migrations sharing a number are refused by name, before either runs", async () => {
  // Two branches that each added a 0002.
  await refusedBeforeAnyRuns(
    {
      "0001_table.sql": "create table public.t (id int);",
      "0002_a.sql": "create index on public.t (id);",
      "0002_b.sql": "alter table public.t add column b int;",
    },
    /0002_a\.sql and 0002_b\.sql share a number/,
  )
})

test("a database a newer checkout migrated is up to date for an older one, not corrupted", async () => {
  // The older checkout: the shipped migrations but the newest.
  const older = await mkdtemp(join(tmpdir(), "keyway-older-migrations-"))
  await using t = await createTestDatabase({ prefix: "keyway_mig" })
  try {
    for (const name of shipped.slice(0, -1)) {
      await writeFile(
        join(older, `${name}.sql`),
        await readFile(join(migrationsDir, `${name}.sql`)),
      )
    }
    assert.deepEqual(await migrateToLatest(t.db, { dir: older }), [])
    await assertMigrated(t.db, { dir: older })
  } finally {
    await rm(older, { recursive: true })
  }
})

test("a database another branch migrated is refused for good, by migrate and by the check", async () => {
  // One branch applied its 0002; this one has another 0002, still pending here.
  const dir = await mkdtemp(join(tmpdir(), "keyway-branch-migrations-"))
  const empty = await mkdtemp(join(tmpdir(), "keyway-no-migrations-"))
  await using t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: empty })
  try {
    await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);")
    await writeFile(join(dir, "0002_a.sql"), "alter table public.t add column a int;")
    assert.deepEqual(await migrateToLatest(t.db, { dir }), ["0001_table", "0002_a"])
    await rm(join(dir, "0002_a.sql"))
    await writeFile(join(dir, "0002_b.sql"), "alter table public.t add column b int;")
    const refused = (err: Error) => {
      assert.ok(err instanceof MigrationError, String(err))
      assert.equal(err.permanent, true, "not something the processes wait out")
      assert.match(
        err.message,
        /applied 0002_a, which this checkout does not have, while 0002_b is pending here/,
      )
      return true
    }
    await assert.rejects(migrateToLatest(t.db, { dir }), refused)
    await assert.rejects(assertMigrated(t.db, { dir }), refused)
    // 0002_a back, and a 0000 merged late, which sorts below what was applied.
    await writeFile(join(dir, "0002_a.sql"), "alter table public.t add column a int;")
    await rm(join(dir, "0002_b.sql"))
    await writeFile(join(dir, "0000_early.sql"), "alter table public.t add column early int;")
    const behind = (err: Error) =>
      err instanceof MigrationError &&
      err.permanent &&
      /it applied up to 0002_a, past 0000_early, while 0000_early is pending here/.test(err.message)
    await assert.rejects(migrateToLatest(t.db, { dir }), behind)
    await assert.rejects(assertMigrated(t.db, { dir }), behind)
  } finally {
    await rm(dir, { recursive: true })
    await rm(empty, { recursive: true })
  }
})

test("a migration waiting for a table lock gives way to the table's readers, and applies once it is free", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-lock-migrations-"))
  await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);")
  const t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: dir })
  const holder = new pg.Client({ connectionString: t.url })
  const reader = new pg.Client({ connectionString: t.url })
  try {
    await writeFile(join(dir, "0002_column.sql"), "alter table public.t add column c int;")
    await holder.connect()
    await reader.connect()
    // A long transaction that read the table (as a vacuum would hold it): the migration's
    // ALTER waits for it.
    await holder.query("begin; select count(*) from public.t")
    const migrating = migrateToLatest(t.db, {
      dir,
      lockTimeoutMs: 200,
      lockAttempts: 1000,
      lockRetryDelayMs: 50,
    })
    await waitFor(
      async () =>
        (
          await reader.query(
            "select 1 from pg_locks where relation = 'public.t'::regclass and not granted",
          )
        ).rowCount! > 0,
      { timeoutMs: 10_000, message: "the migration waiting for its lock" },
    )
    // Queued behind a migration that waits for ever, this read would wait as long.
    await reader.query("set statement_timeout = '5s'")
    assert.equal((await reader.query("select count(*)::int as n from public.t")).rows[0].n, 0)
    await holder.query("commit")
    assert.deepEqual(await migrating, ["0002_column"])
    await reader.query("select c from public.t")

    // A lock that is never freed: the migration gives up and says why; the one before it,
    // which needed no lock held, stays applied and is not redone by the tries.
    await writeFile(join(dir, "0003_other_table.sql"), "create table public.u (id int);")
    await writeFile(join(dir, "0004_another.sql"), "alter table public.t add column d int;")
    await holder.query("begin; select count(*) from public.t")
    await assert.rejects(
      migrateToLatest(t.db, { dir, lockTimeoutMs: 100, lockAttempts: 3, lockRetryDelayMs: 10 }),
      (err: Error) => {
        assert.ok(err instanceof MigrationError)
        assert.match(
          err.message,
          /0004_another failed: could not get a table lock within 100 ms, 3 times .*\(applied before it: 0003_other_table\)/,
        )
        return true
      },
    )
    await holder.query("commit")
    assert.deepEqual(await pendingMigrations(t.db, { dir }), ["0004_another"])
    // Back to the server's default on the pool's connection: set for the transaction only.
    const shown = await sql<{ lock_timeout: string }>`show lock_timeout`.execute(t.db)
    assert.equal(shown.rows[0]!.lock_timeout, "0")
  } finally {
    await holder.end().catch(() => {})
    await reader.end().catch(() => {})
    await t.drop()
    await rm(dir, { recursive: true })
  }
})

test("two runs at once: one applies every pending migration, in order, the other none", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-twin-migrations-"))
  await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);")
  const t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: dir })
  const other = createDb({ connectionString: t.url, max: 1 })
  try {
    for (const n of [2, 3, 4, 5]) {
      await writeFile(join(dir, `000${n}_c${n}.sql`), `alter table public.t add column c${n} int;`)
    }
    const runs = await Promise.all([
      migrateToLatest(t.db, { dir }),
      migrateToLatest(other, { dir }),
    ])
    assert.deepEqual(
      runs.map((r) => r.join(",")).sort(),
      ["", "0002_c2,0003_c3,0004_c4,0005_c5"],
      "one run took them all",
    )
    assert.deepEqual(await pendingMigrations(t.db, { dir }), [])
  } finally {
    await other.destroy()
    await t.drop()
    await rm(dir, { recursive: true })
  }
})

test("a run that finds another holding the run lock says so once, waits, then runs", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-waiting-migrations-"))
  await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);")
  const t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: dir })
  // As a run in progress holds it: migrate.ts's RUN_LOCK ("kwmi"), on its session.
  const holder = new pg.Client({ connectionString: t.url })
  try {
    await writeFile(join(dir, "0002_c.sql"), "alter table public.t add column c int;")
    const uncontended: string[] = []
    assert.deepEqual(await migrateToLatest(t.db, { dir, log: (m) => uncontended.push(m) }), [
      "0002_c",
    ])
    assert.deepEqual(uncontended, [], "a run that goes ahead at once says nothing")

    await writeFile(join(dir, "0003_d.sql"), "alter table public.t add column d int;")
    await holder.connect()
    await holder.query("select pg_advisory_lock($1)", [0x6b776d69])
    const said: string[] = []
    let done = false
    const migrating = migrateToLatest(t.db, { dir, log: (m) => said.push(m) }).finally(() => {
      done = true
    })
    await waitFor(() => said.length > 0, { timeoutMs: 10_000, message: "the wait said" })
    assert.deepEqual(said, ["another migrate holds the run lock; waiting"])
    // Still waiting, not failed: the lock is the other run's until it ends.
    await new Promise((r) => setTimeout(r, 500))
    assert.equal(done, false)
    await holder.query("select pg_advisory_unlock($1)", [0x6b776d69])
    assert.deepEqual(await migrating, ["0003_d"])
    assert.equal(said.length, 1, "said once, not once per poll")
  } finally {
    await holder.end().catch(() => {})
    await t.drop()
    await rm(dir, { recursive: true })
  }
})

test("a migration stamped later by a host whose clock ran ahead does not stop the next one", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-skewed-migrations-"))
  await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);")
  await writeFile(join(dir, "0002_a.sql"), "alter table public.t add column a int;")
  const t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: dir })
  try {
    // 0002 applied by a host an hour ahead of the one that applies 0003.
    await sql`update public.kysely_migration set timestamp = ${new Date(Date.now() + 3600_000).toISOString()}
               where name = '0002_a'`.execute(t.db)
    await writeFile(join(dir, "0003_b.sql"), "alter table public.t add column b int;")
    assert.deepEqual(await pendingMigrations(t.db, { dir }), ["0003_b"])
    assert.deepEqual(await migrateToLatest(t.db, { dir }), ["0003_b"])
    await writeFile(join(dir, "0004_c.sql"), "alter table public.t add column c int;")
    assert.deepEqual(await migrateToLatest(t.db, { dir }), ["0004_c"])
    await assertMigrated(t.db, { dir })
  } finally {
    await t.drop()
    await rm(dir, { recursive: true })
  }
})

test("a migration file that appears during a run, numbered below one it applies, is left for the next run to refuse", {
  timeout: 60_000,
}, async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-appearing-migrations-"))
  await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);")
  const t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: dir })
  const holder = new pg.Client({ connectionString: t.url })
  await holder.connect()
  try {
    await writeFile(join(dir, "0003_c.sql"), "alter table public.t add column c int;")
    // 0003 waits for a reader of the table; meanwhile a checkout brings 0002.
    await holder.query("begin")
    await holder.query("select * from public.t")
    const running = migrateToLatest(t.db, { dir, lockTimeoutMs: 30_000 })
    await waitFor(
      async () =>
        (
          await sql<{ n: number }>`select count(*)::int as n from pg_locks
                                    where relation = 'public.t'::regclass and not granted`.execute(
            t.db,
          )
        ).rows[0]!.n > 0,
      { timeoutMs: 20_000, message: "0003 waits for the table" },
    )
    await writeFile(join(dir, "0002_b.sql"), "alter table public.t add column b int;")
    await holder.query("commit")
    assert.deepEqual(await running, ["0003_c"], "only what the run had checked")
    const b = await sql<{ n: number }>`select count(*)::int as n from information_schema.columns
                                        where table_name = 't' and column_name = 'b'`.execute(t.db)
    assert.equal(b.rows[0]!.n, 0, "0002 not applied after 0003")
    await assert.rejects(migrateToLatest(t.db, { dir }), /past 0002_b, while 0002_b is pending/)
  } finally {
    await holder.end()
    await t.drop()
    await rm(dir, { recursive: true })
  }
})

test("a migration edited after it was applied is refused by name, by migrate and by the processes' check", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-edited-migrations-"))
  await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);\n")
  await writeFile(
    join(dir, "0002_fn.sql"),
    "create function public.f() returns int as 'select 1' language sql;\n",
  )
  const empty = await mkdtemp(join(tmpdir(), "keyway-no-migrations-"))
  await using t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: empty })
  try {
    assert.deepEqual(await migrateToLatest(t.db, { dir }), ["0001_table", "0002_fn"])
    // The same text with Windows line ends is the same migration.
    await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);\r\n")
    await assertMigrated(t.db, { dir })
    // f() now returns 2 in the file; the database still runs the body that returns 1.
    await writeFile(
      join(dir, "0002_fn.sql"),
      "create function public.f() returns int as 'select 2' language sql;\n",
    )
    await writeFile(join(dir, "0003_more.sql"), "alter table public.t add column c int;\n")
    const refused = (err: Error) => {
      assert.ok(err instanceof MigrationError, String(err))
      // A process waiting for its database to be ready (retryUntilReady) gives up on it.
      assert.equal(err.permanent, true)
      assert.match(err.message, /^0002_fn\.sql \(sha256 [0-9a-f]{12}… applied, [0-9a-f]{12}… now\)/)
      assert.match(err.message, /never edited once applied/)
      assert.doesNotMatch(err.message, /0001_table/)
      return true
    }
    await assert.rejects(migrateToLatest(t.db, { dir }), refused)
    await assert.rejects(assertMigrated(t.db, { dir }), refused)
    assert.deepEqual(await pendingMigrations(t.db, { dir }), ["0003_more"], "nothing applied")
  } finally {
    await rm(dir, { recursive: true })
    await rm(empty, { recursive: true })
  }
})

test("migrations applied before their texts were recorded are taken as they are now, then checked", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-unrecorded-migrations-"))
  await writeFile(join(dir, "0001_table.sql"), "create table public.t (id int);\n")
  const empty = await mkdtemp(join(tmpdir(), "keyway-no-migrations-"))
  await using t = await createTestDatabase({ prefix: "keyway_mig", migrationsDir: empty })
  try {
    await migrateToLatest(t.db, { dir })
    // A database migrated by a release that kept no checksums.
    await sql`drop table public.keyway_migration_checksum`.execute(t.db)
    await assertMigrated(t.db, { dir })
    assert.deepEqual(await migrateToLatest(t.db, { dir }), [], "up to date")
    await writeFile(join(dir, "0001_table.sql"), "create table public.t (id bigint);\n")
    await assert.rejects(migrateToLatest(t.db, { dir }), /0001_table\.sql .*not the text/)
  } finally {
    await rm(dir, { recursive: true })
    await rm(empty, { recursive: true })
  }
})
