// An operator's retry of a label version that died, after a later version of the label was
// pushed: the later image stays on the shelf. Each task carries the label's whole content, so
// pushing the retried one would put its older price back, for good.
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
import { ESL_LABEL_POLICY } from "../src/create-esl-worker.ts"
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
  await waitFor(() => aims.lastPush(label!)?.idempotencyKey === eventId(v1.tasks[0]!.seq), {
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
  await waitFor(() => aims.lastPush(label!)?.idempotencyKey === eventId(v3.tasks[0]!.seq), {
    timeoutMs: 20_000,
    message: "v3 on the label",
  })

  assert.equal(await admin.retry({ topic: "esl.label" }), 1)
  const v2State = async () =>
    (
      await sql<{ state: string }>`
        select state from keyway.inbox where grp = ${group} and key = ${label!} and ver = 2`.execute(
        t.db,
      )
    ).rows[0]?.state
  await waitFor(async () => (await v2State()) === "done", {
    timeoutMs: 20_000,
    message: "the retried v2 done",
  })
  // Before the retry learnt of v3 (KeyedEvent.supersededBy), v2's 1.69 went out last.
  assert.deepEqual(
    aims.pushes(label!).map((p) => p.idempotencyKey),
    [eventId(v1.tasks[0]!.seq), eventId(v3.tasks[0]!.seq)],
  )
  assert.equal(aims.lastPush(label!)?.idempotencyKey, eventId(v3.tasks[0]!.seq))
  assert.deepEqual(await admin.listDead("esl.label"), [])
})
