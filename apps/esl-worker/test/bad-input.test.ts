// Must-show 3 of issue 5: bad input is refused with a clear reason. A malformed MAC never
// gets into the outbox (InvalidEventError naming labelCode, the whole job rolled back); a
// task the worker cannot draw is dead at once with the reason, while other labels, and the
// same label's next task, go on. What the writer accepted is drawn: a product name too long
// for the label is shortened, so the price it travels with still reaches the shelf.
import assert from "node:assert/strict"
import { after, before, describe, test } from "node:test"
import {
  EslWriterError,
  migrateEslSchema,
  upsertProducts,
  writeLabelJob,
} from "@keyway/esl-writer-app"
import { createConsumerAdmin } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { enqueue } from "@keyway/outbox"
import { canonicalLabelCode, EslLabelRender, InvalidEventError } from "@keyway/schemas"
import { createMetricsRegistry } from "@keyway/telemetry"
import { createTestDatabase, metricValue, type TestDatabase, waitFor } from "@keyway/testkit"
import type { NatsConnection } from "@nats-io/transport-node"
import { sql } from "kysely"
import { eventIdOf, imageHashOf, macs, SHARED_NATS, startEslPipeline } from "./support.ts"

const payload = {
  labelCode: "0A1B2C3D4E5F",
  jobId: "j1",
  page: 1,
  frontPage: true,
  productId: "P1",
  productName: "Butter 250 g",
  priceMinor: 279,
  currency: "EUR",
}

async function count(db: TestDatabase["db"], table: string) {
  const r = await sql<{ n: number }>`select count(*)::int as n from ${sql.table(table)}`.execute(db)
  return r.rows[0]!.n
}

describe("bad ESL input", () => {
  let nc: NatsConnection
  let t: TestDatabase
  const cleanups: (() => Promise<unknown>)[] = []
  before(async () => {
    nc = await connectNats({ servers: SHARED_NATS })
    t = await createTestDatabase()
    await migrateEslSchema(t.db)
  })
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => {})
    await t.drop()
    await nc.close()
  })

  test("MACs: the usual ways of writing one are folded; anything else is not a MAC", () => {
    assert.equal(canonicalLabelCode("0a:1b:2c:3d:4e:5f"), "0A1B2C3D4E5F")
    assert.equal(canonicalLabelCode("0a-1b-2c-3d-4e-5f"), "0A1B2C3D4E5F")
    assert.equal(canonicalLabelCode("0A1B2C3D4E5F"), "0A1B2C3D4E5F")
    assert.equal(canonicalLabelCode("0a1b.2c3d.4e5f"), "0A1B2C3D4E5F")
    assert.equal(canonicalLabelCode(" 0a:1b:2c:3d:4e:5f\t"), "0A1B2C3D4E5F")
    for (const bad of [
      "0A1B2C3D4E",
      "0A1B2C3D4E5F00",
      "0A1B2C3D4E5G",
      "",
      "0A 1B 2C 3D 4E 5F",
      // Separators stripped wherever they stood made these MACs, some of other labels.
      "0:1b:2c:3d:4e:5f:0",
      "0A1B2C3D4E5F--",
      "0-A-1-B-2-C-3-D-4-E-5-F",
      "0a:1b-2c:3d-4e:5f",
      "0a1b2c.3d4e5f",
    ]) {
      assert.equal(canonicalLabelCode(bad), undefined, bad)
    }
  })

  test("enqueue refuses a malformed MAC with InvalidEventError naming labelCode", async () => {
    for (const labelCode of ["0a:1b:2c:3d:4e:5f", "0A1B2C3D4E", "ZZ1B2C3D4E5F"]) {
      const err = await t.db
        .transaction()
        .execute((trx) =>
          enqueue(trx, {
            type: EslLabelRender.type,
            key: labelCode,
            payload: { ...payload, labelCode },
          }),
        )
        .then(
          () => undefined,
          (e) => e,
        )
      assert.ok(err instanceof InvalidEventError, `${labelCode}: ${err}`)
      assert.match(err.message, /invalid esl\.label\.render\.v1 event/)
      assert.match(err.message, /\["labelCode"\]/)
      assert.match(err.message, /12 hex digits/)
    }
    assert.equal(await count(t.db, "keyway.outbox"), 0)
  })

  test("a label job with one malformed MAC is refused whole: no label, job or task written", async () => {
    await upsertProducts(t.db, [
      { id: "P1", name: "Butter 250 g", priceMinor: 279, currency: "EUR" },
    ])
    await assert.rejects(
      writeLabelJob(t.db, {
        jobId: "bad-mac-job",
        labels: [
          { labelCode: "0a:1b:2c:3d:4e:5f", productId: "P1" }, // fine once folded
          { labelCode: "0A1B2C3D4E5", productId: "P1" }, // 11 digits
        ],
      }),
      // Refused before the transaction, naming the label: it never reaches esl.label.
      (err) =>
        err instanceof EslWriterError && /labels\[1\]\.labelCode "0A1B2C3D4E5"/.test(err.message),
    )
    assert.equal(await count(t.db, "esl.label"), 0)
    assert.equal(await count(t.db, "esl.job"), 0)
    assert.equal(await count(t.db, "keyway.outbox"), 0)
  })

  test("a task the worker cannot draw is dead at once with the reason; other labels go on", async () => {
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    // Block, the stricter policy, would stop the label at a dead task; the check that the
    // same label's next task still runs below holds only because the topic parks.
    const { stream, aims, group } = await startEslPipeline(nc, t, cleanups, { metrics })

    const longName = "Extra ".repeat(30).trim()
    await upsertProducts(t.db, [
      { id: "LONG", name: longName, priceMinor: 100, currency: "EUR" },
      { id: "OK", name: "Sea salt 500 g", priceMinor: 99, currency: "EUR" },
    ])
    const [poisoned, long, ...others] = macs(6)
    // A task whose payload is for another label, as only a writer that bypassed
    // @keyway/outbox (which refuses it) could send, calling keyway.enqueue() in SQL: drawn,
    // it would put one label's image on another.
    const misdirected = { ...payload, labelCode: others[0]!, productId: "OK" }
    await sql`select keyway.enqueue(array['esl.label'], array[${poisoned!}::text], array[1],
                array[1], array[1], array[${EslLabelRender.type}::text],
                array[${JSON.stringify(misdirected)}::jsonb], null)`.execute(t.db)
    // One job: a product whose name is far too long for the label, and fine ones.
    await writeLabelJob(t.db, {
      jobId: "mixed",
      labels: [
        { labelCode: long!, productId: "LONG" },
        ...others.map((labelCode) => ({ labelCode, productId: "OK" })),
      ],
    })
    // Then the poisoned label gets a task of its own.
    const fixed = await writeLabelJob(t.db, {
      jobId: "fixed",
      labels: [{ labelCode: poisoned!, productId: "OK" }],
    })
    await waitFor(
      () =>
        [long!, ...others].every((l) => aims.lastPush(l)) && aims.lastPush(poisoned!) !== undefined,
      { timeoutMs: 20_000, message: "every label pushed" },
    )
    const dead = await createConsumerAdmin({ db: t.db, group }).listDead("esl.label")
    assert.equal(dead.length, 1)
    assert.equal(dead[0]!.key, poisoned)
    assert.equal(dead[0]!.ver, 1)
    assert.equal(dead[0]!.attempts, 1, "dead at once: no retry can draw it")
    assert.equal(dead[0]!.blocking, false, "parked: the label moved on")
    assert.match(
      dead[0]!.lastError ?? "",
      /^poison: invalid esl\.label\.render\.v1 event: its key must be its labelCode, "/,
    )
    assert.deepEqual(
      aims.pushes(poisoned!).map(eventIdOf),
      [`${stream.site}:${fixed.tasks[0]!.seq}`],
      "the undrawable version was never pushed; the fixed one was",
    )
    const shown = aims.lastPush(poisoned!)!.imageSha256
    assert.equal(
      shown,
      await imageHashOf({
        ...payload,
        labelCode: poisoned!,
        jobId: "fixed",
        productId: "OK",
        productName: "Sea salt 500 g",
        priceMinor: 99,
      }),
    )
    // The long name, shortened, with its price.
    assert.equal(
      aims.lastPush(long!)!.imageSha256,
      await imageHashOf({
        ...payload,
        labelCode: long!,
        jobId: "mixed",
        productId: "LONG",
        productName: longName,
        priceMinor: 100,
      }),
    )
    assert.equal(aims.pushes(long!).length, 1)
    for (const l of others) assert.equal(aims.pushes(l).length, 1, `${l} pushed once`)
    // What an operator sees: seven tasks, one dead and six done, and six AIMS calls.
    const rendered = async () => (await metrics.render()).body
    await waitFor(async () => metricValue(await rendered(), "consumer_done_total") === 6, {
      timeoutMs: 5000,
      message: "six done",
    })
    const body = await rendered()
    assert.equal(metricValue(body, "consumer_dead_total"), 1)
    assert.equal(metricValue(body, "consumer_dead_tasks"), 1, "listed until an operator acts")
    assert.equal(metricValue(body, 'esl_aims_push_seconds_count{result="ok"}'), 6)
    assert.equal(metricValue(body, 'esl_aims_push_seconds_count{result="error"}'), undefined)
  })
})
