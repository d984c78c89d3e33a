import { sql } from "kysely"
import pg from "pg"
import { createDb, runPipelinedTransaction } from "./src/index.ts"
const url = "postgres://postgres@127.0.0.1:5432/zz_review_db_pc"
const admin = new pg.Client(url); await admin.connect()
const db = createDb({ connectionString: url, max: 1 })
const r = async (label: string, f: () => Promise<unknown>) => { try { const v = await f(); console.log(label, "OK", JSON.stringify(v, (_k, x) => typeof x === "bigint" ? String(x) : x)) } catch (e: any) { console.log(label, "ERR", e.code, e.message) } }
const nps = async () => (await sql<{ n: number }>`select count(*)::int n from pg_prepared_statements`.execute(db)).rows[0].n

// 1. result type change
await admin.query(`create function f(a int) returns table(x int) language sql as 'select a'`)
for (let i = 0; i < 4; i++) await r("f before", () => sql`select * from f(${1})`.execute(db).then((x) => x.rows))
await admin.query(`drop function f(int); create function f(a int) returns table(x int, y text) language sql as $$select a, 'y'$$`)
for (let i = 0; i < 5; i++) await r("f after rettype", () => sql`select * from f(${1})`.execute(db).then((x) => x.rows))
console.log("prepared stmts on conn:", await nps())

// 2. argument type change: text -> uuid
await admin.query(`create function g(a text) returns int language sql as 'select 1'`)
for (let i = 0; i < 4; i++) await r("g before", () => sql`select g(${"00000000-0000-0000-0000-000000000000"}) v`.execute(db).then((x) => x.rows))
await admin.query(`drop function g(text); create function g(a uuid) returns int language sql as 'select 2'`)
for (let i = 0; i < 4; i++) await r("g after argtype", () => sql`select g(${"00000000-0000-0000-0000-000000000000"}) v`.execute(db).then((x) => x.rows))

// 3. column type change for insert
await admin.query(`create table t (a text)`)
for (let i = 0; i < 4; i++) await r("ins before", () => sql`insert into t (a) values (${'{"k":1}'})`.execute(db).then((x) => x.numAffectedRows))
await admin.query(`alter table t alter column a type jsonb using a::jsonb`)
for (let i = 0; i < 4; i++) await r("ins after coltype", () => sql`insert into t (a) values (${'{"k":1}'})`.execute(db).then((x) => x.numAffectedRows))
// unnamed on a fresh pool works:
const db2 = createDb({ connectionString: url, max: 1 })
await r("ins fresh pool", () => sql`insert into t (a) values (${'{"k":1}'})`.execute(db2).then((x) => x.numAffectedRows))
await db2.destroy()

// 4. pipelined tx: many copies of same stmt at once, with mid failure
await admin.query(`create table u (id int primary key)`)
await r("pipe dup names", () => runPipelinedTransaction(db, (trx) => Promise.all(Array.from({ length: 30 }, (_, i) => sql`insert into u values (${i + 100})`.execute(trx)))))
const res: string[] = []
await r("pipe mid failure", () => runPipelinedTransaction(db, async (trx) => {
  const ps = [1, 2, 3, 1, 4, 5].map((i) => sql`insert into u values (${i})`.execute(trx).then(() => res.push(`${i}:ok`), (e) => res.push(`${i}:${e.code}`)))
  await Promise.all(ps)
}))
console.log(res.join(" "))
await r("after mid failure", () => sql`select count(*)::int n, (select count(*)::int from u where id < 100) small from u`.execute(db).then((x) => x.rows))
await r("txstatus", () => sql`select now() = statement_timestamp() as not_in_tx`.execute(db).then((x) => x.rows))
for (let i = 0; i < 3; i++) await r("named reuse", () => sql`insert into u values (${i + 200})`.execute(db).then((x) => x.numAffectedRows))

// 5. first named Parse fails in aborted tx, then later reuse
await r("aborted-first-parse", () => runPipelinedTransaction(db, async (trx) => {
  await Promise.allSettled([sql`select 1/0`.execute(trx), ...[0,1,2,3].map(() => sql`select ${1}::int + 7 v`.execute(trx))])
}))
for (let i = 0; i < 2; i++) await r("after", () => sql`select ${1}::int + 7 v`.execute(db).then((x) => x.rows))
console.log("prepared stmts:", await nps())
await db.destroy(); await admin.end()
