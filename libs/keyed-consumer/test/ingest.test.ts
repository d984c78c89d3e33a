// keyway.ingest() against the real Postgres: what it records, and that it never waits for
// a handler's transaction (sql/0006_ingest_without_waiting.sql).
import assert from "node:assert/strict"
import { after, before, describe, test } from "node:test"
import { createTestDatabase, type TestDatabase, waitFor } from "@keyway/testkit"
import { sql } from "kysely"
import pg from "pg"
import {
  confirmBaselines,
  type IncomingEvent,
  ingestBatch,
  recordReject,
  runnableKeys,
} from "../src/internal/inbox-sql.ts"

const GROUP = "g"

function event(key: string, ver: number, streamSeq: number): IncomingEvent {
  return {
    topic: "demo.item",
    key,
    ver,
    eventId: `site:${streamSeq}`,
    type: "demo.item.changed.v1",
    payload: JSON.stringify({ n: ver }),
    trace: null,
    createdAt: new Date().toISOString(),
    streamSeq,
  }
}

describe("keyway.ingest", () => {
  let t: TestDatabase

  before(async () => {
    t = await createTestDatabase({ poolSize: 4 })
  })
  after(async () => {
    await t.drop()
  })

  /** A transaction of its own, begun, on a connection of its own; the caller ends both. */
  const openTransaction = async () => {
    const client = new pg.Client({ connectionString: t.url })
    await client.connect()
    await client.query("begin")
    return client
  }
  /**
   * Until one statement of this database waits on a lock. Asked on a connection of its own,
   * outside the transactions under test: a transaction sees pg_stat_activity as it was at
   * its first look, so polling from one of them never saw the wait begin.
   */
  const lockWait = (message: string, waiting = 1) =>
    waitFor(
      async () =>
        (
          await sql`select 1 from pg_stat_activity
                     where datname = current_database() and wait_event_type = 'Lock'`.execute(t.db)
        ).rows.length === waiting,
      { timeoutMs: 10_000, message },
    )
  /**
   * The settling of a group's provisional keys at `start`, as confirmBaselines does it, held
   * open: the keys locked for update, then settled. The caller commits and ends it.
   */
  const settleHeldOpen = async (group: string, start: number) => {
    const settler = await openTransaction()
    await settler.query(
      "select 1 from keyway.consumer_key where grp = $1 and baseline_stream_seq is not null for update",
      [group],
    )
    await settler.query(
      `update keyway.consumer_key set done_ver = $2, start_ver = $2, baseline_stream_seq = null
        where grp = $1 and baseline_stream_seq is not null`,
      [group, start],
    )
    return settler
  }
  /** A key's inbox rows, as "ver:state". */
  const inboxOf = async (group: string, key: string) =>
    (
      await sql<{ ver: number; state: string; last_error: string | null }>`
        select ver, state, last_error from keyway.inbox
         where grp = ${group} and key = ${key} order by ver`.execute(t.db)
    ).rows
  const keyRow = async (key: string) =>
    (
      await sql<{ done_ver: number; baseline_stream_seq: number | null }>`
        select done_ver, baseline_stream_seq from keyway.consumer_key
         where grp = ${GROUP} and topic = 'demo.item' and key = ${key}`.execute(t.db)
    ).rows

  test("first-seen keys get their start; redeliveries are dropped and wake nobody", async () => {
    const { woken } = await ingestBatch(t.db, GROUP, [
      event("a", 1, 10),
      event("a", 2, 11),
      event("b", 6, 13), // first seen above version 1: a provisional start
      event("b", 5, 12),
    ])
    assert.deepEqual(woken.map((r) => r.key).sort(), ["a", "b"])
    assert.deepEqual(await keyRow("a"), [{ done_ver: 0, baseline_stream_seq: null }])
    // Starts below its lowest version, provisionally, from that version's stream sequence.
    assert.deepEqual(await keyRow("b"), [{ done_ver: 4, baseline_stream_seq: 12 }])

    // A redelivery changes nothing and wakes nobody; a known key's start is kept even when
    // its next batch begins higher up.
    assert.deepEqual((await ingestBatch(t.db, GROUP, [event("a", 2, 11)])).woken, [])
    assert.deepEqual((await ingestBatch(t.db, GROUP, [event("a", 4, 15)])).woken, [
      { topic: "demo.item", key: "a" },
    ])
    assert.deepEqual(await keyRow("a"), [{ done_ver: 0, baseline_stream_seq: null }])
    // This test's keys only: the file's tests share the group.
    const inbox = await sql<{ key: string; ver: number }>`
      select key, ver from keyway.inbox where grp = ${GROUP} and key in ('a', 'b')
       order by key, ver`.execute(t.db)
    assert.deepEqual(
      inbox.rows.map((r) => `${r.key}${r.ver}`),
      ["a1", "a2", "a4", "b5", "b6"],
    )
  })

  test("a version at or below the key's done_ver is not stored again once retention took it", async () => {
    await ingestBatch(t.db, GROUP, [event("r", 1, 30), event("r", 2, 31), event("r", 3, 32)])
    // Versions 1 and 2 done and pruned by retention; 3 still pending.
    await sql`update keyway.consumer_key set done_ver = 2
               where grp = ${GROUP} and topic = 'demo.item' and key = 'r'`.execute(t.db)
    await sql`delete from keyway.inbox where grp = ${GROUP} and key = 'r' and ver <= 2`.execute(
      t.db,
    )
    // The whole key again, as a durable made anew from the start of the stream delivers it.
    const { woken } = await ingestBatch(t.db, GROUP, [
      event("r", 1, 30),
      event("r", 2, 31),
      event("r", 3, 32),
      event("r", 4, 33),
    ])
    assert.deepEqual(woken, [{ topic: "demo.item", key: "r" }], "woken by version 4 only")
    const inbox = await sql<{ ver: number }>`
      select ver from keyway.inbox where grp = ${GROUP} and key = 'r' order by ver`.execute(t.db)
    assert.deepEqual(
      inbox.rows.map((r) => r.ver),
      [3, 4],
    )
    assert.deepEqual(await keyRow("r"), [{ done_ver: 2, baseline_stream_seq: null }])

    // A provisional start is no such floor: the versions below it are the ones it waits for.
    await ingestBatch(t.db, GROUP, [event("p", 3, 41)])
    assert.deepEqual(await keyRow("p"), [{ done_ver: 2, baseline_stream_seq: 41 }])
    await ingestBatch(t.db, GROUP, [event("p", 1, 39), event("p", 2, 40)])
    const p = await sql<{ ver: number }>`
      select ver from keyway.inbox where grp = ${GROUP} and key = 'p' order by ver`.execute(t.db)
    assert.deepEqual(
      p.rows.map((r) => r.ver),
      [1, 2, 3],
    )
  })

  test("a version that arrives below where its settled key started is listed dead, not dropped", async () => {
    // A group of its own, whose only key "q" is first seen at version 3; settled once the ack
    // floor has passed it.
    const group = "late"
    await ingestBatch(t.db, group, [event("q", 3, 50)])
    assert.equal(await confirmBaselines(t.db, group, 60), 1)
    // Versions 1 and 2 come after, at later stream sequences: what a NATS that lost them
    // and a relay that published them again make of a key's start.
    const { woken } = await ingestBatch(t.db, group, [event("q", 1, 61), event("q", 2, 62)])
    assert.deepEqual(woken, [{ topic: "demo.item", key: "q" }])
    const rows = await sql<{ ver: number; state: string; last_error: string | null }>`
      select ver, state, last_error from keyway.inbox where grp = ${group} and key = 'q' order by ver`.execute(
      t.db,
    )
    assert.deepEqual(
      rows.rows.map((r) => `${r.ver}:${r.state}`),
      ["1:dead", "2:dead", "3:pending"],
    )
    assert.match(rows.rows[0]!.last_error!, /arrived after its key had started above it \(at v3\)/)
    const key = await sql<{ done_ver: number; start_ver: number; dead_tasks: number }>`
      select done_ver, start_ver, dead_tasks from keyway.consumer_key
       where grp = ${group} and key = 'q'`.execute(t.db)
    assert.deepEqual(key.rows, [{ done_ver: 2, start_ver: 2, dead_tasks: 2 }])
    // Delivered again, they are not stored twice.
    assert.deepEqual((await ingestBatch(t.db, group, [event("q", 1, 61)])).woken, [])
  })
  test("a late version stored while its key's start is settled is kept runnable, not lost", async () => {
    // Key "s" first seen at v5 (provisional); v3, re-published late, is being stored by an
    // ingest still open when the settling runs.
    const group = "settling"
    await ingestBatch(t.db, group, [event("s", 5, 100)])
    const late = await openTransaction()
    try {
      await late.query(
        `select * from keyway.ingest($1, '{demo.item}', '{s}', '{3}', '{site:105}',
           '{demo.item.changed.v1}', '{"{}"}', '{null}', array[now()], '{105}')`,
        [group],
      )
      const settling = confirmBaselines(t.db, group, 100)
      // It waits for the ingest; before sql/0015 it settled at once, from what it could see.
      await Promise.race([settling, lockWait("the settling waits for the ingest").catch(() => {})])
      await late.query("commit")
      assert.equal(await settling, 1)
    } finally {
      await late.end()
    }
    const key = await sql<{ done_ver: number; start_ver: number }>`
      select done_ver, start_ver from keyway.consumer_key where grp = ${group} and key = 's'`.execute(
      t.db,
    )
    // Settled below v3, which is pending and runs once v4 arrives.
    assert.deepEqual(key.rows, [{ done_ver: 2, start_ver: 2 }])
    assert.deepEqual(
      (await inboxOf(group, "s")).map((r) => `${r.ver}:${r.state}`),
      ["3:pending", "5:pending"],
    )
  })

  test("an ingest that finds its key settled while it waited lists a version below the start as dead", async () => {
    const group = "settled-meanwhile"
    await ingestBatch(t.db, group, [event("m", 5, 100)])
    const settler = await settleHeldOpen(group, 4)
    try {
      const ingesting = ingestBatch(t.db, group, [event("m", 3, 105)])
      await lockWait("the ingest waits for the settling")
      await settler.query("commit")
      await ingesting
    } finally {
      await settler.end()
    }
    const rows = await inboxOf(group, "m")
    assert.deepEqual(
      rows.map((r) => `${r.ver}:${r.state}`),
      ["3:dead", "5:pending"],
    )
    assert.match(rows[0]!.last_error!, /arrived after its key had started above it \(at v5\)/)
  })

  test("two ingests of late versions that find their key settled meanwhile both store them, dead", async () => {
    const group = "two-late"
    await ingestBatch(t.db, group, [event("k", 5, 100)])
    const settler = await settleHeldOpen(group, 4)
    try {
      const first = ingestBatch(t.db, group, [event("k", 3, 105)])
      const second = ingestBatch(t.db, group, [event("k", 2, 106)])
      await lockWait("both ingests wait for the settling", 2)
      await settler.query("commit")
      // Each stores its version dead, and the dead-task count's trigger updates the key: with
      // a share lock each, each waited for the other's (40P01).
      await Promise.all([first, second])
    } finally {
      await settler.end()
    }
    assert.deepEqual(
      (await inboxOf(group, "k")).map((r) => `${r.ver}:${r.state}`),
      ["2:dead", "3:dead", "5:pending"],
    )
  })

  test("the polling loop's pages of runnable keys go round all of them", async () => {
    const group = "pages"
    await ingestBatch(
      t.db,
      group,
      ["p3", "p0", "p4", "p1", "p2"].map((key, i) => event(key, 1, 300 + i)),
    )
    const parks = { byDefault: false, except: [] }
    const pages: string[][] = []
    let after: { topic: string; key: string } | undefined
    do {
      const page = await runnableKeys(t.db, group, parks, 2, after)
      pages.push(page.map((r) => r.key))
      after = page.length === 2 ? page.at(-1) : undefined
    } while (after && pages.length < 5)
    // Unordered and from the start each time, every page was the same two keys.
    assert.deepEqual(pages, [["p0", "p1"], ["p2", "p3"], ["p4"]])
  })

  test("an event that meets a different one at its version or its id is returned, not dropped", async () => {
    const group = "collide"
    const at = (key: string, ver: number, streamSeq: number, eventId: string) => ({
      ...event(key, ver, streamSeq),
      eventId,
    })
    assert.deepEqual(
      (await ingestBatch(t.db, group, [at("c", 1, 300, "s:1"), at("c", 2, 301, "s:2")])).collisions,
      [],
    )
    // A redelivery is the same event: nothing to report.
    assert.deepEqual(await ingestBatch(t.db, group, [at("c", 1, 300, "s:1")]), {
      woken: [],
      collisions: [],
    })
    const second = await ingestBatch(t.db, group, [
      at("c", 2, 310, "other:2"), // another outbox's v2 of the same key
      at("c", 5, 311, "s:1"), // an id given out again, at another version
      // Two different events at one version in one batch: the first is stored.
      at("c", 3, 320, "x:1"),
      at("c", 3, 321, "x:2"),
      // The same event twice in one batch (a stream's duplicate) is no collision.
      at("c", 4, 330, "x:5"),
      at("c", 4, 331, "x:5"),
    ])
    assert.deepEqual(second.woken, [{ topic: "demo.item", key: "c" }])
    const reasons = new Map(second.collisions.map((c) => [c.streamSeq, c.reason]))
    assert.deepEqual([...reasons.keys()].sort(), [310, 311, 321])
    assert.match(
      reasons.get(310)!,
      /^v2 of demo\.item\/c is already held by another event, s:2, and this is other:2: /,
    )
    assert.match(
      reasons.get(311)!,
      /^event id s:1 is already held by v1 of demo\.item\/c, and this is v5/,
    )
    assert.match(reasons.get(321)!, /already held by another event, x:1, and this is x:2/)
    // A version an operator skipped while it was missing holds a placeholder: the event, come
    // late, is the one the skip gave up on, not a collision.
    await sql`
      insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state)
      values (${group}, 'demo.item', 'c', 6, 'skipped:demo.item:c:6', 'keyway.skipped', 'null',
              now(), 'skipped')`.execute(t.db)
    assert.deepEqual(await ingestBatch(t.db, group, [at("c", 6, 340, "s:6")]), {
      woken: [],
      collisions: [],
    })
    const inbox = await sql<{ ver: number; event_id: string }>`
      select ver, event_id from keyway.inbox where grp = ${group} order by ver`.execute(t.db)
    assert.deepEqual(
      inbox.rows.map((r) => `${r.ver}:${r.event_id}`),
      ["1:s:1", "2:s:2", "3:x:1", "4:x:5", "6:skipped:demo.item:c:6"],
    )
  })
  test("a message rejected on each of its deliveries is kept once", async () => {
    const reject = {
      streamSeq: 77,
      subject: "s.demo.item",
      reason: "not JSON",
      data: new Uint8Array([1]),
    }
    await recordReject(t.db, GROUP, reject)
    await recordReject(t.db, GROUP, reject)
    await recordReject(t.db, "other", reject)
    const rows = await sql<{ grp: string }>`
      select grp from keyway.inbox_reject where stream_seq = 77 order by grp`.execute(t.db)
    assert.deepEqual(
      rows.rows.map((r) => r.grp),
      ["g", "other"],
    )
  })

  test("does not wait for an open transaction that updated the key", async () => {
    await ingestBatch(t.db, GROUP, [event("busy", 1, 100)])
    // A completion in flight: the key's row updated, its transaction not yet committed.
    const handler = new pg.Client({ connectionString: t.url })
    await handler.connect()
    try {
      await handler.query("begin")
      await handler.query(
        `update keyway.consumer_key set done_ver = 1
          where grp = $1 and topic = 'demo.item' and key = 'busy'`,
        [GROUP],
      )
      // Before 0006, ON CONFLICT on consumer_key waited for that transaction to end; with a
      // lock timeout it fails instead of hanging the test.
      const woken = await t.db.transaction().execute(async (trx) => {
        await sql`set local lock_timeout = '3s'`.execute(trx)
        return ingestBatch(trx, GROUP, [event("busy", 2, 101)])
      })
      assert.deepEqual(woken.woken, [{ topic: "demo.item", key: "busy" }])
      await handler.query("commit")
    } finally {
      await handler.end()
    }
    assert.deepEqual(await keyRow("busy"), [{ done_ver: 1, baseline_stream_seq: null }])
  })

  test("a completion and an ingest of a redelivered row it is marking done do not deadlock", async () => {
    // Key "a" is running v1; "b", first seen at v3, settled there (start_ver 2); "c", first
    // seen at v5, not yet settled.
    const group = "completing"
    await ingestBatch(t.db, group, [event("a", 1, 1), event("b", 3, 2)])
    assert.equal(await confirmBaselines(t.db, group, 2), 1)
    await ingestBatch(t.db, group, [event("c", 5, 10)])
    // Holds c, so that the ingest below stops in the middle of its key locks, holding b.
    const holder = await openTransaction()
    const completer = await openTransaction()
    try {
      await holder.query(
        "select 1 from keyway.consumer_key where grp = $1 and key = 'c' for update",
        [group],
      )
      // a v1 again (its ack was lost); a late b v2, stored dead, so b is locked first; and c.
      const ingesting = ingestBatch(t.db, group, [
        event("a", 1, 1),
        event("b", 2, 5),
        event("c", 6, 11),
      ])
      await lockWait("the ingest waits for c")
      // The worker's completion of a v1 and b v3, in one statement as completeTasks sends it.
      const completing = completer.query(
        `select n from keyway.complete_tasks($1, '{demo.item,demo.item}', '{a,b}', '{1,3}',
           '{0,0}', 30000) as n`,
        [group],
      )
      await lockWait("the completion waits for b", 2)
      await holder.query("commit")
      // Before sql/0016 the completion had marked a v1 done before it waited for b, and the
      // ingest, holding b, then waited on that row: 40P01, one of the two rolled back.
      assert.deepEqual((await ingesting).woken.map((r) => r.key).sort(), ["b", "c"])
      assert.equal((await completing).rowCount, 2)
      await completer.query("commit")
    } finally {
      await holder.end()
      await completer.end()
    }
    const states = async (key: string) =>
      (await inboxOf(group, key)).map((r) => `${key}${r.ver}:${r.state}`)
    assert.deepEqual(
      [...(await states("a")), ...(await states("b")), ...(await states("c"))],
      ["a1:done", "b2:dead", "b3:done", "c5:pending", "c6:pending"],
    )
  })

  test("a batch's new rows are stored in byte order of key, then version, whatever order they came in", async () => {
    // The order in which rows are stored is the order in which a transaction that inserts the
    // same versions meets them (sql/0018): a skip's placeholders go in ascending order, and
    // a batch stored in another (v3 before v2) deadlocked with it. A fresh table fills its
    // first page in insertion order, which ctid shows: a database of its own.
    await using fresh = await createTestDatabase({ poolSize: 1 })
    const group = "stored-order"
    await ingestBatch(fresh.db, group, [event("b", 1, 401), event("a", 2, 402), event("a", 1, 403)])
    const stored = await sql<{ key: string; ver: number }>`
      select key, ver::int from keyway.inbox where grp = ${group} order by ctid`.execute(fresh.db)
    assert.deepEqual(
      stored.rows.map((r) => `${r.key}${r.ver}`),
      ["a1", "a2", "b1"],
    )
  })

  test("two ingests that see a new key at once keep one start", async () => {
    const first = await openTransaction()
    try {
      await first.query(
        `select * from keyway.ingest($1, '{demo.item}', '{fresh}', '{3}', '{site:203}',
           '{demo.item.changed.v1}', '{"{}"}', '{null}', array[now()], '{203}')`,
        [GROUP],
      )
      // The second sees no row yet, inserts, meets the first in ON CONFLICT and waits for it.
      const second = ingestBatch(t.db, GROUP, [event("fresh", 1, 201), event("fresh", 2, 202)])
      await lockWait("the second ingest waits for the first")
      await first.query("commit")
      assert.deepEqual(await second, {
        woken: [{ topic: "demo.item", key: "fresh" }],
        collisions: [],
      })
    } finally {
      await first.end()
    }
    // The first to insert (and commit) decides the start; a provisional one is settled by
    // keyway.confirm_baselines(), as before.
    assert.deepEqual(await keyRow("fresh"), [{ done_ver: 2, baseline_stream_seq: 203 }])
  })

  test("in a database whose collation is not C, ingest and an operator's skip lock keys in one order", async () => {
    // Every database here is C.UTF-8, where byte order and the database's order agree. The
    // compose image's Postgres is en_US: 'a' < 'B' there, 'B' < 'a' in byte order.
    const en = await createTestDatabase({ icuLocale: "en-US", poolSize: 2 })
    const db = en.db
    const name = en.name
    const skip = new pg.Client({ connectionString: en.url })
    try {
      const group = "collation"
      await ingestBatch(db, group, [event("a", 5, 100), event("B", 5, 101)])
      await skip.connect()
      // An operator's skip or retry locks its keys FOR UPDATE in byte order: B, then a.
      await skip.query("begin")
      await skip.query(
        "select 1 from keyway.consumer_key where grp = $1 and key = 'B' for update",
        [group],
      )
      // Late versions of both keys, provisional still: read again locked, key by key.
      const ingesting = ingestBatch(db, group, [event("a", 3, 102), event("B", 3, 103)])
      await waitFor(
        async () =>
          (
            await sql`select 1 from pg_stat_activity
                       where datname = ${name} and wait_event_type = 'Lock'`.execute(t.db)
          ).rows.length === 1,
        { timeoutMs: 10_000, message: "the ingest waits for the skip" },
      )
      // In the database's order the ingest held 'a' by now, and this was a deadlock (40P01).
      await skip.query(
        "select 1 from keyway.consumer_key where grp = $1 and key = 'a' for update",
        [group],
      )
      await skip.query("commit")
      await ingesting
      assert.deepEqual(
        (
          await sql<{ key: string; n: number }>`
          select key, count(*)::int as n from keyway.inbox group by key order by key collate "C"`.execute(
            db,
          )
        ).rows,
        [
          { key: "B", n: 2 },
          { key: "a", n: 2 },
        ],
      )
    } finally {
      await skip.end().catch(() => {})
      await en.drop()
    }
  })
})
