// The admin actions against workers holding key rows: they take keys in the workers' order.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { createTestDatabase, type TestDatabase, waitFor } from "@keyway/testkit"
import { sql } from "kysely"
import pg from "pg"
import { ConsumerAdminError, createConsumerAdmin } from "../src/index.ts"
import { sortedRefs } from "../src/internal/inbox-sql.ts"

let t: TestDatabase
before(async () => {
  t = await createTestDatabase({ poolSize: 4 })
})
after(() => t.drop())

/**
 * Until one statement in `database` (the test's own by default) waits on a lock. Asked on a
 * connection of its own: a transaction under test sees pg_stat_activity as at its first look.
 */
const lockWait = (message: string, database?: string) =>
  waitFor(
    async () =>
      (
        await sql`select 1 from pg_stat_activity
                   where datname = ${database ?? t.name} and wait_event_type = 'Lock'`.execute(t.db)
      ).rows.length === 1,
    { timeoutMs: 10_000, message },
  )

/** Key `key` of group "g" in topic demo.item, done up to `doneVer`, with these tasks. */
async function storeKey(
  db: TestDatabase["db"],
  key: string,
  doneVer: number,
  tasks: readonly (readonly [ver: number, state: string, attempts: number])[],
) {
  await sql`insert into keyway.consumer_key (grp, topic, key, done_ver)
            values ('g', 'demo.item', ${key}, ${doneVer})`.execute(db)
  for (const [ver, state, attempts] of tasks) {
    await sql`
      insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state, attempts)
      values ('g', 'demo.item', ${key}, ${ver}, ${`${key}:${ver}`}, 'demo.item.changed.v1', '{"n":1}', now(), ${state}, ${attempts})
    `.execute(db)
  }
}

for (const action of ["skip", "retry"] as const) {
  test(`a topic-wide ${action} takes its keys in byte order, so a worker holding one cannot deadlock it`, async () => {
    // In en-US order 'a' < 'B'; in byte order, the workers' order, 'B' < 'a'. On this
    // machine's C.UTF-8 databases the two agree, and a missing collate "C" would pass.
    await using en = await createTestDatabase({ icuLocale: "en-US", poolSize: 2 })
    // Stored "a" before "B", so a statement that locks keys as it finds them takes "a" first.
    for (const key of ["a", "B"]) await storeKey(en.db, key, 0, [[1, "dead", 3]])
    // A worker's completion of both: it locks them in byte order, "B" first.
    const worker = new pg.Client({ connectionString: en.url })
    await worker.connect()
    try {
      await worker.query("begin")
      await worker.query(
        "select 1 from keyway.consumer_key where grp = 'g' and key = 'B' for update",
      )
      const acting = createConsumerAdmin({ db: en.db, group: "g" })[action]({
        topic: "demo.item",
        allKeys: true,
      })
      await lockWait(`the ${action} waits for the worker`, en.name)
      // Holding "a" here, the action would wait for "B" while the worker waits for "a".
      await worker.query(
        "select 1 from keyway.consumer_key where grp = 'g' and key = 'a' for update",
      )
      await worker.query("commit")
      assert.equal(await acting, 2)
    } finally {
      await worker.end()
    }
    const states = await sql<{ key: string; state: string }>`
      select key, state from keyway.inbox where grp = 'g' order by key collate "C"`.execute(en.db)
    const after = action === "skip" ? "skipped" : "pending"
    assert.deepEqual(
      states.rows.map((r) => `${r.key}:${r.state}`),
      [`B:${after}`, `a:${after}`],
    )
  })
}

test('workers order keys as the admin actions lock them: code points, Postgres\' collate "C"', async () => {
  // Characters above U+FFFF (surrogate pairs in JavaScript) against U+E000..U+FFFF, where
  // UTF-16 code unit order and code point order disagree, and some plainer ones.
  const keys = ["😀", "ｱ", "\uffff", "\u{10000}", "a", "Z", "é", "ab", "a😀", "aｱ", "", "\ue000"]
  const ours = sortedRefs(keys.map((key) => ({ topic: "t", key }))).sorted.map((r) => r.key)
  const theirs = await sql<{ k: string }>`
    select k from unnest(${keys}::text[]) as k order by k collate "C"`.execute(t.db)
  assert.deepEqual(
    ours,
    theirs.rows.map((r) => r.k),
  )
})

test("a redrive counts its range once its key is locked: rows retention deletes meanwhile are seen", async () => {
  await storeKey(
    t.db,
    "rr",
    6,
    [1, 2, 3, 4, 5, 6].map((ver) => [ver, "done", 1] as const),
  )
  // Retention, as pruneInbox goes: the key taken FOR KEY SHARE, then its oldest row deleted.
  const retention = new pg.Client({ connectionString: t.url })
  await retention.connect()
  try {
    await retention.query("begin")
    await retention.query(
      "select 1 from keyway.consumer_key where grp = 'g' and key = 'rr' for key share",
    )
    await retention.query("delete from keyway.inbox where grp = 'g' and key = 'rr' and ver = 1")
    const redrive = createConsumerAdmin({ db: t.db, group: "g" })
      .redrive({ topic: "demo.item", key: "rr", fromVer: 1, toVer: 6 })
      .then(
        (n) => n,
        (err: Error) => err,
      )
    await lockWait("the redrive waits for retention")
    await retention.query("commit")
    // Counted before the lock, v1 was still there: v2..v6 ran again and the answer was 5.
    const answer = await redrive
    assert.ok(answer instanceof ConsumerAdminError, `answered ${answer}`)
    assert.match(answer.message, /retention already deleted 1 of the finished versions v1\.\.v6/)
  } finally {
    await retention.end()
  }
  const states = await sql<{ state: string }>`
    select distinct state from keyway.inbox where grp = 'g' and key = 'rr'`.execute(t.db)
  assert.deepEqual(
    states.rows.map((r) => r.state),
    ["done"],
    "nothing redriven",
  )
})

/**
 * Key `key` of group "g" that ran v1 and holds v3 (pending), v2 missing; and an ingest on a
 * connection of its own, storing one version a statement, so that a skip can come in between.
 */
async function gapAndIngest(key: string) {
  await storeKey(t.db, key, 1, [
    [1, "done", 0],
    [3, "pending", 0],
  ])
  const ingest = new pg.Client({ connectionString: t.url })
  await ingest.connect()
  const store = (ver: number) =>
    ingest.query(
      `select * from keyway.ingest('g', '{demo.item}', array[$4], array[$1::bigint], array[$2],
         '{demo.item.changed.v1}', '{"{\\"n\\":1}"}', '{null}', array[now()], array[$3::bigint])`,
      [ver, `${key}:${ver}`, 1000 + ver, key],
    )
  const states = async () =>
    (
      await sql<{ ver: number; state: string; type: string }>`
        select ver::int, state, type from keyway.inbox where grp = 'g' and key = ${key} order by ver`.execute(
        t.db,
      )
    ).rows.map((r) => `${r.ver}:${r.state}:${r.type}`)
  return { ingest, store, states }
}

test("a skip closing a gap and an ingest bringing the missing version late do not deadlock", async () => {
  // The operator skips v2..v3 just as v2 arrives, in a batch with v3 delivered again.
  const { ingest, store, states } = await gapAndIngest("gk")
  try {
    await ingest.query("begin")
    await store(2)
    const skip = createConsumerAdmin({ db: t.db, group: "g" })
      .skip({ topic: "demo.item", key: "gk", fromVer: 2, toVer: 3 })
      .then(
        (n) => n,
        (err: Error) => err,
      )
    await lockWait("the skip waits for the ingest's v2")
    // When the skip marked v3 before it stored v2's placeholder, this waited on v3 while the
    // skip waited on v2: 40P01.
    await store(3)
    await ingest.query("commit")
    assert.equal(await skip, 2)
  } finally {
    await ingest.end()
  }
  assert.deepEqual(await states(), [
    "1:done:demo.item.changed.v1",
    "2:skipped:demo.item.changed.v1",
    "3:skipped:demo.item.changed.v1",
  ])
})

test("an open-ended skip that waited for an ingest leaves what the ingest brought above its end", async () => {
  // `skip --from 2` ends at v3, the highest received when it began; the ingest it waits for
  // brings v4 beside the late v2.
  const { ingest, store, states } = await gapAndIngest("open")
  try {
    await ingest.query("begin")
    await store(2)
    await store(4)
    const skip = createConsumerAdmin({ db: t.db, group: "g" })
      .skip({ topic: "demo.item", key: "open", fromVer: 2 })
      .then(
        (n) => n,
        (err: Error) => err,
      )
    await lockWait("the skip waits for the ingest's v2")
    await ingest.query("commit")
    assert.equal(await skip, 2)
  } finally {
    await ingest.end()
  }
  // v4 the operator never saw: skipped with the rest, it would never run.
  assert.deepEqual(await states(), [
    "1:done:demo.item.changed.v1",
    "2:skipped:demo.item.changed.v1",
    "3:skipped:demo.item.changed.v1",
    "4:pending:demo.item.changed.v1",
  ])
})
