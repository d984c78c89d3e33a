// Pushes that must not draw an older image over a newer one: an operator's retry of a label
// version that died, after a later version of the label was pushed; a push AIMS applies late;
// a push from a worker that lost the label's lock while it stalled. Each task carries the
// label's whole content, so an older image drawn last puts its older price back, for good.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import {
  migrateEslSchema,
  upsertProducts,
  writeLabelJob,
  writePriceChange,
} from "@keyway/esl-writer-app"
import { createConsumerAdmin } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { createTestDatabase, type TestDatabase, waitFor } from "@keyway/testkit"
import type { NatsConnection } from "@nats-io/transport-node"
import { sql } from "kysely"
import { type AimsClient, createAimsClient } from "../src/aims-client.ts"
import { ESL_LABEL_POLICY } from "../src/create-esl-worker.ts"
import { eventIdOf, eventIdOfKey, macs, SHARED_NATS, startEslPipeline } from "./support.ts"

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

test("a retried dead version is not pushed over a later one the label already shows", async () => {
  // One attempt: the 503 below makes v2 dead at once, as an outage longer than the policy's
  // attempts would.
  const { stream, aims, group } = await startEslPipeline(nc, t, cleanups, {
    policy: { ...ESL_LABEL_POLICY, maxAttempts: 1 },
  })
  const admin = createConsumerAdmin({ db: t.db, group })
  const [label] = macs(1)
  const eventId = (seq: number) => `${stream.site}:${seq}`

  await upsertProducts(t.db, [{ id: "P", name: "Oat milk 1 l", priceMinor: 149, currency: "EUR" }])
  const v1 = await writeLabelJob(t.db, { labels: [{ labelCode: label!, productId: "P" }] })
  await waitFor(() => eventIdOf(aims.lastPush(label!)) === eventId(v1.tasks[0]!.seq), {
    timeoutMs: 20_000,
    message: "v1 on the label",
  })
  aims.burst(503, 1)
  await writePriceChange(t.db, { changes: [{ productId: "P", priceMinor: 169 }] })
  await waitFor(async () => (await admin.listDead("esl.label")).length === 1, {
    timeoutMs: 20_000,
    message: "v2 dead",
  })
  const v3 = await writePriceChange(t.db, { changes: [{ productId: "P", priceMinor: 189 }] })
  const stateOf = async (ver: number) =>
    (
      await sql<{ state: string }>`
        select state from keyway.inbox
         where grp = ${group} and key = ${label!} and ver = ${ver}`.execute(t.db)
    ).rows[0]?.state
  await waitFor(() => eventIdOf(aims.lastPush(label!)) === eventId(v3.tasks[0]!.seq), {
    timeoutMs: 20_000,
    message: "v3 on the label",
  })
  // AIMS shows a push before its worker marks it done; the retry must find v3 done, or it
  // would be the case of a later version not yet done (the retry fences its completion).
  await waitFor(async () => (await stateOf(3)) === "done", {
    timeoutMs: 20_000,
    message: "v3 done",
  })

  assert.equal(await admin.retry({ topic: "esl.label" }), 1)
  await waitFor(async () => (await stateOf(2)) === "done", {
    timeoutMs: 20_000,
    message: "the retried v2 done",
  })
  // Before the retry learnt of v3 (KeyedEvent.supersededBy), v2's 1.69 went out last.
  assert.deepEqual(aims.pushes(label!).map(eventIdOf), [
    eventId(v1.tasks[0]!.seq),
    eventId(v3.tasks[0]!.seq),
  ])
  assert.equal(eventIdOf(aims.lastPush(label!)), eventId(v3.tasks[0]!.seq))
  assert.deepEqual(await admin.listDead("esl.label"), [])
})

test("a push AIMS applies after the worker gave up on it is not drawn over the label's next version", async () => {
  // Retries at once, but for the wait after a push given up on: without it, v2 was pushed
  // again and v3 after it before AIMS applied the v2 it had held, last.
  // A database of its own: the first test's relay leads this one's outbox otherwise.
  const own = await createTestDatabase()
  cleanups.push(() => own.drop())
  await migrateEslSchema(own.db)
  const { stream, aims } = await startEslPipeline(
    nc,
    own,
    cleanups,
    { policy: { ...ESL_LABEL_POLICY, backoffMs: 10, maxBackoffMs: 50 } },
    { timeoutMs: 300, settleMs: 1500 },
  )
  const label = macs(2)[1]!
  const eventId = (seq: number) => `${stream.site}:${seq}`
  await upsertProducts(own.db, [{ id: "Q", name: "Rye bread", priceMinor: 249, currency: "EUR" }])
  const v1 = await writeLabelJob(own.db, { labels: [{ labelCode: label, productId: "Q" }] })
  await waitFor(() => eventIdOf(aims.lastPush(label)) === eventId(v1.tasks[0]!.seq), {
    timeoutMs: 20_000,
    message: "v1 on the label",
  })
  // v2's first push: no answer within the client's 300 ms, applied 800 ms after it came.
  aims.holdNext(1, 800)
  await writePriceChange(own.db, { changes: [{ productId: "Q", priceMinor: 269 }] })
  const v3 = await writePriceChange(own.db, { changes: [{ productId: "Q", priceMinor: 289 }] })
  await waitFor(
    () =>
      aims.requests().some((r) => r.outcome === "late" && r.appliedAt !== undefined) &&
      eventIdOf(aims.lastPush(label)) === eventId(v3.tasks[0]!.seq),
    { timeoutMs: 20_000, message: "the held v2 applied, and v3 pushed" },
  )
  const late = aims.requests().find((r) => r.outcome === "late")!
  const v3Push = aims.lastPush(label)!
  assert.ok(v3Push.appliedAt! > late.appliedAt!, "v3 drawn after the late v2, and shown")
})

test("a worker that stalls past its lock before a push sends nothing when it resumes; the next drain pushes", async () => {
  // The stall is the event loop kept busy (a long render, a GC pause, a frozen process):
  // no heartbeat runs, and nothing but the lock's own clock tells the push it lost the key.
  // After the label's first push, so that the token is at hand and nothing waits on the
  // network between the stall and the send.
  let real: AimsClient | undefined
  let stallNext = false
  const attempts: { key: string; error?: string }[] = []
  const stalling: AimsClient = {
    async pushImage(options) {
      if (stallNext) {
        stallNext = false
        const until = performance.now() + 1500
        while (performance.now() < until) {}
      }
      try {
        await real!.pushImage(options)
        attempts.push({ key: eventIdOfKey(options.idempotencyKey) })
      } catch (err) {
        attempts.push({ key: eventIdOfKey(options.idempotencyKey), error: (err as Error).message })
        throw err
      }
    },
  }
  const own = await createTestDatabase()
  cleanups.push(() => own.drop())
  await migrateEslSchema(own.db)
  const { stream, aims } = await startEslPipeline(nc, own, cleanups, {
    aims: stalling,
    leaseMs: 1000,
  })
  real = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000 })
  const [label] = macs(1)
  const eventId = (seq: number) => `${stream.site}:${seq}`

  await upsertProducts(own.db, [{ id: "Q", name: "Rye bread", priceMinor: 349, currency: "EUR" }])
  const v1 = await writeLabelJob(own.db, { labels: [{ labelCode: label!, productId: "Q" }] })
  await waitFor(() => eventIdOf(aims.lastPush(label!)) === eventId(v1.tasks[0]!.seq), {
    timeoutMs: 20_000,
    message: "v1 on the label",
  })
  stallNext = true
  const v2 = await writePriceChange(own.db, { changes: [{ productId: "Q", priceMinor: 379 }] })
  const v2Id = eventId(v2.tasks[0]!.seq)
  await waitFor(() => eventIdOf(aims.lastPush(label!)) === v2Id, {
    timeoutMs: 20_000,
    message: "v2 on the label",
  })
  // AIMS records the push before its answer reaches the worker (and `attempts` here), and
  // the worker marks v2 done after that, when its attempts are counted.
  const v2Row = async () =>
    (
      await sql<{ state: string; attempts: number }>`
        select state, attempts from keyway.inbox where key = ${label!} and ver = 2`.execute(own.db)
    ).rows[0]
  await waitFor(async () => (await v2Row())?.state === "done", {
    timeoutMs: 20_000,
    message: "v2 done",
  })
  assert.deepEqual(
    attempts.filter((a) => a.key === v2Id),
    [{ key: v2Id, error: "lock lost" }, { key: v2Id }],
    "the stalled push was refused before it went out; the next drain's went through",
  )
  assert.deepEqual(
    aims.requests().map(eventIdOf),
    [eventId(v1.tasks[0]!.seq), v2Id],
    "AIMS got v2's image once",
  )
  // Counted when a run ends, done included: the push that went through, not the one refused.
  assert.equal((await v2Row())!.attempts, 1, "a push cut short by a lost key costs no attempt")
})
