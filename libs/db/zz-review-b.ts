import { sql } from "kysely"
import pg from "pg"
import { createDb, runPipelinedTransaction } from "./src/index.ts"
const url = "postgres://postgres@127.0.0.1:5432/zz_review_db_pc"
const admin = new pg.Client(url); await admin.connect()
const db = createDb({ connectionString: url, max: 1 })
const r = async (label: string, f: () => Promise<unknown>) => { try { const v = await f(); console.log(label, "OK", JSON.stringify(v)) } catch (e: any) { console.log(label, "ERR", e.code, e.message) } }
const pid = (await sql<{ p: number }>`select pg_backend_pid() p`.execute(db)).rows[0].p
const res: string[] = []
await r("killed mid pipeline", () => runPipelinedTransaction(db, async (trx) => {
  const ps = [sql`select pg_sleep(0.3)`.execute(trx), sql`select ${1}::int v`.execute(trx), sql`select ${2}::int v`.execute(trx)]
  setTimeout(() => admin.query(`select pg_terminate_backend(${pid})`), 100)
  await Promise.all(ps.map((p, i) => p.then(() => res.push(`${i}:ok`), (e) => res.push(`${i}:${e.code ?? e.message}`))))
}))
console.log(res.join(" "))
await r("next on pool", () => sql`select pg_backend_pid() <> ${pid} as fresh`.execute(db).then((x) => x.rows))
// Kysely transaction() with kill
const pid2 = (await sql<{ p: number }>`select pg_backend_pid() p`.execute(db)).rows[0].p
await r("kysely trx killed", () => db.transaction().execute(async (trx) => {
  setTimeout(() => admin.query(`select pg_terminate_backend(${pid2})`), 100)
  await sql`select pg_sleep(0.3)`.execute(trx)
}))
await r("next on pool 2", () => sql`select pg_backend_pid() <> ${pid2} as fresh`.execute(db).then((x) => x.rows))
// 0A000 inside kysely transaction with pool of 3 busy connections
const db3 = createDb({ connectionString: url, max: 3 })
await admin.query(`drop function if exists h(int); create function h(a int) returns table(x int) language sql as 'select a'`)
const burst = () => Promise.allSettled(Array.from({ length: 9 }, () => db3.transaction().execute((trx) => sql`select * from h(${1})`.execute(trx))))
for (let i = 0; i < 3; i++) await burst()
await admin.query(`drop function h(int); create function h(a int) returns table(x int, y int) language sql as 'select a, a'`)
let fails = 0
for (let i = 0; i < 4; i++) fails += (await burst()).filter((s) => s.status === "rejected").length
console.log("0A000 failures across 36 tx on 3 conns:", fails)
await db3.destroy(); await db.destroy(); await admin.end()
