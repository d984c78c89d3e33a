// What a migration finds in a database an earlier release wrote, and must leave right.
import assert from "node:assert/strict"
import { copyFile, mkdtemp, readdir, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import { migrateToLatest, migrationsDir } from "@keyway/db"
import { createTestDatabase } from "@keyway/testkit"
import { sql } from "kysely"
import { expireLeases, runnableKeys } from "../src/internal/inbox-sql.ts"

test("sql/0022: a key rewound without superseded_by (before sql/0017) is still found by the safety nets", async () => {
  // The release before 0022: its migrations, and a key an old admin CLI rewound below two
  // done versions, whose retried v2 then ran; its drain died before stepping over v3.
  const older = await mkdtemp(join(tmpdir(), "keyway-before-0022-"))
  try {
    for (const name of await readdir(migrationsDir)) {
      if (/^\d{4}_.*\.sql$/.test(name) && name < "0022") {
        await copyFile(join(migrationsDir, name), join(older, name))
      }
    }
    await using t = await createTestDatabase({ prefix: "keyway_upg", migrationsDir: older })
    await sql`
      insert into keyway.consumer_key (grp, topic, key, done_ver, lease_until)
      values ('g', 'demo.item', 'old-rewind', 2, now() - interval '1 minute'),
             ('g', 'demo.item', 'idle', 3, now() - interval '1 minute')`.execute(t.db)
    for (const key of ["old-rewind", "idle"]) {
      for (let ver = 1; ver <= 3; ver++) {
        await sql`
          insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at,
                                    state, attempts)
          values ('g', 'demo.item', ${key}, ${ver}, ${`${key}:${ver}`}, 'demo.item.changed.v1',
                  '{"n":1}', now(), 'done', 1)`.execute(t.db)
      }
    }
    assert.ok((await migrateToLatest(t.db)).includes("0022_unfinished_rows_indexed"))
    const standing = await sql<{ key: string; superseded_by: number | null }>`
      select key, superseded_by::int from keyway.consumer_key order by key`.execute(t.db)
    assert.deepEqual(standing.rows, [
      { key: "idle", superseded_by: null },
      { key: "old-rewind", superseded_by: 3 },
    ])
    const parks = { byDefault: false, except: [] }
    assert.deepEqual(
      (await runnableKeys(t.db, "g", parks, 100)).map((k) => k.key),
      ["old-rewind"],
    )
    assert.deepEqual(
      (await expireLeases(t.db, "g", parks)).map((k) => k.key),
      ["old-rewind"],
    )
  } finally {
    await rm(older, { recursive: true })
  }
})
