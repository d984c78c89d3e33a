// The trace a handler works in is its own event's, in ctx.complete's effects too: that is
// where a handler enqueues its follow-up events, and enqueue stores the active trace with
// them. Completions of many keys share one transaction, run by whichever caller the batcher
// was pumped from; the effects must not borrow that caller's context.
import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import { after, before, test } from "node:test"
import { createKeyedConsumer, type KeyedConsumerConfig } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { encodeEnvelope } from "@keyway/schemas"
import { startTelemetry, type Telemetry } from "@keyway/telemetry"
import {
  createTestDatabase,
  createTestStream,
  gate,
  type OtlpReceiver,
  startOtlpReceiver,
  type TestDatabase,
  waitFor,
} from "@keyway/testkit"
import { jetstream } from "@nats-io/jetstream"
import { headers, type NatsConnection } from "@nats-io/transport-node"
import { trace } from "@opentelemetry/api"
import { Redis } from "ioredis"
import { sql } from "kysely"
import { SHARED_NATS, SHARED_REDIS, unique } from "./support.ts"

let nc: NatsConnection
let redis: Redis
let t: TestDatabase
let receiver: OtlpReceiver
let telemetry: Telemetry
/** What the OpenTelemetry SDK reported of its own trouble (a span ended twice, say). */
const sdkTrouble: string[] = []
before(async () => {
  receiver = await startOtlpReceiver()
  telemetry = startTelemetry({
    serviceName: "keyed-consumer-trace-test",
    otlpEndpoint: receiver.url,
    exportDelayMs: 50,
    logger: { warn: (message, fields) => sdkTrouble.push(`${message}: ${fields?.report}`) },
  })
  nc = await connectNats({ servers: SHARED_NATS })
  redis = new Redis(SHARED_REDIS)
  t = await createTestDatabase()
})
after(async () => {
  await telemetry.shutdown()
  await receiver.stop()
  redis.disconnect()
  await nc.close()
  await t.drop()
})

const consumerOf = (stream: string, handlers: KeyedConsumerConfig["handlers"]) =>
  createKeyedConsumer({ group: unique("g"), stream, nats: nc, db: t.db, redis, handlers })

/** Publishes version 1 of `key` as seq `seq` of `site`, in the trace `traceparent` names. */
async function publishTraced(
  site: string,
  e: { seq: number; key: string; traceparent: string; createdAt?: string },
) {
  const h = headers()
  h.set("traceparent", e.traceparent)
  const envelope = {
    id: `${site}:${e.seq}`,
    site,
    seq: e.seq,
    topic: "demo.item",
    key: e.key,
    ver: 1,
    type: "demo.item.changed.v1",
    payload: { n: e.seq },
    createdAt: e.createdAt ?? new Date().toISOString(),
  }
  await jetstream(nc).publish(`${site}.demo.item`, encodeEnvelope(envelope), {
    msgID: envelope.id,
    headers: h,
  })
}

test("effects passed to ctx.complete run in their own event's trace, not in a batch-mate's", async () => {
  const stream = await createTestStream(nc)
  const keys = ["k1", "k2", "k3", "k4", "k5", "k6"]
  const traceOf = new Map(keys.map((k) => [k, randomBytes(16).toString("hex")]))
  const seen = new Map<string, string | undefined>()
  const consumer = consumerOf(stream.name, {
    "demo.item.changed.v1": async (event, ctx) => {
      await ctx.complete(async (trx) => {
        seen.set(event.key, trace.getActiveSpan()?.spanContext().traceId)
        // Holds its completion in flight, so the others queue: the next to submit gets a
        // batch of its own (two may be in flight), the rest gather behind it.
        if (event.key === "k1") await sql`select pg_sleep(1)`.execute(trx)
      })
    },
  })
  try {
    await consumer.start()
    let seq = 0
    for (const key of keys) {
      seq++
      await publishTraced(stream.site, {
        seq,
        key,
        traceparent: `00-${traceOf.get(key)}-${randomBytes(8).toString("hex")}-01`,
      })
      // k1 first and alone, so that the rest arrive while its completion is in flight.
      if (key === "k1")
        await waitFor(async () => seen.has("k1"), { timeoutMs: 10_000, message: "k1 handled" })
    }
    await waitFor(async () => seen.size === keys.length, {
      timeoutMs: 20_000,
      message: () => `every key handled; seen ${[...seen.keys()]}`,
    })
    assert.deepEqual(new Map([...seen].sort()), traceOf)
  } finally {
    await consumer.stop()
    await stream.delete()
  }
})

test("an event refused for its envelope dies in its writer's trace", async () => {
  const stream = await createTestStream(nc)
  const consumer = consumerOf(stream.name, { "demo.item.changed.v1": async () => {} })
  try {
    await consumer.start()
    const traceparent = `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`
    // No zone: refused at ingest, its version held by a placeholder that dies.
    await publishTraced(stream.site, {
      seq: 1,
      key: "refused",
      traceparent,
      createdAt: "2026-12-07T10:00:00",
    })
    await waitFor(() => consumer.status().dead === 1, { timeoutMs: 10_000, message: "dead" })
    const row = await sql<{ trace: { traceparent?: string } | null }>`
      select trace from keyway.inbox where key = 'refused'`.execute(t.db)
    assert.equal(row.rows[0]?.trace?.traceparent, traceparent)
  } finally {
    await consumer.stop()
    await stream.delete()
  }
})

test("a handler abandoned at stop has its span ended, exported and marked, once", async () => {
  const stream = await createTestStream(nc)
  const { opened: running, open: runs } = gate()
  const { opened: released, open: release } = gate()
  const consumer = createKeyedConsumer({
    group: unique("g"),
    stream: stream.name,
    nats: nc,
    db: t.db,
    redis,
    shutdownGraceMs: 300,
    leaseMs: 1000,
    logger: { info() {}, warn() {}, error() {} },
    handlers: {
      "demo.item.changed.v1": async () => {
        runs()
        await released // its signal unheard: a vendor call without a timeout
      },
    },
  })
  const traceId = randomBytes(16).toString("hex")
  try {
    await consumer.start()
    await publishTraced(stream.site, {
      seq: 1,
      key: "hung",
      traceparent: `00-${traceId}-${randomBytes(8).toString("hex")}-01`,
    })
    await running
    await consumer.stop()
    assert.equal(consumer.status().drainingKeys, 1, "the handler still runs")
    // What an app's shutdown does next, before it exits.
    await telemetry.forceFlush()
    const spans = () => receiver.spans().filter((s) => s.traceId === traceId)
    assert.deepEqual(
      spans().map((s) => [s.name, s.attributes["keyway.abandoned"], s.statusCode]),
      [["process demo.item", true, 2]],
    )
  } finally {
    release()
    await waitFor(() => consumer.status().drainingKeys === 0, {
      timeoutMs: 5000,
      message: "the handler ended",
    })
    await telemetry.forceFlush()
    await stream.delete()
  }
  // The SDK exports a span once however often it is ended, and says so when it is ended again.
  assert.equal(receiver.spans().filter((s) => s.traceId === traceId).length, 1)
  assert.deepEqual(
    sdkTrouble.filter((t) => /end\(\) on a span once|ended Span/i.test(t)),
    [],
    "not ended again when the handler returned",
  )
})
