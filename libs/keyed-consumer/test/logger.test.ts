// A logger that throws costs its line, not the loop that logged it. The polling and recovery
// loops log a failed round and go on; a throw from that log line was a defect their repeat
// does not survive, and with the polling loop gone no lost wake-up was caught again.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { createDb } from "@keyway/db"
import { createKeyedConsumer } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import {
  createTcpProxy,
  createTestDatabase,
  createTestStream,
  type TestDatabase,
  waitFor,
} from "@keyway/testkit"
import type { NatsConnection } from "@nats-io/transport-node"
import { Redis } from "ioredis"
import {
  createEffectTable,
  effects,
  publishEvent,
  recordEffect,
  SHARED_NATS,
  SHARED_REDIS,
  unique,
} from "./support.ts"

let nc: NatsConnection
let redis: Redis
let t: TestDatabase
before(async () => {
  nc = await connectNats({ servers: SHARED_NATS })
  redis = new Redis(SHARED_REDIS)
  t = await createTestDatabase()
  await createEffectTable(t.db)
})
after(async () => {
  redis.disconnect()
  await nc.close()
  await t.drop()
})

test("the polling loop goes on after a failed round whose log line threw", async () => {
  const url = new URL(t.url)
  const proxy = await createTcpProxy({ host: url.hostname, port: Number(url.port) })
  url.hostname = proxy.host
  url.port = String(proxy.port)
  const db = createDb({ connectionString: url.toString(), max: 4 })
  const stream = await createTestStream(nc)
  const thrown: string[] = []
  const fails = (message: string) => {
    thrown.push(message)
    throw new Error("the log is full")
  }
  const consumer = createKeyedConsumer({
    group: unique("g"),
    stream: stream.name,
    nats: nc,
    db,
    redis,
    handlers: { "demo.item.changed.v1": recordEffect("w1") },
    logger: { info: () => {}, warn: fails, error: fails },
    // Only the polling loop drains: what it misses, nothing else catches.
    wakeOnIngest: false,
    pollIntervalMs: 200,
    recoveryIntervalMs: 200,
  })
  try {
    await consumer.start()
    proxy.cut()
    // The polling loop's own line: the ingest and recovery loops log failures too, and
    // their lines alone reached the count that this waited for.
    await waitFor(() => thrown.filter((m) => m === "polling loop failed").length >= 2, {
      timeoutMs: 10_000,
      message: () => `failed polling rounds logged (lines: ${thrown.join("; ")})`,
    })
    proxy.restore()
    await publishEvent(nc, stream.site, { key: "a", ver: 1, payload: { n: 1 } })
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 20_000,
      message: "the event handled through the polling loop",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => [e.key, Number(e.ver)]),
      [["a", 1]],
    )
  } finally {
    await consumer.stop()
    await db.destroy()
    await proxy.close()
    await stream.delete()
  }
})
