import assert from "node:assert/strict"
import { spawn } from "node:child_process"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import { createTestDatabase, type TestDatabase } from "@keyway/testkit"
import { sql } from "kysely"
import pg from "pg"

const cli = fileURLToPath(new URL("../src/main.ts", import.meta.url))
let t: TestDatabase

/** Runs the CLI as an operator would and collects what it printed. */
function run(
  args: string[],
  databaseUrl = t.url,
  command = [process.execPath, "--import", "tsx", cli],
) {
  return new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
    const child = spawn(command[0]!, [...command.slice(1), ...args], {
      cwd: fileURLToPath(new URL("../../..", import.meta.url)),
      env: { ...process.env, DATABASE_URL: databaseUrl },
    })
    let out = ""
    let err = ""
    child.stdout.on("data", (d) => (out += d))
    child.stderr.on("data", (d) => (err += d))
    child.on("exit", (code) => resolve({ code, out, err }))
  })
}

before(async () => {
  t = await createTestDatabase()
  // Key "a": v1 done, v2 dead (blocking), v3 pending behind it. Key "b": v1 done, v3 present: a gap at v2.
  await sql`
    insert into keyway.consumer_key (grp, topic, key, done_ver, gap_since) values
      ('g', 'demo.item', 'a', 1, null), ('g', 'demo.item', 'b', 1, now() - interval '90 seconds')
  `.execute(t.db)
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state, attempts, last_error)
    values ('g', 'demo.item', 'a', 1, 's:1', 'demo.item.changed.v1', '{"n":1}', now(), 'done', 1, null),
           ('g', 'demo.item', 'a', 2, 's:2', 'demo.item.changed.v1', '{"n":2}', now(), 'dead', 5, 'vendor says no'),
           ('g', 'demo.item', 'a', 3, 's:3', 'demo.item.changed.v1', '{"n":3}', now(), 'pending', 0, null),
           ('g', 'demo.item', 'b', 1, 's:4', 'demo.item.changed.v1', '{"n":1}', now(), 'done', 1, null),
           ('g', 'demo.item', 'b', 3, 's:6', 'demo.item.changed.v1', '{"n":3}', now(), 'pending', 0, null)
  `.execute(t.db)
})
after(() => t.drop())

/** A group of its own with one key, stopped at its v1, dead after 5 attempts. */
async function insertDeadTask(group: string, key: string) {
  await sql`insert into keyway.consumer_key (grp, topic, key, done_ver)
            values (${group}, 'demo.item', ${key}, 0)`.execute(t.db)
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state, attempts)
    values (${group}, 'demo.item', ${key}, 1, ${`${group}:1`}, 'demo.item.changed.v1', '{"n":1}', now(), 'dead', 5)
  `.execute(t.db)
}

test("--help prints the usage and succeeds", async () => {
  for (const args of [["--help"], ["dead", "-h"]]) {
    const help = await run(args)
    assert.equal(help.code, 0, help.err)
    assert.match(help.out, /^usage: admin <command> --group G/)
  }
})

test("a reader that closes its pipe early ends the CLI quietly", async () => {
  // As `admin dead | head -c 100` does: the reader is gone before the CLI writes.
  const child = spawn(process.execPath, ["--import", "tsx", cli, "dead", "--group", "g"], {
    cwd: fileURLToPath(new URL("../../..", import.meta.url)),
    env: { ...process.env, DATABASE_URL: t.url },
  })
  child.stdout.destroy()
  let err = ""
  child.stderr.on("data", (d) => (err += d))
  const code = await new Promise((resolve) => child.on("exit", resolve))
  assert.equal(err, "", "nothing said of it")
  assert.equal(code, 0)
})

test("lists dead tasks, blocked keys and gaps as JSON", async () => {
  const dead = await run(["dead", "--group", "g"])
  assert.equal(dead.code, 0, dead.err)
  const rows = JSON.parse(dead.out)
  assert.equal(rows.length, 1)
  assert.equal(rows[0].key, "a")
  assert.equal(rows[0].lastError, "vendor says no")
  assert.equal(rows[0].blocking, true)
  const gaps = JSON.parse((await run(["gaps", "--group", "g"])).out)
  assert.deepEqual(
    gaps.map((g: { key: string; missingVer: number }) => [g.key, Number(g.missingVer)]),
    [["b", 2]],
  )
  const blocked = JSON.parse((await run(["blocked", "--group", "g", "--topic", "demo.item"])).out)
  assert.deepEqual(
    blocked.map((b: { key: string }) => b.key),
    ["a"],
  )
  const summary = JSON.parse((await run(["summary", "--group", "g"])).out)
  assert.ok(summary.oldestGapSeconds >= 90, `b has waited 90 s: ${summary.oldestGapSeconds}`)
  assert.deepEqual(
    { ...summary, oldestGapSeconds: 90 },
    {
      gapKeys: 1,
      oldestGapSeconds: 90,
      deadTasks: 1,
      blockedKeys: 1,
      pendingKeys: 0,
      oldestPendingSeconds: 0,
    },
  )
})

test("skip closes a gap named by a range and unblocks a dead task", async () => {
  const gap = await run([
    "skip",
    "--group",
    "g",
    "--topic",
    "demo.item",
    "--key",
    "b",
    "--from",
    "2",
    "--to",
    "2",
  ])
  assert.equal(gap.code, 0, gap.err)
  assert.deepEqual(JSON.parse(gap.out), { skipped: 1 })
  const dead = await run([
    "skip",
    "--group",
    "g",
    "--topic",
    "demo.item",
    "--key",
    "a",
    "--from",
    "2",
    "--to",
    "2",
  ])
  assert.deepEqual(JSON.parse(dead.out), { skipped: 1 })
  const states = await sql<{ key: string; ver: number; state: string }>`
    select key, ver, state from keyway.inbox where grp = 'g' order by key, ver
  `.execute(t.db)
  assert.deepEqual(
    states.rows.map((r) => `${r.key}${r.ver}:${r.state}`),
    ["a1:done", "a2:skipped", "a3:pending", "b1:done", "b2:skipped", "b3:pending"],
  )
  assert.deepEqual(JSON.parse((await run(["gaps", "--group", "g"])).out), [])
  assert.deepEqual(JSON.parse((await run(["dead", "--group", "g"])).out), [])
})

test("an action that matches nothing says so on stderr, and changes nothing", async () => {
  // Key "a": v3 is pending, not dead.
  const retry = await run([
    "retry",
    "--group",
    "g",
    "--topic",
    "demo.item",
    "--key",
    "a",
    "--from",
    "3",
    "--to",
    "3",
  ])
  assert.equal(retry.code, 0, retry.err)
  assert.deepEqual(JSON.parse(retry.out), { retried: 0 })
  assert.match(retry.err, /^admin: nothing changed: no dead task in demo\.item\/a v3\.\.v3;/)
  const state = await sql<{ state: string }>`
    select state from keyway.inbox where grp = 'g' and key = 'a' and ver = 3`.execute(t.db)
  assert.equal(state.rows[0]!.state, "pending")
})

test("a skip of every key of a topic is asked for with --all-keys, not by leaving --key out", async () => {
  await insertDeadTask("sk", "x")
  const skip = (...more: string[]) =>
    run(["skip", "--group", "sk", "--topic", "demo.item", ...more])
  const state = async () =>
    (
      await sql<{ state: string }>`
        select state from keyway.inbox where grp = 'sk' and key = 'x' and ver = 1`.execute(t.db)
    ).rows[0]!.state
  const without = await skip()
  assert.equal(without.code, 2)
  assert.match(without.err, /skip needs --key, or --all-keys for every key of the topic/)
  assert.equal((await skip("--key", "x", "--all-keys")).code, 2)
  assert.equal(await state(), "dead", "refused: nothing skipped")
  const all = await skip("--all-keys")
  assert.equal(all.code, 0, all.err)
  assert.deepEqual(JSON.parse(all.out), { skipped: 1 })
  assert.equal(await state(), "skipped")
  // The tests below list the database's groups.
  await sql`delete from keyway.inbox where grp = 'sk'`.execute(t.db)
  await sql`delete from keyway.consumer_key where grp = 'sk'`.execute(t.db)
})

test("a redrive of every key of a topic is asked for with --all-keys, not by leaving --key out", async () => {
  const redrive = (...more: string[]) =>
    run(["redrive", "--group", "g", "--topic", "demo.item", ...more])
  const without = await redrive()
  assert.equal(without.code, 2)
  assert.match(without.err, /redrive needs --key, or --all-keys for every key of the topic/)
  const both = await redrive("--key", "a", "--all-keys")
  assert.equal(both.code, 2)
  const states = async () =>
    (
      await sql<{ state: string }>`
        select state from keyway.inbox where grp = 'g' and key = 'b' and ver = 1`.execute(t.db)
    ).rows[0]!.state
  assert.equal(await states(), "done", "refused: nothing redriven")
  const all = await redrive("--all-keys")
  assert.equal(all.code, 0, all.err)
  assert.ok(JSON.parse(all.out).redriven > 0)
  assert.equal(await states(), "pending")
})

// Bounded: without the lock timeout the command waits for the holder, which waits for it.
test("a key held by another session for longer than the lock timeout fails the action, saying so", {
  timeout: 30_000,
}, async () => {
  // A group of its own, deleted at the end: group g's dead list is asserted whole elsewhere.
  await insertDeadTask("lk", "held")
  const holder = new pg.Client({ connectionString: t.url })
  await holder.connect()
  try {
    await holder.query("begin")
    await holder.query(
      "select 1 from keyway.consumer_key where grp = 'lk' and key = 'held' for update",
    )
    const retry = await run(["retry", "--group", "lk", "--topic", "demo.item", "--key", "held"])
    assert.equal(retry.code, 1)
    assert.match(
      retry.err,
      /a key or row it must lock stayed held by another session for 5 s; nothing changed: try again/,
    )
  } finally {
    await holder.end()
  }
  const state = await sql<{ state: string }>`
    select state from keyway.inbox where grp = 'lk' and key = 'held'`.execute(t.db)
  assert.equal(state.rows[0]!.state, "dead")
  // Gone again: the database's groups are listed whole elsewhere.
  await sql`delete from keyway.inbox where grp = 'lk'`.execute(t.db)
  await sql`delete from keyway.consumer_key where grp = 'lk'`.execute(t.db)
})

test("bad input gets a clear error and exit code 2", async () => {
  const noGroup = await run(["dead"])
  assert.equal(noGroup.code, 2)
  assert.match(noGroup.err, /--group is required/)
  const range = await run([
    "retry",
    "--group",
    "g",
    "--topic",
    "demo.item",
    "--from",
    "x",
    "--key",
    "a",
  ])
  assert.equal(range.code, 2)
  assert.match(range.err, /--from must be a version/)
  const unknown = await run(["explode", "--group", "g"])
  assert.equal(unknown.code, 2)
  assert.match(unknown.err, /unknown command "explode"/)
  const option = await run(["summary", "--group", "g"], `${t.url}?connect_timeout=10s`)
  assert.equal(option.code, 2)
  assert.match(option.err, /^admin: DATABASE_URL's connect_timeout/)
  assert.doesNotMatch(option.err, /\bat \//, "no stack")
})

test("dead lists up to --limit tasks, and says on stderr when there may be more", async () => {
  await sql`insert into keyway.consumer_key (grp, topic, key, done_ver) values ('g', 'demo.item', 'dl', 2)`.execute(
    t.db,
  )
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state, attempts)
    values ('g', 'demo.item', 'dl', 1, 'dl:1', 'demo.item.changed.v1', '{"n":1}', now(), 'dead', 3),
           ('g', 'demo.item', 'dl', 2, 'dl:2', 'demo.item.changed.v1', '{"n":2}', now(), 'dead', 3)
  `.execute(t.db)
  const all = JSON.parse((await run(["dead", "--group", "g"])).out)
  assert.ok(all.length >= 2)
  const first = await run(["dead", "--group", "g", "--limit", "1"])
  assert.equal(first.code, 0, first.err)
  assert.deepEqual(JSON.parse(first.out), all.slice(0, 1))
  assert.match(first.err, /the first 1 dead tasks; --limit for more/)
  // A page exactly full is the whole list: no note.
  const whole = await run(["dead", "--group", "g", "--limit", String(all.length)])
  assert.equal(JSON.parse(whole.out).length, all.length)
  assert.doesNotMatch(whole.err, /--limit for more/)
  const bad = await run(["dead", "--group", "g", "--limit", "0"])
  assert.equal(bad.code, 2)
  assert.match(bad.err, /--limit must be a whole number/)
  // The tests below count dead tasks of their own.
  await sql`delete from keyway.inbox where grp = 'g' and key = 'dl'`.execute(t.db)
  await sql`delete from keyway.consumer_key where grp = 'g' and key = 'dl'`.execute(t.db)
})

test("a DATABASE_URL pg would misread is refused with exit 2 before connecting, its password unrepeated", async () => {
  for (const [raw, said] of [
    // pg took a bare name for a host: "getaddrinfo ENOTFOUND base".
    ["keyway_cloud", /DATABASE_URL must be a URL like postgres:/],
    ["mysql://u:secret@127.0.0.1/db", /DATABASE_URL must be a URL like postgres:/],
    ["postgres://u:secret%E9@127.0.0.1/db", /DATABASE_URL's password holds a %/],
    ["postgres://postgres@127.0.0.1:5432", /DATABASE_URL names no database/],
  ] as const) {
    const r = await run(["summary", "--group", "g"], raw)
    assert.equal(r.code, 2, `${raw}: ${r.err}`)
    assert.match(r.err, said, raw)
    assert.doesNotMatch(r.err, /secret/)
  }
})

test("a database that is not the group's gets a one-line error naming DATABASE_URL, not a stack", async () => {
  const missing = await run(["summary", "--group", "g"], `${t.url}_no_such_database`)
  assert.equal(missing.code, 1)
  assert.match(
    missing.err,
    /^admin: database ".*_no_such_database" does not exist \(DATABASE_URL must name/,
  )
  assert.equal(missing.err.trim().split("\n").length, 1, missing.err)
  assert.doesNotMatch(missing.err, /\bat \//)
})

test("a retry that would rewind a key over versions retention deleted is refused", async () => {
  // Key "p" (policy park): v2 dead and parked, v3 pruned by retention, v4 and v5 done.
  await sql`insert into keyway.consumer_key (grp, topic, key, done_ver) values ('g', 'demo.item', 'p', 5)`.execute(
    t.db,
  )
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state, attempts)
    values ('g', 'demo.item', 'p', 2, 'p:2', 'demo.item.changed.v1', '{"n":2}', now(), 'dead', 3),
           ('g', 'demo.item', 'p', 4, 'p:4', 'demo.item.changed.v1', '{"n":4}', now(), 'done', 1),
           ('g', 'demo.item', 'p', 5, 'p:5', 'demo.item.changed.v1', '{"n":5}', now(), 'done', 1)
  `.execute(t.db)
  const refused = await run(["retry", "--group", "g", "--topic", "demo.item", "--key", "p"])
  assert.equal(refused.code, 1)
  assert.match(
    refused.err,
    /refused: .*demo\.item\/p \(v2\.\.v5: retention already deleted finished versions\)\. Skip such a version/,
  )
  const key = await sql<{ done_ver: number }>`
    select done_ver from keyway.consumer_key where grp = 'g' and key = 'p'
  `.execute(t.db)
  assert.equal(key.rows[0]!.done_ver, 5, "the key was not rewound")
  const dead = JSON.parse((await run(["dead", "--group", "g", "--topic", "demo.item"])).out)
  assert.deepEqual(
    dead.map((d: { key: string }) => d.key),
    ["p"],
    "the dead task stays listed",
  )
})

test("what the CLI would otherwise misread or ignore is refused with exit code 2, and changes nothing", async () => {
  const before = await sql<{ key: string; ver: number; state: string }>`
    select key, ver, state from keyway.inbox where grp = 'g' order by key, ver`.execute(t.db)
  const cases: [string[], RegExp][] = [
    // A version as a positional: only the command was read, and every task of the key skipped.
    [["skip", "--group", "g", "--topic", "demo.item", "--key", "a", "5"], /unexpected "5"/],
    [["dead", "--group", "g", "--topc", "demo.item"], /Unknown option '--topc'/],
    // The last of a repeated flag was taken: key "b" retried alone.
    [
      ["retry", "--group", "g", "--topic", "demo.item", "--key", "a", "--key", "b"],
      /--key given twice/,
    ],
    [["dead", "--group", "g", "--key", "a"], /dead does not take --key/],
    [["summary", "--group", "g", "--topic", "demo.item"], /summary does not take --topic/],
    [
      ["retry", "--group", "g", "--topic", "demo.item", "--key", "a", "--from", "9", "--to", "3"],
      /--from 9 is above --to 3/,
    ],
    [
      ["retry", "--group", "g", "--topic", "demo.item", "--key", "a", "--from", "0x10"],
      /--from must be a version/,
    ],
    [
      ["retry", "--group", "g", "--topic", "demo.item", "--key", "a", "--to", "9007199254740993"],
      /--to must be a version/,
    ],
  ]
  for (const [args, message] of cases) {
    const r = await run(args)
    assert.equal(r.code, 2, args.join(" "))
    assert.match(r.err, message, args.join(" "))
    assert.doesNotMatch(r.err, /\bat \//, "no stack")
  }
  const after = await sql<{ key: string; ver: number; state: string }>`
    select key, ver, state from keyway.inbox where grp = 'g' order by key, ver`.execute(t.db)
  assert.deepEqual(after.rows, before.rows)
})

test("a group, topic or key never seen is refused by name, not answered with nothing", async () => {
  const before = await sql<{ key: string; ver: number; state: string }>`
    select key, ver, state from keyway.inbox where grp = 'g' order by key, ver`.execute(t.db)
  const cases: [string[], RegExp][] = [
    [
      ["dead", "--group", "gg"],
      /^admin: group "gg" has stored no event in this database \(groups here: "g"\)$/m,
    ],
    // All zeros for a mistyped group would read as "nothing wrong".
    [["summary", "--group", "gg"], /^admin: group "gg" has stored no event in this database/m],
    [
      ["retry", "--group", "g", "--topic", "demo.itme"],
      /^admin: group "g" has no key in topic "demo\.itme" \(its topics: "demo\.item"\)$/m,
    ],
    [["gaps", "--group", "g", "--topic", "demo.itme"], /no key in topic "demo\.itme"/],
    [
      ["skip", "--group", "g", "--topic", "demo.item", "--key", "A", "--from", "1", "--to", "1"],
      /^admin: group "g" has no key "A" in topic "demo\.item"$/m,
    ],
    [["redrive", "--group", "g", "--topic", "demo.item", "--key", "A"], /has no key "A"/],
  ]
  for (const [args, message] of cases) {
    const r = await run(args)
    assert.equal(r.code, 1, args.join(" "))
    assert.match(r.err, message, args.join(" "))
    assert.equal(r.out, "", "no answer printed")
  }
  const after = await sql<{ key: string; ver: number; state: string }>`
    select key, ver, state from keyway.inbox where grp = 'g' order by key, ver`.execute(t.db)
  assert.deepEqual(after.rows, before.rows)
})

test("rejects lists the messages kept instead of run, newest first, whatever their bytes", async () => {
  await sql`
    insert into keyway.inbox_reject (grp, stream_seq, subject, reason, data) values
      ('g', 40, 's.demo.item', 'not JSON', convert_to('this is not json', 'UTF8')),
      ('g', 41, 's.demo.item', 'v2 of demo.item/a is already held by another event',
       convert_to('{"id":"other:2"}', 'UTF8')),
      ('g', 42, 's.demo.item', 'not JSON', '\\xff00fe'::bytea),
      ('only-rejects', 7, 's.x', 'not JSON', convert_to('?', 'UTF8'))
  `.execute(t.db)
  const all = await run(["rejects", "--group", "g"])
  assert.equal(all.code, 0, all.err)
  const rows = JSON.parse(all.out) as { streamSeq: number; reason: string; data: string }[]
  assert.deepEqual(
    rows.map((r) => Number(r.streamSeq)),
    [42, 41, 40],
  )
  assert.equal(rows[0]!.data, "\ufffd\u0000\ufffd", "bytes that are not UTF-8 are shown, not fatal")
  assert.equal(rows[1]!.data, '{"id":"other:2"}')
  assert.match(rows[1]!.reason, /already held by another event/)
  const one = JSON.parse((await run(["rejects", "--group", "g", "--limit", "1"])).out)
  assert.deepEqual(
    one.map((r: { streamSeq: number }) => Number(r.streamSeq)),
    [42],
  )
  // A group whose every message was rejected has no key, and is still a group.
  const only = await run(["rejects", "--group", "only-rejects"])
  assert.equal(only.code, 0, only.err)
  assert.equal(JSON.parse(only.out).length, 1)
  const unknown = await run(["rejects", "--group", "nothere"])
  assert.equal(unknown.code, 1)
  assert.match(unknown.err, /group "nothere" has stored no event/)
  // A full page says there may be more, on stderr: stdout stays the JSON.
  const page = await run(["rejects", "--group", "g", "--limit", "2"])
  assert.equal(JSON.parse(page.out).length, 2)
  assert.match(page.err, /the newest 2 rejects; --limit for more/)
  assert.doesNotMatch(all.err, /--limit for more/, "3 of the default 100: the whole list")
  const full = await run(["rejects", "--group", "g", "--limit", "3"])
  assert.equal(JSON.parse(full.out).length, 3)
  assert.doesNotMatch(full.err, /--limit for more/, "3 of 3: the whole list")
  const badLimit = await run(["rejects", "--group", "g", "--limit", "0"])
  assert.equal(badLimit.code, 2)
  assert.match(badLimit.err, /--limit must be a whole number/)
})

test("dismiss forgets the rejects read, a range of ids, and only the group's own", async () => {
  await sql`
    insert into keyway.inbox_reject (grp, stream_seq, subject, reason, data) values
      ('dismissing', 1, 's.x', 'not JSON', convert_to('a', 'UTF8')),
      ('dismissing', 2, 's.x', 'not JSON', convert_to('b', 'UTF8')),
      ('dismissing', 3, 's.x', 'not JSON', convert_to('c', 'UTF8')),
      ('other', 9, 's.x', 'not JSON', convert_to('z', 'UTF8'))
  `.execute(t.db)
  // The two newest read; the oldest was never listed.
  const read = JSON.parse((await run(["rejects", "--group", "dismissing", "--limit", "2"])).out)
  const ids = read.map((r: { id: number }) => r.id) as number[]
  const done = await run([
    "dismiss",
    "--group",
    "dismissing",
    "--from",
    String(Math.min(...ids)),
    "--through",
    String(Math.max(...ids)),
  ])
  assert.equal(done.code, 0, done.err)
  assert.deepEqual(JSON.parse(done.out), { dismissed: 2 })
  const left = JSON.parse((await run(["rejects", "--group", "dismissing"])).out)
  assert.deepEqual(
    left.map((r: { streamSeq: number }) => r.streamSeq),
    [1],
    "the unread one stays",
  )
  const others = await sql<{ n: number }>`
    select count(*)::int as n from keyway.inbox_reject where grp = 'other'`.execute(t.db)
  assert.equal(others.rows[0]!.n, 1, "another group's rejects stay")
  // Again: nothing left in the range is an answer, not an error.
  const range = ["--from", String(Math.min(...ids)), "--through", String(Math.max(...ids))]
  const again = await run(["dismiss", "--group", "dismissing", ...range])
  assert.deepEqual(JSON.parse(again.out), { dismissed: 0 })
  const unknown = await run(["dismiss", "--group", "nothere", ...range])
  assert.equal(unknown.code, 1)
  assert.match(unknown.err, /group "nothere" has stored no event/)
  const missing = await run(["dismiss", "--group", "dismissing", "--through", "5"])
  assert.equal(missing.code, 2)
  assert.match(missing.err, /dismiss needs --from and --through/)
  const bad = await run(["dismiss", "--group", "dismissing", "--from", "x", "--through", "5"])
  assert.equal(bad.code, 2)
  assert.match(bad.err, /--from must be a reject's id/)
  const reversed = await run(["dismiss", "--group", "dismissing", "--from", "5", "--through", "4"])
  assert.equal(reversed.code, 2)
  assert.match(reversed.err, /--from 5 is above --through 4/)
})

test("skip: an open range closes the gap at its start; versions that ran or have not arrived are not skipped", async () => {
  // Key "c": v1 done, v2 missing, v3 and v4 pending. Key "d": at v5, with v1..v3 deleted by
  // retention, v4 and v5 done, v6 pending.
  await sql`
    insert into keyway.consumer_key (grp, topic, key, done_ver, gap_since) values
      ('g', 'demo.item', 'c', 1, now()), ('g', 'demo.item', 'd', 5, null),
      ('g', 'demo.item', 'z', 5, null)
  `.execute(t.db)
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state, attempts)
    values ('g', 'demo.item', 'c', 1, 'c:1', 'demo.item.changed.v1', '{"n":1}', now(), 'done', 1),
           ('g', 'demo.item', 'c', 3, 'c:3', 'demo.item.changed.v1', '{"n":3}', now(), 'pending', 0),
           ('g', 'demo.item', 'c', 4, 'c:4', 'demo.item.changed.v1', '{"n":4}', now(), 'pending', 0),
           ('g', 'demo.item', 'd', 4, 'd:4', 'demo.item.changed.v1', '{"n":4}', now(), 'done', 1),
           ('g', 'demo.item', 'd', 5, 'd:5', 'demo.item.changed.v1', '{"n":5}', now(), 'done', 1),
           ('g', 'demo.item', 'd', 6, 'd:6', 'demo.item.changed.v1', '{"n":6}', now(), 'pending', 0)
  `.execute(t.db)
  const skip = (key: string, ...range: string[]) =>
    run(["skip", "--group", "g", "--topic", "demo.item", "--key", key, ...range])
  // Past v4, the highest "c" has received: a placeholder there would drop v5 when it comes.
  const ahead = await skip("c", "--from", "2", "--to", "9")
  assert.equal(ahead.code, 1)
  assert.match(
    ahead.err,
    /refused: demo\.item\/c has received versions up to v4; v5\.\.v9 have not arrived/,
  )
  const open = await skip("c", "--from", "2")
  assert.equal(open.code, 0, open.err)
  assert.deepEqual(JSON.parse(open.out), { skipped: 3 }, "v2 (missing), v3 and v4")
  // "z" stands at v5 with every row taken by retention: it has received v5, and ran it.
  const pruned = await skip("z", "--from", "1", "--to", "3")
  assert.equal(pruned.code, 0, pruned.err)
  assert.deepEqual(JSON.parse(pruned.out), { skipped: 0 })
  const ran = await skip("d", "--from", "1", "--to", "6")
  assert.equal(ran.code, 0, ran.err)
  assert.deepEqual(JSON.parse(ran.out), { skipped: 1 }, "v6 only: v1..v5 ran")
  const rows = await sql<{ key: string; ver: number; state: string }>`
    select key, ver, state from keyway.inbox where grp = 'g' and key in ('c', 'd') order by key, ver`.execute(
    t.db,
  )
  assert.deepEqual(
    rows.rows.map((r) => `${r.key}${r.ver}:${r.state}`),
    ["c1:done", "c2:skipped", "c3:skipped", "c4:skipped", "d4:done", "d5:done", "d6:skipped"],
  )
})

test("just admin passes each argument through whole: a key with a space, or one like a number", async () => {
  // "007" and "1e3" are keys, not numbers: rust-just's npm wrapper parsed them with yargs,
  // which made them 7 and 1000, so a retry went to another key (patches/rust-just*.patch).
  for (const key of ["e f", "007", "1e3"]) {
    await sql`insert into keyway.consumer_key (grp, topic, key, done_ver) values ('g', 'demo.item', ${key}, 0)`.execute(
      t.db,
    )
    await sql`
      insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state, attempts)
      values ('g', 'demo.item', ${key}, 1, ${`${key}:1`}, 'demo.item.changed.v1', '{"n":1}', now(), 'dead', 5)
    `.execute(t.db)
  }
  const just = fileURLToPath(new URL("../../../node_modules/.bin/just", import.meta.url))
  for (const key of ["e f", "007", "1e3"]) {
    const r = await run(["retry", "--group", "g", "--topic", "demo.item", "--key", key], t.url, [
      just,
      "admin",
    ])
    assert.equal(r.code, 0, r.err)
    assert.deepEqual(JSON.parse(r.out), { retried: 1 }, `key ${key}`)
  }
})

test("a redrive of a range whose finished versions retention deleted is refused, not run in part", async () => {
  // Key "r" stands at v6; v1..v4 ran and were deleted by retention, v5 and v6 are kept.
  await sql`insert into keyway.consumer_key (grp, topic, key, done_ver) values ('g', 'demo.item', 'r', 6)`.execute(
    t.db,
  )
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at, state, attempts)
    values ('g', 'demo.item', 'r', 5, 'r:5', 'demo.item.changed.v1', '{"n":5}', now(), 'done', 1),
           ('g', 'demo.item', 'r', 6, 'r:6', 'demo.item.changed.v1', '{"n":6}', now(), 'done', 1)
  `.execute(t.db)
  const redrive = (...range: string[]) =>
    run(["redrive", "--group", "g", "--topic", "demo.item", "--key", "r", ...range])
  for (const range of [
    ["--from", "1", "--to", "6"],
    ["--from", "1", "--to", "4"],
    // Open below: from where the key started, v1.
    ["--to", "4"],
  ]) {
    const refused = await redrive(...range)
    assert.equal(refused.code, 1, range.join(" "))
    assert.match(
      refused.err,
      /refused: retention already deleted 4 of the finished versions v1\.\.v/,
    )
  }
  const states = async () =>
    (
      await sql<{ state: string }>`
        select state from keyway.inbox where grp = 'g' and key = 'r' order by ver`.execute(t.db)
    ).rows.map((r) => r.state)
  assert.deepEqual(await states(), ["done", "done"], "nothing redriven")
  const held = await redrive("--from", "5")
  assert.equal(held.code, 0, held.err)
  assert.deepEqual(JSON.parse(held.out), { redriven: 2 })
  assert.deepEqual(await states(), ["pending", "pending"])
})
