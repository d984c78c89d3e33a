// The admin API's answers to what an operator asks of it, on rows set up by hand. How the
// actions meet running workers is in keyed-consumer.test.ts and admin-locks.test.ts.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { createTestDatabase, type TestDatabase } from "@keyway/testkit"
import { sql } from "kysely"
import { ConsumerAdminError, createConsumerAdmin } from "../src/index.ts"
import {
  expireLeases,
  forgetPassedRewinds,
  recordReject,
  runnableKeys,
} from "../src/internal/inbox-sql.ts"

let t: TestDatabase
before(async () => {
  t = await createTestDatabase({ poolSize: 4 })
})
after(() => t.drop())

const admin = () => createConsumerAdmin({ db: t.db, group: "g" })
const blockAll = { byDefault: false, except: [] }

async function key(name: string, doneVer: number, startVer = 0) {
  await sql`
    insert into keyway.consumer_key (grp, topic, key, done_ver, start_ver)
    values ('g', 'demo.item', ${name}, ${doneVer}, ${startVer})`.execute(t.db)
}
async function task(
  name: string,
  ver: number,
  state: string,
  runAfter = "-infinity",
  type = "demo.item.changed.v1",
) {
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state,
                              attempts, run_after)
    values ('g', 'demo.item', ${name}, ${ver}, ${`${name}:${ver}`}, ${type},
            '{"n":1}', now(), ${state}, 1, ${runAfter}::timestamptz)`.execute(t.db)
}

test("a task skipped while it waits out a retry's backoff frees its key at once", async () => {
  await key("w", 1)
  await task("w", 1, "done")
  await task("w", 2, "pending", "infinity") // failed, to be tried again much later
  await task("w", 3, "pending")
  const runnable = async () =>
    (await runnableKeys(t.db, "g", blockAll, 100)).filter((k) => k.key === "w")
  assert.deepEqual(await runnable(), [], "waiting out the backoff")
  assert.equal(await admin().skip({ topic: "demo.item", key: "w", fromVer: 2, toVer: 2 }), 1)
  assert.deepEqual(await runnable(), [{ topic: "demo.item", key: "w" }], "v3 may run now")
})

test("a skip without a range takes dead tasks only; the events queued behind them stay", async () => {
  // A topic of its own: the skip below is topic-wide.
  for (const [k, rows] of [
    [
      "q",
      [
        ["dead", 1],
        ["pending", 2],
        ["pending", 3],
      ],
    ],
    ["r", [["pending", 1]]],
  ] as const) {
    await sql`insert into keyway.consumer_key (grp, topic, key, done_ver) values ('g', 'skip.topic', ${k}, 0)`.execute(
      t.db,
    )
    for (const [state, ver] of rows) {
      await sql`
        insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state)
        values ('g', 'skip.topic', ${k}, ${ver}, ${`skip:${k}:${ver}`}, 'demo.item.changed.v1',
                '{"n":1}', now(), ${state})`.execute(t.db)
    }
  }
  // Every key of the topic, asked for so: a key left out by a slip is not "every key".
  for (const act of ["skip", "redrive"] as const) {
    await assert.rejects(
      admin()[act]({ topic: "skip.topic" }),
      new RegExp(
        `^ConsumerAdminError: ${act}: a key, or allKeys: true for every key of topic skip.topic$`,
      ),
    )
    await assert.rejects(admin()[act]({ topic: "skip.topic", key: "q", allKeys: true }), /give one/)
  }
  assert.equal(await admin().skip({ topic: "skip.topic", allKeys: true }), 1)
  assert.equal(await admin().skip({ topic: "skip.topic", key: "q" }), 0)
  const states = await sql<{ key: string; ver: number; state: string }>`
    select key, ver::int, state from keyway.inbox where grp = 'g' and topic = 'skip.topic'
     order by key, ver`.execute(t.db)
  assert.deepEqual(
    states.rows.map((r) => `${r.key}${r.ver}:${r.state}`),
    ["q1:skipped", "q2:pending", "q3:pending", "r1:pending"],
  )
  // Named by a range, a pending task is skipped.
  assert.equal(await admin().skip({ topic: "skip.topic", key: "q", fromVer: 2, toVer: 2 }), 1)
})

test("a second retry keeps the later version the first one's task is told of", async () => {
  // v3 and v10 dead on a park topic, v4-v9 done: the key stands at 10.
  await key("sb", 10)
  await task("sb", 3, "dead")
  for (let v = 4; v <= 9; v++) await task("sb", v, "done")
  await task("sb", 10, "dead")
  const standing = async () =>
    (
      await sql<{ done_ver: number; superseded_by: number | null }>`
        select done_ver::int, superseded_by::int from keyway.consumer_key
         where grp = 'g' and key = 'sb'`.execute(t.db)
    ).rows[0]
  assert.equal(await admin().retry({ topic: "demo.item", key: "sb", fromVer: 3, toVer: 3 }), 1)
  assert.deepEqual(await standing(), { done_ver: 2, superseded_by: 9 })
  // v3 has not run again yet when v10 is retried: v3 must still learn of v9.
  assert.equal(await admin().retry({ topic: "demo.item", key: "sb", fromVer: 10, toVer: 10 }), 1)
  assert.deepEqual(await standing(), { done_ver: 2, superseded_by: 9 })
})

test("an operator's skip or retry keeps a task's vendor hold; a backoff is let go", async () => {
  // Held for what it sent (hold_until, sql/0024): dead, or pending after its push was cut
  // short; the vendor may still apply that call until then, over the next version's.
  const parkAll = { byDefault: true, except: [] }
  const rows: [string, string][] = [
    ["held", "dead"],
    ["cut", "pending"],
    ["retried", "dead"],
    ["backoff", "pending"],
  ]
  for (const [name, state] of rows) {
    await key(name, 1)
    await task(name, 1, "done")
    await task(name, 2, state, "infinity")
    await task(name, 3, "pending")
    if (name !== "backoff") {
      await sql`update keyway.inbox set hold_until = 'infinity'
                 where grp = 'g' and key = ${name} and ver = 2`.execute(t.db)
    }
  }
  const runnable = async () =>
    (await runnableKeys(t.db, "g", parkAll, 100))
      .map((k) => k.key)
      .filter((k) => rows.some(([name]) => name === k))
  assert.deepEqual(await runnable(), [])
  const waiting = async () => (await admin().summarise()).pendingKeys
  const before = await waiting()
  assert.equal(await admin().skip({ topic: "demo.item", key: "held", fromVer: 2, toVer: 2 }), 1)
  assert.equal(await waiting(), before, "held's v3 still counted as waiting, behind the hold")
  for (const name of ["cut", "backoff"]) {
    assert.equal(await admin().skip({ topic: "demo.item", key: name, fromVer: 2, toVer: 2 }), 1)
  }
  assert.equal(await admin().retry({ topic: "demo.item", key: "retried" }), 1)
  assert.deepEqual(await runnable(), ["backoff"], "only the backoff's key is freed")
})

test("the safety nets find a key rewound below tasks already done, once its retried task ran", async () => {
  // They look only at keys with an unfinished task, and at keys a rewind left below done
  // ones (sql/0022). Here v2 is redriven and runs again; a drain cut short there (its worker
  // died before stepping over v3, already done) leaves the key at a done task with nothing
  // unfinished: only the rewind's record finds it.
  await key("rw", 3)
  for (let v = 1; v <= 3; v++) await task("rw", v, "done")
  await key("idle", 3) // the same rows, never rewound: nothing to do
  for (let v = 1; v <= 3; v++) await task("idle", v, "done")
  assert.equal(await admin().redrive({ topic: "demo.item", key: "rw", fromVer: 2, toVer: 2 }), 1)
  await sql`update keyway.inbox set state = 'done' where grp = 'g' and key = 'rw' and ver = 2`.execute(
    t.db,
  )
  await sql`
    update keyway.consumer_key
       set done_ver = case key when 'rw' then 2 else done_ver end,
           lease_until = now() - interval '1 minute'
     where grp = 'g' and key in ('rw', 'idle')`.execute(t.db)
  const ours = (refs: { key: string }[]) =>
    refs.map((r) => r.key).filter((k) => k === "rw" || k === "idle")
  assert.deepEqual(ours(await runnableKeys(t.db, "g", blockAll, 100)), ["rw"], "the poll wakes it")
  assert.deepEqual(
    ours(await expireLeases(t.db, "g", blockAll)),
    ["rw"],
    "its lapsed lease is released",
  )
  // Walked past the rewind, the key leaves the candidates; "sb" (above) has not.
  await sql`update keyway.consumer_key set done_ver = 3 where grp = 'g' and key = 'rw'`.execute(
    t.db,
  )
  await forgetPassedRewinds(t.db, "g")
  const records = await sql<{ key: string; superseded_by: number | null }>`
    select key, superseded_by::int from keyway.consumer_key
     where grp = 'g' and key in ('rw', 'sb') order by key`.execute(t.db)
  assert.deepEqual(records.rows, [
    { key: "rw", superseded_by: null },
    { key: "sb", superseded_by: 9 },
  ])
})

test("a skip's epoch bump ends the run in hand: the next claim charges its task no lost run", async () => {
  // v3 runs alone (a suspect) when an operator skips v5; its worker, fenced, cannot close the
  // run, and its lease has lapsed by the time another worker claims the key.
  await key("sr", 2)
  await task("sr", 3, "pending")
  await task("sr", 5, "pending")
  await sql`
    update keyway.consumer_key
       set run_ver = 3, run_state = 'alone', run_suspect = true,
           lease_until = now() - interval '1 second'
     where grp = 'g' and key = 'sr'`.execute(t.db)
  assert.equal(await admin().skip({ topic: "demo.item", key: "sr", fromVer: 5, toVer: 5 }), 1)
  await sql`select * from keyway.claim_runs('g', array['demo.item'], array['sr'], 'w2', 15000, 10)`.execute(
    t.db,
  )
  const v3 = await sql<{ attempts: number; last_error: string | null }>`
    select attempts, last_error from keyway.inbox where grp = 'g' and key = 'sr' and ver = 3`.execute(
    t.db,
  )
  assert.deepEqual(v3.rows[0], { attempts: 1, last_error: null })
})

test("a version range without a key is refused: it would touch that version of every key", async () => {
  await key("x", 0)
  await task("x", 1, "dead")
  for (const action of ["retry", "skip", "redrive"] as const) {
    await assert.rejects(
      admin()[action]({ topic: "demo.item", fromVer: 1, toVer: 1 }),
      (err: unknown) => err instanceof ConsumerAdminError && /of one key/.test(err.message),
      action,
    )
  }
  const state = await sql<{ state: string }>`
    select state from keyway.inbox where grp = 'g' and key = 'x'`.execute(t.db)
  assert.equal(state.rows[0]!.state, "dead", "nothing changed")
})

test("a retry refused over versions that never arrived says so, not that retention took them", async () => {
  // First seen at v5 (started at 4); v2 came late and was stored dead (sql/0012).
  await key("z", 6, 4)
  await task("z", 2, "dead")
  await task("z", 5, "done")
  await task("z", 6, "done")
  await assert.rejects(
    admin().retry({ topic: "demo.item", key: "z" }),
    /demo\.item\/z \(v2 came after the key had started at v5; versions between never arrived\)/,
  )
})

test("a redrive runs again what ran: a version that came late, dead or skipped, neither stops it nor runs", async () => {
  // First seen at v5 (started at 4); v2 came late and was stored dead (sql/0012).
  for (const name of ["late-dead", "late-skipped"]) {
    await key(name, 6, 4)
    await task(name, 2, "dead")
    await task(name, 5, "done")
    await task(name, 6, "done")
  }
  await admin().skip({ topic: "demo.item", key: "late-skipped", fromVer: 2, toVer: 2 })
  for (const name of ["late-dead", "late-skipped"]) {
    assert.equal(await admin().redrive({ topic: "demo.item", key: name }), 2, name)
    const rows = await sql<{ ver: number; state: string }>`
      select ver::int as ver, state from keyway.inbox
       where grp = 'g' and key = ${name} order by ver`.execute(t.db)
    assert.deepEqual(
      rows.rows.map((r) => `v${r.ver} ${r.state}`),
      [`v2 ${name === "late-dead" ? "dead" : "skipped"}`, "v5 pending", "v6 pending"],
    )
    const k = await sql<{ done_ver: number }>`
      select done_ver::int as done_ver from keyway.consumer_key
       where grp = 'g' and key = ${name}`.execute(t.db)
    assert.equal(k.rows[0]!.done_ver, 4, "rewound to where the key started")
  }
  // A range from below the start: the versions below never arrived, which is no refusal.
  await key("late-range", 6, 4)
  await task("late-range", 5, "done")
  await task("late-range", 6, "done")
  assert.equal(await admin().redrive({ topic: "demo.item", key: "late-range", fromVer: 1 }), 2)
  // Late versions that an operator's retry ran since (v2..v4, all of them there) ran: they
  // run again.
  await key("late-ran", 6, 4)
  for (const ver of [2, 3, 4, 5, 6]) await task("late-ran", ver, "done")
  assert.equal(await admin().redrive({ topic: "demo.item", key: "late-ran" }), 5)
})

test("a redrive is not refused over a skip's placeholder whose older neighbours retention deleted", async () => {
  // v4 never came, and a skip stood in for it. The placeholder, written at the skip, is
  // younger than v5..v7 done after it: retention deleted them (and v1..v3), and kept it.
  await key("holey", 8)
  await task("holey", 4, "skipped", "-infinity", "keyway.skipped")
  await task("holey", 8, "done")
  assert.equal(await admin().redrive({ topic: "demo.item", key: "holey" }), 1)
  const k = await sql<{ done_ver: number }>`
    select done_ver::int as done_ver from keyway.consumer_key
     where grp = 'g' and key = 'holey'`.execute(t.db)
  assert.equal(k.rows[0]!.done_ver, 7, "rewound to v8, the one version it holds")
})

test("the summary of a group never seen is refused by name, like every other call", async () => {
  await assert.rejects(
    createConsumerAdmin({ db: t.db, group: "gg" }).summarise(),
    /group "gg" has stored no event in this database/,
  )
  // Each dead task stored by the tests above, counted: a summary of zeros read as all well.
  const stored = await sql<{ n: number }>`
    select count(*)::int as n from keyway.inbox where grp = 'g' and state = 'dead'`.execute(t.db)
  assert.equal((await admin().summarise()).deadTasks, stored.rows[0]!.n)
})

test("dead tasks are listed up to a limit, by topic, key and version", async () => {
  // A topic of its own, stored out of order: the tests above leave dead tasks of demo.item.
  const dead = [
    ["b", 2],
    ["a", 5],
    ["b", 1],
    ["a", 3],
  ] as const
  await sql`insert into keyway.consumer_key (grp, topic, key, done_ver, start_ver)
            values ('g', 'order.line', 'a', 2, 0), ('g', 'order.line', 'b', 0, 0)`.execute(t.db)
  for (const [k, ver] of dead) {
    await sql`
      insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at,
                                state, attempts, run_after)
      values ('g', 'order.line', ${k}, ${ver}, ${`ol-${k}:${ver}`}, 'order.line.changed.v1',
              '{}', now(), 'dead', 3, '-infinity')`.execute(t.db)
  }
  const listed = (rows: { key: string; ver: number }[]) => rows.map((r) => `${r.key}:${r.ver}`)
  assert.deepEqual(listed(await admin().listDead("order.line")), ["a:3", "a:5", "b:1", "b:2"])
  assert.deepEqual(listed(await admin().listDead("order.line", 3)), ["a:3", "a:5", "b:1"])
  const all = await admin().listDead()
  assert.deepEqual(
    all.map((r) => `${r.topic}/${r.key}/${String(r.ver).padStart(4, "0")}`),
    all.map((r) => `${r.topic}/${r.key}/${String(r.ver).padStart(4, "0")}`).sort(),
    "every topic's, in topic, key, version order",
  )
})

test("versions, limits and ids that are not whole numbers from 1, or a range upside down, are refused by name", async () => {
  await key("v", 0)
  await task("v", 1, "dead")
  const refused = async (call: Promise<unknown>, pattern: RegExp) =>
    assert.rejects(
      call,
      (err: unknown) => err instanceof ConsumerAdminError && pattern.test(err.message),
    )
  for (const action of ["retry", "skip", "redrive"] as const) {
    await refused(
      admin()[action]({ topic: "demo.item", key: "v", fromVer: 1.5 }),
      /fromVer must be a whole number from 1, not 1\.5/,
    )
    await refused(
      admin()[action]({ topic: "demo.item", key: "v", toVer: Number.NaN }),
      /toVer .* not NaN/,
    )
    await refused(admin()[action]({ topic: "demo.item", key: "v", fromVer: 0 }), /fromVer .* not 0/)
    await refused(
      admin()[action]({ topic: "demo.item", key: "v", fromVer: 3, toVer: 2 }),
      /fromVer 3 is above toVer 2/,
    )
    await refused(admin()[action]({ topic: "" }), /a topic is required/)
  }
  await refused(admin().listDead("demo.item", 0), /limit must be a whole number from 1, not 0/)
  await refused(admin().listRejects(-1), /limit .* not -1/)
  await refused(admin().dismissRejects(9, 3), /fromId 9 is above throughId 3/)
  const state = await sql<{ state: string }>`
    select state from keyway.inbox where grp = 'g' and key = 'v'`.execute(t.db)
  assert.equal(state.rows[0]!.state, "dead", "nothing changed")
})

test("a skip that would record more than 100,000 missing versions is refused; the stray version alone is not", async () => {
  // A stray event far above the rest: an open-ended skip from v2 would write a placeholder
  // for every version up to it.
  await key("far", 1)
  await task("far", 1, "done")
  await task("far", 1_000_000_000, "pending")
  await assert.rejects(
    admin().skip({ topic: "demo.item", key: "far", fromVer: 2 }),
    (err: unknown) =>
      err instanceof ConsumerAdminError &&
      /v2\.\.v1000000000 of demo\.item\/far would record 999999998 missing versions/.test(
        err.message,
      ),
  )
  const rows = async () =>
    (
      await sql<{
        n: number
      }>`select count(*)::int as n from keyway.inbox where grp = 'g' and key = 'far'`.execute(t.db)
    ).rows[0]!.n
  assert.equal(await rows(), 2, "no placeholder written")
  assert.equal(
    await admin().skip({
      topic: "demo.item",
      key: "far",
      fromVer: 1_000_000_000,
      toVer: 1_000_000_000,
    }),
    1,
  )
  assert.equal(await rows(), 2)
})

test("a group whose every message was rejected is known: its summary and rejects answer", async () => {
  await recordReject(t.db, "rejects-only", {
    streamSeq: 7,
    subject: "s.demo.item",
    reason: "not an event",
    data: Buffer.from("{"),
  })
  const only = createConsumerAdmin({ db: t.db, group: "rejects-only" })
  assert.equal((await only.summarise()).deadTasks, 0)
  assert.deepEqual(await only.listDead(), [])
  assert.deepEqual(
    (await only.listRejects()).map((r) => r.reason),
    ["not an event"],
  )
  await assert.rejects(
    only.listDead("demo.item"),
    (err: unknown) => err instanceof ConsumerAdminError && /no key in topic/.test(err.message),
  )
})
