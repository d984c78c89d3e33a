// AIMS takes the page a label shows as a page number (frontPage), where a label job says
// whether its own page comes to the front. The writer keeps the page each label was last
// brought to; the worker sends it, and works it out for a task of a writer that did not.
import assert from "node:assert/strict"
import { createHash } from "node:crypto"
import { after, before, test } from "node:test"
import {
  migrateEslSchema,
  upsertProducts,
  writeLabelJob,
  writePriceChange,
} from "@keyway/esl-writer-app"
import { createConsumerAdmin } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { enqueue } from "@keyway/outbox"
import { EslLabelRender } from "@keyway/schemas"
import { createTestDatabase, type TestDatabase, waitFor } from "@keyway/testkit"
import type { NatsConnection } from "@nats-io/transport-node"
import type { EslWorkerConfig } from "../src/create-esl-worker.ts"
import { ESL_LABEL_POLICY } from "../src/index.ts"
import { renderLabel } from "../src/render-label.ts"
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

/**
 * A pipeline on a database of its own: one relay publishes an outbox, and the first test's
 * would take this one's events to its own stream.
 */
async function ownPipeline(worker: Partial<EslWorkerConfig> = {}) {
  const own = await createTestDatabase()
  cleanups.push(() => own.drop())
  await migrateEslSchema(own.db)
  return { ...(await startEslPipeline(nc, own, cleanups, worker)), db: own.db }
}

/** The image a page shows when it is drawn from these fields. */
const imageOf = async (page: {
  jobId: string
  productId: string
  productName: string
  priceMinor: number
  currency: string
}) =>
  createHash("sha256")
    .update(await renderLabel(page))
    .digest("hex")

test("a change of one page draws that page, with the page in view kept; the others are not pushed again", async () => {
  const { aims, db } = await ownPipeline()
  const [label] = macs(1)
  await upsertProducts(db, [
    { id: "TEA", name: "Green tea", priceMinor: 249, currency: "EUR" },
    { id: "JAM", name: "Plum jam", priceMinor: 319, currency: "EUR" },
  ])
  const pushes = async (n: number) => {
    await waitFor(() => aims.pushes(label!).length === n, {
      timeoutMs: 20_000,
      message: `${n} pushes`,
    })
    return aims.pushes(label!).map((p) => [p.page, p.frontPage])
  }
  await writeLabelJob(db, {
    jobId: "tea",
    labels: [{ labelCode: label!, productId: "TEA", page: 2 }],
  })
  await writeLabelJob(db, {
    jobId: "jam",
    labels: [{ labelCode: label!, productId: "JAM", page: 4, frontPage: false }],
  })
  assert.deepEqual(await pushes(2), [
    [2, 2],
    [4, 2],
  ])
  // The page in view had its price changed: drawn again, and only it.
  await writePriceChange(db, { jobId: "tea-up", changes: [{ productId: "TEA", priceMinor: 269 }] })
  assert.deepEqual((await pushes(3)).at(-1), [2, 2])
  const shown = aims.shown(label!)!
  assert.equal(shown.page, 2)
  assert.equal(
    shown.push!.imageSha256,
    await imageOf({
      jobId: "tea-up",
      productId: "TEA",
      productName: "Green tea",
      priceMinor: 269,
      currency: "EUR",
    }),
    "the shelf shows the new price",
  )
  // Page 4 brought to the front by a job that changes nothing else on it: its footer names
  // the job, so it is drawn, and the label turns to it.
  await writeLabelJob(db, {
    jobId: "turn",
    labels: [{ labelCode: label!, productId: "JAM", page: 4 }],
  })
  assert.deepEqual((await pushes(4)).at(-1), [4, 4])
  assert.equal(aims.shown(label!)!.page, 4)
  assert.equal(aims.requests().filter((r) => r.labelCode === label).length, 4, "no page twice")
})

test("a page a dead task left undrawn is drawn by the next task, whatever page that one changed", async () => {
  const group = `pages-${process.pid}`
  const { aims, db } = await ownPipeline({
    group,
    policy: { ...ESL_LABEL_POLICY, maxAttempts: 1 },
  })
  const admin = createConsumerAdmin({ db, group })
  const [label] = macs(1)
  await upsertProducts(db, [
    { id: "RICE", name: "Basmati rice", priceMinor: 289, currency: "EUR" },
    { id: "SOY", name: "Soy sauce", priceMinor: 199, currency: "EUR" },
  ])
  await writeLabelJob(db, {
    jobId: "bind",
    labels: [
      { labelCode: label!, productId: "SOY", page: 1, frontPage: false },
      { labelCode: label!, productId: "RICE", page: 3 },
    ],
  })
  await waitFor(() => aims.pushes(label!).length === 2, { timeoutMs: 20_000, message: "bound" })
  assert.deepEqual(
    aims.pushes(label!).map((p) => [p.page, p.frontPage]),
    [
      [3, 3],
      [1, 3],
    ],
    "the page in view first",
  )
  // The price of the page in view changes, and its push fails for good.
  aims.burst(503, 1)
  await writePriceChange(db, {
    jobId: "rice-up",
    changes: [{ productId: "RICE", priceMinor: 299 }],
  })
  await waitFor(async () => (await admin.listDead("esl.label")).length === 1, {
    timeoutMs: 20_000,
    message: "the price change's task dead",
  })
  // The next task changes only the page in the background; the page in view, which the dead
  // task did not draw, goes first.
  await writePriceChange(db, { jobId: "soy-up", changes: [{ productId: "SOY", priceMinor: 209 }] })
  await waitFor(() => aims.pushes(label!).length === 4, { timeoutMs: 20_000, message: "redrawn" })
  assert.deepEqual(
    aims.pushes(label!).map((p) => [p.page, p.frontPage]),
    [
      [3, 3],
      [1, 3],
      [3, 3],
      [1, 3],
    ],
  )
  assert.equal(
    aims.shown(label!)!.push!.imageSha256,
    await imageOf({
      jobId: "rice-up",
      productId: "RICE",
      productName: "Basmati rice",
      priceMinor: 299,
      currency: "EUR",
    }),
    "the shelf shows the price the dead task carried",
  )
})

test("a page AIMS refuses for good fails its task once the label's other pages are pushed", async () => {
  const group = `refused-${process.pid}`
  const { aims, db } = await ownPipeline({ group })
  const admin = createConsumerAdmin({ db, group })
  const [label] = macs(1)
  await upsertProducts(db, [
    { id: "FIG", name: "Dried figs", priceMinor: 429, currency: "EUR" },
    { id: "NUT", name: "Walnuts", priceMinor: 519, currency: "EUR" },
  ])
  // The page in view goes first, and is refused.
  aims.burst(400, 1)
  await writeLabelJob(db, {
    jobId: "bind",
    labels: [
      { labelCode: label!, productId: "NUT", page: 1, frontPage: false },
      { labelCode: label!, productId: "FIG", page: 3 },
    ],
  })
  await waitFor(async () => (await admin.listDead("esl.label")).length === 1, {
    timeoutMs: 20_000,
    message: "the task dead",
  })
  const [dead] = await admin.listDead("esl.label")
  assert.match(dead!.lastError ?? "", /^poison: page 3: .*400/)
  assert.deepEqual(
    aims.pushes(label!).map((p) => [p.page, p.frontPage]),
    [[1, 3]],
    "the other page pushed all the same",
  )
  // Next time the page in view is taken: both pages go again, nothing having been recorded.
  await writePriceChange(db, { jobId: "fig-up", changes: [{ productId: "FIG", priceMinor: 449 }] })
  await waitFor(() => aims.pushes(label!).length === 3, { timeoutMs: 20_000, message: "redrawn" })
  assert.deepEqual(
    aims.pushes(label!).map((p) => [p.page, p.frontPage]),
    [
      [1, 3],
      [3, 3],
      [1, 3],
    ],
  )
  assert.equal(aims.shown(label!)?.push?.page, 3)
})
