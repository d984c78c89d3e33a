import assert from "node:assert/strict"
import { mkdtemp, readdir, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import { createTestDatabase } from "@keyway/testkit"
import { sql } from "kysely"
import { assertMigrated, MigrationError, migrationsDir, pendingMigrations } from "../src/index.ts"

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
