// AIMS takes the page a label shows as a page number (frontPage), where a label job says
// whether its own page comes to the front. The writer keeps the page each label was last
// brought to; the worker sends it, and works it out for a task of a writer that did not.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { migrateEslSchema, upsertProducts, writeLabelJob } from "@keyway/esl-writer-app"
import { connectNats } from "@keyway/nats"
import { enqueue } from "@keyway/outbox"
import { EslLabelRender } from "@keyway/schemas"
import { createTestDatabase, type TestDatabase, waitFor } from "@keyway/testkit"
import type { NatsConnection } from "@nats-io/transport-node"
import { macs, SHARED_NATS, startEslPipeline } from "./support.ts"

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

test("each push names the page the label shows: its own at the front, else the one shown before", async () => {
  const { aims } = await startEslPipeline(nc, t, cleanups)
  const [label, older] = macs(2)
  await upsertProducts(t.db, [{ id: "P", name: "Rye bread", priceMinor: 329, currency: "EUR" }])
  const pushed = async (n: number, labelCode: string) => {
    await waitFor(() => aims.pushes(labelCode).length === n, {
      timeoutMs: 20_000,
      message: `${n} pushes of ${labelCode}`,
    })
    const p = aims.lastPush(labelCode)!
    return [p.page, p.frontPage]
  }
  await writeLabelJob(t.db, { labels: [{ labelCode: label!, productId: "P", page: 2 }] })
  assert.deepEqual(await pushed(1, label!), [2, 2])
  await writeLabelJob(t.db, {
    labels: [{ labelCode: label!, productId: "P", page: 4, frontPage: false }],
  })
  assert.deepEqual(await pushed(2, label!), [4, 2], "page 2 stays at the front")

  // A task as a writer before shownPage wrote it: its own page, or the label's first.
  const task = {
    labelCode: older!,
    jobId: "old",
    productId: "P",
    productName: "Rye bread",
    priceMinor: 329,
    currency: "EUR",
  }
  await t.db.transaction().execute((trx) =>
    enqueue(trx, [
      { type: EslLabelRender.type, key: older!, payload: { ...task, page: 3, frontPage: true } },
      { type: EslLabelRender.type, key: older!, payload: { ...task, page: 5, frontPage: false } },
    ]),
  )
  await waitFor(() => aims.pushes(older!).length === 2, { timeoutMs: 20_000, message: "older" })
  assert.deepEqual(
    aims.pushes(older!).map((p) => [p.page, p.frontPage]),
    [
      [3, 3],
      [5, 1],
    ],
  )
})
