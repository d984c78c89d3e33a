import assert from "node:assert/strict"
import { after, before, describe, test } from "node:test"
import { runPipelinedTransaction } from "@keyway/db"
import {
  DEFAULT_MAX_PAYLOAD_BYTES,
  EnqueueError,
  type EnqueueOptions,
  enqueue,
} from "@keyway/outbox"
import { InvalidEventError } from "@keyway/schemas"
import { createTestDatabase, type TestDatabase } from "@keyway/testkit"
import { propagation } from "@opentelemetry/api"
import { Kysely, PostgresDialect, sql } from "kysely"
import pg from "pg"

const item = (key: string, n: number) => ({ type: "demo.item.changed.v1", key, payload: { n } })

async function outboxRows(t: TestDatabase) {
  const r = await sql<{ seq: number; key: string; ver: number; payload: { n: number } }>`
    select seq, key, ver, payload from keyway.outbox order by seq
  `.execute(t.db)
  return r.rows
}

describe("enqueue", () => {
  let t: TestDatabase
  before(async () => {
    t = await createTestDatabase()
    await sql`create table widget (id int primary key)`.execute(t.db)
  })
  after(() => t.drop())

  test("a commit leaves exactly the events enqueued, a rollback leaves none", async () => {
    await assert.rejects(
      t.db.transaction().execute(async (trx) => {
        await sql`insert into widget values (1)`.execute(trx)
        await enqueue(trx, [item("a", 1), item("b", 2)])
        throw new Error("writer changed its mind")
      }),
      /writer changed its mind/,
    )
    assert.deepEqual(await outboxRows(t), [])

    const enqueued = await t.db.transaction().execute(async (trx) => {
      await sql`insert into widget values (2)`.execute(trx)
      return enqueue(trx, [item("a", 1), item("b", 2), item("a", 3)])
    })
    const rows = await outboxRows(t)
    assert.deepEqual(
      rows.map((r) => [r.key, r.ver, r.payload.n]),
      [
        ["a", 1, 1],
        ["b", 1, 2],
        ["a", 2, 3],
      ],
    )
    assert.deepEqual(
      enqueued.map((e) => [e.seq, e.key, e.ver, e.topic]),
      rows.map((r) => [r.seq, r.key, r.ver, "demo.item"]),
    )
  })

  test("outside a transaction it refuses and writes nothing", async () => {
    const before = (await outboxRows(t)).length
    await assert.rejects(enqueue(t.db, item("c", 1)), (err: Error) => {
      assert.ok(err instanceof EnqueueError)
      assert.match(err.message, /inside a transaction/)
      return true
    })
    assert.equal((await outboxRows(t)).length, before)
  })

  /**
   * enqueue's error, caught inside a transaction that then commits: a first event written
   * before a later one was refused would stay, where a rollback would hide it.
   */
  const refusal = (events: Parameters<typeof enqueue>[1], options?: EnqueueOptions) =>
    t.db.transaction().execute(async (trx) => {
      try {
        await enqueue(trx, events, options)
      } catch (err) {
        return err as Error
      }
      assert.fail("enqueue accepted it")
    })

  test("seq and ver are numbers from any Kysely, not only from one createDb made", async () => {
    // pg reads int8 as a string unless told otherwise, as createDb's pool is.
    const plain = new Kysely<any>({
      dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: t.url, max: 1 }) }),
    })
    try {
      for (const events of [item("plain", 1), [item("plain", 2), item("plain2", 1)]]) {
        const got = await plain.transaction().execute((trx) => enqueue(trx, events))
        for (const e of got) {
          assert.equal(typeof e.seq, "number")
          assert.equal(typeof e.ver, "number")
        }
      }
    } finally {
      await plain.destroy()
    }
  })

  test("an invalid payload names the type and the field, and nothing of the call is written", async () => {
    const before = await outboxRows(t)
    const invalid = await refusal([
      item("d", 1),
      { type: "demo.item.changed.v1", key: "d", payload: { n: "x" } },
    ])
    assert.ok(invalid instanceof InvalidEventError)
    assert.match(invalid.message, /demo\.item\.changed\.v1/)
    assert.match(invalid.message, /\["n"\]/)
    // Which of the call's events it is.
    assert.match(invalid.message, /event #2 \(key d\)/)
    assert.match(
      (await refusal({ type: "no.such.v1", key: "d", payload: {} })).message,
      /unknown event type "no\.such\.v1"/,
    )
    assert.match((await refusal(item("", 1))).message, /key must not be empty/)
    // A field no schema names: stored, it would wait in the stream for a later schema to
    // give its name a meaning.
    const excess = await refusal({
      type: "demo.item.changed.v1",
      key: "d",
      payload: { n: 1, m: 2 },
    })
    assert.ok(excess instanceof InvalidEventError)
    assert.match(excess.message, /\["m"\]/)
    assert.deepEqual(await outboxRows(t), before)
    const [first] = await t.db.transaction().execute((trx) => enqueue(trx, item("d", 1)))
    assert.equal(first!.ver, 1, "the refused calls took no version of key d")
  })

  test("an event keyed otherwise than its payload names is refused, and nothing of the call is written", async () => {
    const before = await outboxRows(t)
    const label = (key: string, labelCode: string) => ({
      type: "esl.label.render.v1",
      key,
      payload: {
        labelCode,
        jobId: "j1",
        page: 1,
        frontPage: true,
        productId: "P1",
        productName: "Butter 250 g",
        priceMinor: 279,
        currency: "EUR",
      },
    })
    const refused = await refusal([
      label("0A1B2C3D4E5F", "0A1B2C3D4E5F"),
      label("0A1B2C3D4E5F", "FFFFFFFFFFFF"),
    ])
    assert.ok(refused instanceof InvalidEventError)
    assert.match(refused.message, /esl\.label\.render\.v1 event #2 \(key 0A1B2C3D4E5F\)/)
    assert.match(refused.message, /its key must be its labelCode, "FFFFFFFFFFFF"/)
    assert.deepEqual(await outboxRows(t), before)
    const [first] = await t.db
      .transaction()
      .execute((trx) => enqueue(trx, label("FFFFFFFFFFFF", "FFFFFFFFFFFF")))
    assert.equal(first!.ver, 1, "keyed by its label, it is taken")
  })

  test("what Postgres cannot store is refused naming the event and the field, not with a bare 22P05", async () => {
    const before = await outboxRows(t)
    const noted = (key: string, note: unknown) => ({
      type: "demo.item.changed.v1",
      key,
      payload: { n: 1, note },
    })
    const nul = await refusal([item("u", 1), noted("u", "a\u0000b")])
    assert.ok(nul instanceof EnqueueError)
    assert.equal(
      nul.message,
      "event #2 (demo.item.changed.v1, key u): payload.note holds a NUL character or half of a surrogate pair, which Postgres cannot store",
    )
    assert.match((await refusal(noted("u", "x\ud800"))).message, /key u\): payload\.note holds/)
    // An unpaired surrogate in a key became U+FFFD in Postgres: two such keys were one.
    assert.match(
      (await refusal(item("k\udc00", 1))).message,
      /key must not hold half of a surrogate/,
    )
    // C1 control characters are not printable either.
    assert.match((await refusal(item("k\u0085", 1))).message, /key must not hold control/)
    assert.deepEqual(await outboxRows(t), before)
    // Text that only looks like an escape, and a whole surrogate pair, are stored as they are.
    const [ok] = await t.db
      .transaction()
      .execute((trx) => enqueue(trx, noted("u", "\\u0000 and \ud83d\ude00")))
    const [row] = (await outboxRows(t)).filter((r) => r.seq === ok!.seq)
    assert.deepEqual(row!.payload, { n: 1, note: "\\u0000 and \ud83d\ude00" })
  })

  test("issued together with the domain insert in a pipelined transaction: both commit, or neither", async () => {
    const widgets = async () =>
      (await sql<{ id: number }>`select id from widget order by id`.execute(t.db)).rows.map(
        (r) => r.id,
      )
    const before = await outboxRows(t)
    const beforeWidgets = await widgets()
    const [, enqueued] = await runPipelinedTransaction(t.db, (trx) =>
      Promise.all([sql`insert into widget values (10)`.execute(trx), enqueue(trx, item("p", 7))]),
    )
    const rows = await outboxRows(t)
    assert.deepEqual(rows.slice(before.length), [
      { seq: enqueued[0]!.seq, key: "p", ver: 1, payload: { n: 7 } },
    ])
    assert.deepEqual(await widgets(), [...beforeWidgets, 10])
    // The insert is on its way when enqueue refuses the payload: the transaction rolls it back.
    await assert.rejects(
      runPipelinedTransaction(t.db, (trx) =>
        Promise.all([
          sql`insert into widget values (11)`.execute(trx),
          enqueue(trx, { type: "demo.item.changed.v1", key: "p", payload: { n: "x" } }),
        ]),
      ),
      InvalidEventError,
    )
    assert.deepEqual(await outboxRows(t), rows)
    assert.deepEqual(await widgets(), [...beforeWidgets, 10])
    // Here the insert fails (widget 10 exists) after enqueue's statement has been sent: it
    // fails too, in the aborted transaction, and its key head's bump rolls back with it.
    await assert.rejects(
      runPipelinedTransaction(t.db, (trx) =>
        Promise.all([sql`insert into widget values (10)`.execute(trx), enqueue(trx, item("q", 1))]),
      ),
      (err: { code?: string }) => err.code === "23505",
    )
    assert.deepEqual(await outboxRows(t), rows)
    const [next] = await runPipelinedTransaction(t.db, (trx) => enqueue(trx, item("q", 2)))
    assert.equal(next!.ver, 1, "key q's first version is still free")
  })

  test("a payload larger than NATS would carry is refused with its size, and nothing is written", async () => {
    const before = await outboxRows(t)
    const noted = (note: string) => ({
      type: "demo.item.changed.v1",
      key: "big",
      payload: { n: 1, note },
    })
    // 40 euro signs: 40 characters but 120 bytes of UTF-8, and the limit is in bytes.
    const json = JSON.stringify(noted("€".repeat(40)).payload)
    const bytes = Buffer.byteLength(json)
    assert.ok(json.length < 100 && bytes > 100)
    const tooLarge = await refusal([item("big", 1), noted("€".repeat(40))], {
      maxPayloadBytes: 100,
    })
    assert.ok(tooLarge instanceof EnqueueError)
    assert.equal(
      tooLarge.message,
      `event #2 (demo.item.changed.v1, key big): payload is ${bytes} bytes of JSON, over the 100 allowed (a NATS message may not exceed the server's max_payload)`,
    )
    assert.deepEqual(await outboxRows(t), before)
    // The default leaves room for everything a 1 MiB NATS message carries besides the payload.
    assert.equal(DEFAULT_MAX_PAYLOAD_BYTES, 1024 * 1024 - 8 * 1024)
    const [accepted] = await t.db
      .transaction()
      .execute((trx) => enqueue(trx, noted("e".repeat(60)), { maxPayloadBytes: 100 }))
    assert.equal(accepted!.key, "big", "under the limit it is accepted")
    // NaN made every size check false, and any payload went in.
    for (const maxPayloadBytes of [Number.NaN, 0, 1.5]) {
      assert.match(
        (await refusal(noted("x"), { maxPayloadBytes })).message,
        /^maxPayloadBytes must be a whole number of at least 1/,
        String(maxPayloadBytes),
      )
    }
  })

  test("the trace context stored with an event counts toward its size: baggage cannot push it past NATS", async () => {
    // What the W3C propagators inject under a caller's request that brought 1,000 bytes of
    // baggage; the relay sends it as the message's headers, which max_payload counts.
    propagation.setGlobalPropagator({
      inject: (_context, carrier, setter) => {
        setter.set(
          carrier,
          "traceparent",
          "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        setter.set(carrier, "baggage", `erp.note=${"b".repeat(1000)}`)
      },
      extract: (context) => context,
      fields: () => ["traceparent", "baggage"],
    })
    try {
      const event = {
        type: "demo.item.changed.v1",
        key: "bag",
        payload: { n: 1, note: "n".repeat(900) },
      }
      const options = { maxPayloadBytes: 1500 }
      const before = await outboxRows(t)
      const refused = await refusal([event], options)
      assert.ok(refused instanceof EnqueueError)
      assert.match(
        refused.message,
        /payload is 9\d\d bytes of JSON and 1\d{3} of trace context \(W3C baggage included\), over the 1500 allowed/,
      )
      assert.deepEqual(await outboxRows(t), before)
      propagation.disable()
      const [accepted] = await t.db.transaction().execute((trx) => enqueue(trx, event, options))
      assert.equal(accepted!.key, "bag", "without the baggage it fits")
    } finally {
      propagation.disable()
    }
  })

  test("concurrent writers of overlapping keys get gapless versions whose seq order is version order", async () => {
    await sql`truncate keyway.outbox, keyway.outbox_key_head`.execute(t.db)
    const keys = Array.from({ length: 5 }, (_, i) => `k${i}`)
    // Every other transaction touches several keys in a random order (without the sorted
    // locking in keyway.enqueue these would deadlock); the others enqueue one event, which
    // takes enqueue()'s single-statement path.
    await Promise.all(
      Array.from({ length: 4 }, (_, w) =>
        (async () => {
          for (let i = 0; i < 50; i++) {
            const shuffled = [...keys].sort(() => Math.random() - 0.5).slice(0, i % 2 ? 3 : 1)
            await t.db.transaction().execute((trx) =>
              enqueue(
                trx,
                shuffled.map((k) => item(k, w * 1000 + i)),
              ),
            )
          }
        })(),
      ),
    )
    const rows = await outboxRows(t)
    assert.equal(rows.length, 4 * 25 * 3 + 4 * 25 * 1)
    for (const key of keys) {
      const versions = rows.filter((r) => r.key === key).map((r) => r.ver)
      assert.deepEqual(
        versions,
        versions.map((_, i) => i + 1),
        `key ${key}: versions in seq order`,
      )
    }
  })
})
