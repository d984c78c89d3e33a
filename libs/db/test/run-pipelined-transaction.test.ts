import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import {
  createTcpProxy,
  createTestDatabase,
  gate,
  type TcpProxy,
  type TestDatabase,
  waitFor,
} from "@keyway/testkit"
import { CamelCasePlugin, Kysely, PostgresDialect, sql, type Transaction } from "kysely"
import pg from "pg"
import { createDb, runPipelinedTransaction } from "../src/index.ts"

// The pipelined transactions' pool reaches Postgres through a proxy, which counts what leaves
// for the server; the checks go straight to it, through t.db.
let t: TestDatabase
let proxy: TcpProxy
let db: Kysely<any>

before(async () => {
  t = await createTestDatabase({ prefix: "keyway_pipe" })
  const url = new URL(t.url)
  proxy = await createTcpProxy({ host: url.hostname, port: Number(url.port) })
  url.hostname = proxy.host
  url.port = String(proxy.port)
  db = createDb({ connectionString: url.toString(), max: 2 })
  await sql`create table item (id int primary key, n int not null)`.execute(t.db)
})

after(async () => {
  await db.destroy()
  await proxy.close()
  await t.drop()
})

const items = async () =>
  (await sql<{ id: number; n: number }>`select id, n from item order by id`.execute(t.db)).rows

test("statements issued together leave before the first is answered, and commit together", async () => {
  await sql`insert into item values (1, 1)`.execute(t.db)
  // Another session holds item 1, so the first statement waits at the server.
  const unlock = gate()
  const locked = gate()
  const holder = t.db.transaction().execute(async (trx) => {
    await sql`select 1 from item where id = 1 for update`.execute(trx)
    locked.open()
    await unlock.opened
  })
  await locked.opened
  await runPipelinedTransaction(db, async (trx) => {
    const first = trx.updateTable("item").set({ n: 2 }).where("id", "=", 1).execute()
    // Released whatever happens: a failed check must not leave the update waiting for good.
    const checks = async () => {
      await waitFor(
        async () => {
          const { rows } = await sql<{ n: number }>`
          select count(*)::int as n from pg_stat_activity
           where datname = current_database() and wait_event_type = 'Lock'`.execute(t.db)
          return rows[0]!.n === 1
        },
        { timeoutMs: 5000, message: "the update waiting on the lock" },
      )
      const sent = proxy.bytesToTarget
      const second = trx.insertInto("item").values({ id: 2, n: 20 }).execute()
      // Kysely's own transaction would hold the insert until the update has answered, and that
      // cannot happen before the lock is released below.
      await waitFor(() => proxy.bytesToTarget > sent, {
        timeoutMs: 5000,
        message: "the insert on its way while the update waits",
      })
      return { second }
    }
    const { second } = await checks().finally(unlock.open)
    await Promise.all([first, second])
  })
  await holder
  assert.deepEqual(await items(), [
    { id: 1, n: 2 },
    { id: 2, n: 20 },
  ])
})

test("a failed statement rolls the whole transaction back and fails those sent after it", async () => {
  const before = await items()
  const settled = await runPipelinedTransaction(db, async (trx) => {
    const results = await Promise.allSettled([
      trx.insertInto("item").values({ id: 3, n: 30 }).execute(),
      trx.insertInto("item").values({ id: 1, n: 10 }).execute(), // id 1 exists
      trx.insertInto("item").values({ id: 4, n: 40 }).execute(),
    ])
    const failed = results.find((r) => r.status === "rejected")
    if (failed) throw Object.assign(new Error("a statement failed"), { results })
    return results
  }).catch((err: Error & { results?: PromiseSettledResult<unknown>[] }) => err.results)
  assert.ok(settled, "the transaction failed")
  assert.deepEqual(
    settled.map((r) => (r.status === "rejected" ? (r.reason as { code?: string }).code : "ok")),
    ["ok", "23505", "25P02"],
    "unique violation, then 'current transaction is aborted'",
  )
  assert.deepEqual(await items(), before, "nothing of it committed")
  // The connection went back to the pool in a usable state.
  await runPipelinedTransaction(db, (trx) =>
    trx.insertInto("item").values({ id: 5, n: 50 }).execute(),
  )
  assert.deepEqual((await items()).at(-1), { id: 5, n: 50 })
})

test("work that throws after its statements succeeded commits nothing", async () => {
  const before = await items()
  await assert.rejects(
    runPipelinedTransaction(db, async (trx) => {
      await Promise.all([
        trx.insertInto("item").values({ id: 8, n: 80 }).execute(),
        trx.insertInto("item").values({ id: 9, n: 90 }).execute(),
      ])
      throw new Error("changed its mind")
    }),
    /changed its mind/,
  )
  assert.deepEqual(await items(), before)
})

test("a failed statement that the work swallowed is thrown, and nothing commits", async () => {
  // Postgres answers COMMIT in an aborted transaction with a rollback, not an error: without
  // the check the caller would be told its rows were written.
  const before = await items()
  await assert.rejects(
    runPipelinedTransaction(db, async (trx) => {
      await Promise.allSettled([
        trx.insertInto("item").values({ id: 10, n: 100 }).execute(),
        sql`select 1 / 0`.execute(trx),
      ])
      return "done"
    }),
    { code: "22012" }, // division_by_zero: the first failure, not the knock-on ones
  )
  assert.deepEqual(await items(), before)
})

test("the first failure is thrown even when the work rejects with a knock-on one", async () => {
  const before = await items()
  await assert.rejects(
    runPipelinedTransaction(db, (trx) => {
      // Sent first and failing first, but passed on a few turns late, as by a helper with
      // awaits of its own: Promise.all rejects with the insert's "transaction is aborted".
      const late = async () => {
        try {
          return await trx.insertInto("item").values({ id: 1, n: 11 }).execute() // id 1 exists
        } finally {
          for (let i = 0; i < 5; i++) await null
        }
      }
      return Promise.all([late(), trx.insertInto("item").values({ id: 13, n: 130 }).execute()])
    }),
    { code: "23505" },
  )
  assert.deepEqual(await items(), before)
})

test("the first failure sent is thrown, whichever failure settles first", async () => {
  // One connection, on which the insert's text has run often enough to be a named statement.
  // A named statement's failure reaches the transaction a turn later than an unnamed one's
  // (the client's own catch is in between), and Postgres' answers to a pipeline arrive in
  // one read: the knock-on 25P02 of the `select 1` sent after it settled first.
  const one = createDb({ connectionString: t.url, max: 1 })
  try {
    for (let i = 0; i < 5; i++) {
      await one
        .insertInto("item")
        .values({ id: -100 - i, n: 1 })
        .execute()
    }
    const before = await items()
    for (let round = 0; round < 20; round++) {
      await assert.rejects(
        runPipelinedTransaction(one, async (trx) => {
          await Promise.allSettled([
            trx.insertInto("item").values({ id: -100, n: 2 }).execute(), // id -100 exists
            sql`select 1`.execute(trx),
          ])
        }),
        { code: "23505" },
        `round ${round}`,
      )
    }
    assert.deepEqual(await items(), before)
  } finally {
    await one.destroy()
  }
})

test("statements still in flight when the work returns are waited for, failures and all", async () => {
  const before = await items()
  const left: Promise<unknown>[] = []
  await assert.rejects(
    runPipelinedTransaction(db, async (trx) => {
      // Issued and not awaited: the work is done as far as it knows.
      left.push(trx.insertInto("item").values({ id: 12, n: 120 }).execute())
      left.push(sql`select 1 / 0`.execute(trx))
      for (const p of left) p.catch(() => {})
    }),
    { code: "22012" },
  )
  assert.deepEqual(await items(), before)
})

test("the transaction refuses statements once it has ended", async () => {
  let kept: Transaction<any> | undefined
  await runPipelinedTransaction(db, async (trx) => {
    kept = trx
    // enqueue() and other code that insists on a transaction accept it.
    assert.equal(trx.isTransaction, true)
    await trx.selectFrom("item").select("id").execute()
  })
  await assert.rejects(
    kept!.insertInto("item").values({ id: 6, n: 60 }).execute(),
    /the transaction has already ended/,
  )
  assert.equal(
    (await items()).find((r) => r.id === 6),
    undefined,
  )
})

test("a connection lost mid-transaction fails with the statement's own error, not the rollback's", async () => {
  const killer = createDb({ connectionString: t.url, max: 1 })
  try {
    await assert.rejects(
      runPipelinedTransaction(db, async (trx) => {
        const { rows } = await sql<{ pid: number }>`select pg_backend_pid() as pid`.execute(trx)
        const sleeping = sql`select pg_sleep(10)`.execute(trx)
        // It fails while the kill below is awaited, before `await sleeping` looks at it.
        sleeping.catch(() => {})
        await waitFor(
          async () =>
            (
              await sql`select 1 from pg_stat_activity
                         where pid = ${rows[0]!.pid} and query like 'select pg_sleep%'`.execute(
                killer,
              )
            ).rows.length === 1,
          { timeoutMs: 5000, message: "the statement runs" },
        )
        await sql`select pg_terminate_backend(${rows[0]!.pid})`.execute(killer)
        await sleeping
      }),
      (err: Error & { code?: string }) => {
        assert.equal(err.code, "57P01", `${err.code} ${err.message}`)
        return true
      },
    )
    // The pool replaced the dead connection.
    assert.deepEqual((await sql<{ n: number }>`select 1 as n`.execute(db)).rows, [{ n: 1 }])
  } finally {
    await killer.destroy()
  }
})

test("a connection the server ended between statements fails the next with the server's reason", async () => {
  const killer = createDb({ connectionString: t.url, max: 1 })
  try {
    await assert.rejects(
      runPipelinedTransaction(db, async (trx) => {
        const { rows } = await sql<{ pid: number }>`select pg_backend_pid() as pid`.execute(trx)
        await sql`select pg_terminate_backend(${rows[0]!.pid})`.execute(killer)
        await waitFor(
          async () =>
            (await sql`select 1 from pg_stat_activity where pid = ${rows[0]!.pid}`.execute(killer))
              .rows.length === 0,
          { timeoutMs: 5000, message: "the backend gone" },
        )
        // The server's FATAL reaches the client as it reads the socket: a turn or two.
        await new Promise((r) => setTimeout(r, 200))
        await sql`select 1`.execute(trx)
      }),
      (err: Error & { code?: string }) => {
        // pg's own words were "not queryable", with no code and no cause.
        assert.equal(err.code, "57P01", `${err.code} ${err.message}`)
        assert.match(err.message, /not queryable: terminating connection due to administrator/)
        return true
      },
    )
  } finally {
    await killer.destroy()
  }
})

test("a Kysely derived from createDb's keeps its plugins and its pipelined transactions", async () => {
  const camel = db.withPlugin(new CamelCasePlugin())
  await sql`create table counted_item (item_id int primary key)`.execute(t.db)
  const rows = await runPipelinedTransaction(camel, async (trx) => {
    await trx.insertInto("countedItem").values({ itemId: 7 }).execute()
    return trx.selectFrom("countedItem").select("itemId").execute()
  })
  assert.deepEqual(rows, [{ itemId: 7 }])
  // Pipelined: the swallowed failure is thrown as itself. Kysely's own transaction would
  // report the knock-on "transaction is aborted" of the check after the work.
  await assert.rejects(
    runPipelinedTransaction(camel.withSchema("public"), async (trx) => {
      await trx.insertInto("countedItem").values({ itemId: 8 }).execute()
      await sql`select 1 / 0`.execute(trx).catch(() => {})
    }),
    { code: "22012" },
  )
  const left = await sql`select item_id from counted_item order by 1`.execute(t.db)
  assert.deepEqual(left.rows, [{ item_id: 7 }])
})

test("any other Kysely gets its own transaction, and a failure its work swallowed still fails it", async () => {
  const other = new Kysely<any>({
    dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: t.url, max: 1 }) }),
  })
  try {
    const before = await items()
    await assert.rejects(
      runPipelinedTransaction(other, async (trx) => {
        await trx.insertInto("item").values({ id: 14, n: 140 }).execute()
        await trx
          .insertInto("item")
          .values({ id: 1, n: 10 }) // id 1 exists
          .execute()
          .catch(() => {})
        return "done"
      }),
      { code: "25P02" },
    )
    assert.deepEqual(await items(), before)
    assert.equal(
      await runPipelinedTransaction(other, async (trx) => {
        await trx.insertInto("item").values({ id: 15, n: 150 }).execute()
        return "done"
      }),
      "done",
    )
    assert.deepEqual((await items()).at(-1), { id: 15, n: 150 })
  } finally {
    await other.destroy()
  }
})

test("a transaction is not a Kysely to start one on", async () => {
  await assert.rejects(
    db.transaction().execute((trx) => runPipelinedTransaction(trx, async () => "nested")),
    /not supported/,
  )
})

test("destroy() ends the pool when only pipelined transactions used it", async () => {
  const applicationName = `keyway_pipe_${process.pid}`
  const own = createDb({ connectionString: t.url, max: 1, applicationName })
  await runPipelinedTransaction(own, (trx) => trx.selectFrom("item").select("id").execute())
  const sessions = async () =>
    (
      await sql<{ n: number }>`
        select count(*)::int as n from pg_stat_activity where application_name = ${applicationName}`.execute(
        t.db,
      )
    ).rows[0]!.n
  assert.equal(await sessions(), 1)
  await own.destroy()
  await waitFor(async () => (await sessions()) === 0, {
    timeoutMs: 5000,
    message: "the pool's session closed by destroy()",
  })
})
