// The demo's handlers under an operator's redrive: the events run again are counted on their
// effect rows, not refused. Refused (the unique event id), each failed until it died, and
// under the default policy, block, held its key for good.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { createDb } from "@keyway/db"
import { createConsumerAdmin, createKeyedConsumer } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { createRelay, enqueue } from "@keyway/outbox"
import { createTestDatabase, createTestStream, type TestDatabase, waitFor } from "@keyway/testkit"
import { jetstream } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { Redis } from "ioredis"
import { sql } from "kysely"
import { demoHandlers, ensureDemoEffectTable } from "../src/handlers/demo-handlers.ts"

const NATS_URL = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
const REDIS_URL = process.env.KEYWAY_TEST_REDIS_URL ?? "redis://127.0.0.1:6379"

let t: TestDatabase
let nc: NatsConnection
const cleanups: (() => Promise<unknown>)[] = []
before(async () => {
  t = await createTestDatabase()
  nc = await connectNats({ servers: NATS_URL })
})
after(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => {})
  await nc.close()
  await t.drop()
})

test("a redrive of done demo events runs them again, counted; nothing dies, the key moves on", async () => {
  const stream = await createTestStream(nc)
  cleanups.push(() => stream.delete())
  const relay = createRelay({
    connectionString: t.url,
    jetstream: jetstream(nc),
    connection: nc,
    site: stream.site,
  })
  cleanups.push(() => relay.stop())
  await relay.start()
  const db = createDb({ connectionString: t.url, max: 4 })
  cleanups.push(() => db.destroy())
  await ensureDemoEffectTable(db)
  const redis = new Redis(REDIS_URL)
  cleanups.push(async () => redis.disconnect())
  const group = `demo${stream.site}`
  const consumer = createKeyedConsumer({
    group,
    stream: stream.name,
    nats: nc,
    db,
    redis,
    handlers: demoHandlers,
    pollIntervalMs: 300,
  })
  cleanups.push(() => consumer.stop())
  await consumer.start()

  const write = (n: number) =>
    t.db
      .transaction()
      .execute((trx) => enqueue(trx, { type: "demo.item.changed.v1", key: "k", payload: { n } }))
  const effects = async () =>
    (
      await sql<{ ver: number; runs: number }>`
        select ver::int, runs from demo_effect where key = 'k' order by id`.execute(t.db)
    ).rows.map((r) => [r.ver, r.runs])
  for (const n of [1, 2, 3]) await write(n)
  await waitFor(async () => (await effects()).length === 3, { timeoutMs: 20_000, message: "v1-v3" })

  const admin = createConsumerAdmin({ db: t.db, group })
  assert.equal(await admin.redrive({ topic: "demo.item", key: "k", fromVer: 1, toVer: 3 }), 3)
  await write(4)
  await waitFor(async () => (await effects()).length === 4, { timeoutMs: 20_000, message: "v4" })
  assert.deepEqual(await effects(), [
    [1, 2],
    [2, 2],
    [3, 2],
    [4, 1],
  ])
  assert.deepEqual(await admin.listDead(), [])
})
