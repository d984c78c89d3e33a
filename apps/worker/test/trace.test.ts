// The deployed processes export their spans: an event's `send` span from the relay process
// and its `process` span from the worker process reach the OTLP receiver in one trace, the
// second a child of the first, each under its process's service name.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import { connectNats } from "@keyway/nats"
import { enqueue } from "@keyway/outbox"
import {
  createTestDatabase,
  createTestStream,
  type OtlpReceiver,
  spawnTs,
  startOtlpReceiver,
  type TestDatabase,
  type TsChild,
  waitFor,
} from "@keyway/testkit"
import type { NatsConnection } from "@nats-io/transport-node"

const NATS_URL = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
const REDIS_URL = process.env.KEYWAY_TEST_REDIS_URL ?? "redis://127.0.0.1:6379"
const relayMain = fileURLToPath(new URL("../../relay/src/main.ts", import.meta.url))
const workerMain = fileURLToPath(new URL("../src/main.ts", import.meta.url))

let t: TestDatabase
let nc: NatsConnection
let receiver: OtlpReceiver
before(async () => {
  t = await createTestDatabase()
  nc = await connectNats({ servers: NATS_URL })
  receiver = await startOtlpReceiver()
})
after(async () => {
  await receiver.stop()
  await nc.close()
  await t.drop()
})

test("the relay and worker processes export one trace per event: send, then process", async () => {
  const stream = await createTestStream(nc)
  const children: TsChild[] = []
  try {
    const common = {
      DATABASE_URL: t.url,
      NATS_URL,
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
    }
    children.push(
      spawnTs(relayMain, { ...common, KEYWAY_SITE: stream.site, OTEL_SERVICE_NAME: "relay-t" }),
      spawnTs(workerMain, {
        ...common,
        REDIS_URL,
        KEYWAY_SITE: "cloud",
        KEYWAY_STREAM: stream.name,
        KEYWAY_GROUP: `g${stream.site}`,
        KEYWAY_FILTER_SUBJECT: `${stream.site}.demo.item`,
        OTEL_SERVICE_NAME: "worker-t",
      }),
    )
    await t.db
      .transaction()
      .execute((trx) =>
        enqueue(trx, { type: "demo.item.changed.v1", key: "o1", payload: { n: 1 } }),
      )
    const processed = () =>
      receiver.spans().find((s) => s.serviceName === "worker-t" && s.name === "process demo.item")
    await waitFor(() => processed() !== undefined, {
      timeoutMs: 30_000,
      message: () =>
        `the worker's span; received ${JSON.stringify(receiver.spans().map((s) => [s.serviceName, s.name]))}; the children printed ${children.map((c) => c.lines.join("\n")).join("\n---\n")}`,
    })
    const handled = processed()!
    // Each process exports on its own timer: the relay's span, ended first, may come later.
    const sent = () =>
      receiver
        .spans()
        .find((s) => s.serviceName === "relay-t" && s.name === `send ${stream.site}.demo.item`)
    await waitFor(() => sent() !== undefined, { timeoutMs: 10_000, message: "the relay's span" })
    const send = sent()!
    assert.equal(handled.traceId, send.traceId)
    assert.equal(handled.parentSpanId, send.spanId)
    assert.equal(send.kind, 4, "producer")
    assert.equal(handled.kind, 5, "consumer")
    assert.deepEqual(receiver.refused, [])
  } finally {
    for (const c of children) c.kill("SIGTERM")
    for (const c of children) await c.exited()
    await stream.delete()
  }
  for (const c of children) assert.equal(c.exitCode, 0, c.lines.join("\n"))
})
