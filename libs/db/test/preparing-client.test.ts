import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { createTcpProxy, createTestDatabase, type TestDatabase } from "@keyway/testkit"
import { type Kysely, sql } from "kysely"
import { createDb, PreparingClient } from "../src/index.ts"

// One connection, so that every query below runs in the session whose prepared statements
// pg_prepared_statements lists.
let t: TestDatabase
let db: Kysely<any>

before(async () => {
  t = await createTestDatabase({ prefix: "keyway_db" })
  db = createDb({ connectionString: t.url, max: 1 })
  await sql`create table item (id int primary key, name text not null)`.execute(db)
  await sql`insert into item values (1, 'one'), (2, 'two'), (3, 'three')`.execute(db)
})

after(async () => {
  await db.destroy()
  await t.drop()
})

async function prepared(): Promise<string[]> {
  const { rows } = await sql<{ statement: string }>`
    select statement from pg_prepared_statements where statement like '%from "item"%'
  `.execute(db)
  return rows.map((r) => r.statement)
}

const byId = (id: number) =>
  db.selectFrom("item").select(["id", "name"]).where("id", "=", id).executeTakeFirst()

test("a parameterised statement is prepared on its third run and gives the same results", async () => {
  assert.deepEqual(await byId(1), { id: 1, name: "one" })
  assert.deepEqual(await byId(2), { id: 2, name: "two" })
  assert.deepEqual(await prepared(), [], "not after two runs")
  assert.deepEqual(await byId(3), { id: 3, name: "three" })
  assert.equal((await prepared()).length, 1, "prepared on the third")
  for (const id of [1, 2, 3, 4]) {
    const row = await byId(id)
    assert.equal(row?.name, [undefined, "one", "two", "three"][id])
  }
  assert.equal((await prepared()).length, 1, "and reused, not prepared again")
})

test("a statement whose result columns change fails once, then is prepared afresh", async () => {
  const all = (id: number) => db.selectFrom("item").selectAll().where("id", "=", id).execute()
  for (let i = 0; i < 3; i++) await all(1)
  await sql`alter table item add column price int not null default 7`.execute(db)
  // Postgres refuses to hand a prepared statement's caller rows of another shape.
  await assert.rejects(all(1), /cached plan must not change result type/)
  for (let i = 0; i < 3; i++) await all(1)
  assert.deepEqual(await all(1), [{ id: 1, name: "one", price: 7 }])
})

test("a statement whose parameter types change, or whose parameter pg cannot send, fails once", async () => {
  await sql`create function describe_it(a text) returns text language sql as $$ select 'text ' || a $$`.execute(
    db,
  )
  const call = (v: unknown) => sql<{ d: string }>`select describe_it(${v}) as d`.execute(db)
  for (let i = 0; i < 3; i++) await call("x")
  // Made again with another argument type, as a migration does: the statement prepared with
  // text for $1 names a function that no longer exists.
  await sql`drop function describe_it(text)`.execute(db)
  await sql`create function describe_it(a int) returns text language sql as $$ select 'int ' || a $$`.execute(
    db,
  )
  await assert.rejects(call(5), /function describe_it\(text\) does not exist/)
  assert.deepEqual((await call(5)).rows, [{ d: "int 5" }])

  const echo = (v: unknown) => sql<{ v: unknown }>`select ${v}::jsonb as v`.execute(db)
  for (let i = 0; i < 3; i++) await echo(JSON.stringify({ a: i }))
  // pg cannot serialise a BigInt: it fails the statement and closes the prepared name.
  await assert.rejects(echo({ a: 1n }), /BigInt/)
  for (let i = 0; i < 3; i++)
    assert.deepEqual((await echo(JSON.stringify({ a: i }))).rows, [{ v: { a: i } }])
})

test("a statement that fails as it runs, always or sometimes, is not prepared again each time", async () => {
  // Its body calls a function that does not exist: 42883 as it runs, whatever its name.
  await sql`create function always_fails(a int) returns int language plpgsql
            as $$ begin return no_such_function(a); end $$`.execute(db)
  for (let i = 0; i < 30; i++) {
    await assert.rejects(sql`select always_fails(${i})`.execute(db), /no_such_function/)
  }
  const { rows } = await sql<{ n: number }>`
    select count(*)::int as n from pg_prepared_statements where statement like '%always_fails%'`.execute(
    db,
  )
  assert.ok(rows[0]!.n <= 2, `${rows[0]!.n} statements prepared for it`)

  // Failing on some inputs only, between successes: still a handful, not one per failure.
  await sql`create function sometimes_fails(a int) returns int language plpgsql
            as $$ begin if a % 4 = 0 then return no_such_function(a); end if; return a; end $$`.execute(
    db,
  )
  let failed = 0
  for (let i = 1; i <= 400; i++) {
    await sql`select sometimes_fails(${i})`.execute(db).catch(() => failed++)
  }
  assert.equal(failed, 100)
  const some = await sql<{ n: number }>`
    select count(*)::int as n from pg_prepared_statements where statement like '%sometimes_fails%'`.execute(
    db,
  )
  assert.ok(some.rows[0]!.n <= 6, `${some.rows[0]!.n} statements prepared for it`)
  // And a new text is still prepared: the connection has names left.
  for (let i = 0; i < 3; i++) await sql`select ${i}::int + 1 as still_named`.execute(db)
  const named = await sql<{ n: number }>`
    select count(*)::int as n from pg_prepared_statements where statement like '%still_named%'`.execute(
    db,
  )
  assert.equal(named.rows[0]!.n, 1)
})

test("in pipeline mode, statements issued while one is in flight leave in one write", async () => {
  const client = new PreparingClient({ connectionString: t.url, pipeline: true })
  await client.connect()
  try {
    // Every flush of the socket's buffer goes through _write (one chunk) or _writev (several).
    const stream = (client as any).connection.stream
    let writes = 0
    for (const method of ["_write", "_writev"]) {
      const original = stream[method]
      stream[method] = function (this: unknown, ...args: unknown[]) {
        writes++
        return original.apply(this, args)
      }
    }
    const { rows } = await client.query("select $1::int as n", [1])
    assert.deepEqual(rows, [{ n: 1 }])
    assert.equal(writes, 1, "a statement on its own leaves at once, in its own write")
    writes = 0
    const results = await Promise.all(
      Array.from({ length: 30 }, (_, i) => client.query("select $1::int as n", [i])),
    )
    assert.deepEqual(
      results.map((r) => r.rows[0].n),
      Array.from({ length: 30 }, (_, i) => i),
    )
    // The first goes out at once; the 29 queued behind it share the next write.
    assert.equal(writes, 2)
  } finally {
    await client.end()
  }
})

test("a connection that drops under a checked-out client fails its statements, not the process", async () => {
  // node:test fails the file on an uncaught exception: pg's 'error' event, unheard, is one.
  const proxy = await createTcpProxy({ host: "127.0.0.1", port: 5432 })
  const url = new URL(t.url)
  url.host = `${proxy.host}:${proxy.port}`
  const proxied = createDb({ connectionString: url.toString(), max: 1 })
  try {
    await assert.rejects(
      proxied.transaction().execute(async (trx) => {
        await sql`select 1`.execute(trx)
        proxy.cut()
        await sql`select pg_sleep(0.2)`.execute(trx)
      }),
    )
    proxy.restore()
    // The broken client left the pool; the next statement gets a fresh connection.
    const { rows } = await sql<{ n: number }>`select 2 as n`.execute(proxied)
    assert.deepEqual(rows, [{ n: 2 }])
  } finally {
    await proxied.destroy()
    await proxy.close()
  }
})

test("createDb's connections have the server probe a silent peer within seconds", async () => {
  // And they keep the options the connection string asks for.
  const withOptions = createDb({
    connectionString: `${t.url}?options=${encodeURIComponent("-c statement_timeout=1234")}`,
    max: 1,
  })
  const { rows } = await sql<{ name: string; setting: string }>`
    select name, setting from pg_settings
     where name in ('tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_keepalives_count',
                    'tcp_user_timeout', 'statement_timeout')
     order by name
  `
    .execute(withOptions)
    .finally(() => withOptions.destroy())
  assert.deepEqual(
    rows.map((r) => [r.name, r.setting]),
    [
      ["statement_timeout", "1234"],
      ["tcp_keepalives_count", "3"],
      ["tcp_keepalives_idle", "10"],
      ["tcp_keepalives_interval", "5"],
      // Probes stop while sent data waits for its ACK; this bounds that wait.
      ["tcp_user_timeout", "25000"],
    ],
  )
})
