// Must-show 2 of issue 5: one job is one trace. The writer's span, the relay's `send`, the
// worker's `process esl.label`, its render and its AIMS call all land in the test OTLP
// receiver under one trace id with the right parents; the traceparent AIMS received names
// the client span, and the writer's baggage reaches AIMS too. Everything runs in this
// process, exporting to the receiver.
import assert from "node:assert/strict"
import { createRequire } from "node:module"
import { after, before, test } from "node:test"
import { migrateEslSchema, upsertProducts, writeLabelJob } from "@keyway/esl-writer-app"
import { connectNats } from "@keyway/nats"
import { startTelemetry, type Telemetry } from "@keyway/telemetry"
import { createTestDatabase, type OtlpReceiver, startOtlpReceiver, waitFor } from "@keyway/testkit"
import type { NatsConnection } from "@nats-io/transport-node"
import { context, propagation } from "@opentelemetry/api"
import { macs, SHARED_NATS, startEslPipeline } from "./support.ts"

let receiver: OtlpReceiver
let telemetry: Telemetry
let nc: NatsConnection
const cleanups: (() => Promise<unknown>)[] = []
before(async () => {
  receiver = await startOtlpReceiver()
  telemetry = startTelemetry({
    serviceName: "esl-trace-test",
    otlpEndpoint: receiver.url,
    exportDelayMs: 100,
  })
  nc = await connectNats({ servers: SHARED_NATS })
})
after(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => {})
  await nc.close()
  await telemetry.shutdown()
  await receiver.stop()
})

// The SDK registers its providers through the @opentelemetry/api copy it resolves, and an
// API copy of a newer minor version refuses a global registered by an older one: a library
// resolving another copy records nothing and propagates nothing, silently. The Node 20 SDK
// line (0.223 / 2.12) needs an API below 1.10, so every package must resolve the same copy.
test("outbox, keyed consumer and the telemetry SDK share one @opentelemetry/api", () => {
  const apiOf = (pkg: string) => {
    const r = createRequire(new URL(`../../../${pkg}/package.json`, import.meta.url))
    return r.resolve("@opentelemetry/api")
  }
  const sdk = createRequire(
    createRequire(new URL("../../../libs/telemetry/package.json", import.meta.url)).resolve(
      "@opentelemetry/sdk-node",
    ),
  ).resolve("@opentelemetry/api")
  for (const pkg of [
    "libs/outbox",
    "libs/keyed-consumer",
    "apps/esl-worker",
    "apps/esl-writer",
    "apps/demo",
  ]) {
    assert.equal(
      apiOf(pkg),
      sdk,
      `${pkg} resolves another @opentelemetry/api than the SDK: its spans and context are lost (pin it below 1.10)`,
    )
  }
})

test("one job's trace runs writer → send → process esl.label → render and POST to AIMS, one trace id", async () => {
  const t = await createTestDatabase()
  cleanups.push(() => t.drop())
  await migrateEslSchema(t.db)
  const { stream, aims } = await startEslPipeline(nc, t, cleanups, {
    policy: { backoffMs: 20 },
  })
  // One 503 first: the retry's spans must join the same trace too.
  aims.burst(503, 1)

  await upsertProducts(t.db, [
    { id: "P1", name: "Rye bread 500 g", priceMinor: 349, currency: "EUR" },
  ])
  const labels = macs(3)
  // The caller's baggage (as an ERP's request would bring it) rides along with the trace.
  const baggage = propagation.createBaggage({ "erp.order": { value: "SO-1042" } })
  const job = await context.with(propagation.setBaggage(context.active(), baggage), () =>
    writeLabelJob(t.db, {
      jobId: "traced-job",
      labels: labels.map((labelCode) => ({ labelCode, productId: "P1" })),
    }),
  )
  await waitFor(() => labels.every((l) => aims.lastPush(l) !== undefined), {
    timeoutMs: 20_000,
    message: "all three labels pushed",
  })
  // A flush exports what has ended; the handler's span ends just after the push returns.
  await waitFor(
    async () => {
      await telemetry.forceFlush()
      return receiver.spans().filter((s) => s.name === "process esl.label").length >= 4
    },
    { timeoutMs: 10_000, message: "process spans exported" },
  )

  assert.deepEqual(receiver.refused, [], "the exporter sent OTLP JSON")
  const spans = receiver.spans()
  const writer = spans.find((s) => s.name === "esl label job")
  assert.ok(writer, "the writer's span was exported")
  assert.equal(writer.parentSpanId, "", "the writer's span is the root")
  assert.equal(writer.attributes["esl.job.id"], "traced-job")
  const trace = spans.filter((s) => s.traceId === writer.traceId)
  const byId = new Map(trace.map((s) => [s.spanId, s]))
  const parentOf = (s: { parentSpanId: string }) => byId.get(s.parentSpanId)

  const sends = trace.filter((s) => s.name === `send ${stream.site}.esl.label`)
  assert.equal(sends.length, 3, "one send per task")
  for (const send of sends) {
    assert.equal(send.kind, 4, "send is a PRODUCER span")
    assert.equal(parentOf(send), writer, "send is the writer span's child")
    assert.equal(send.attributes["messaging.system"], "nats")
  }
  const ids = new Set(job.tasks.map((task) => `${stream.site}:${task.seq}`))
  assert.deepEqual(new Set(sends.map((s) => s.attributes["messaging.message.id"])), ids)

  const processes = trace.filter((s) => s.name === "process esl.label")
  assert.equal(processes.length, 4, "three tasks, one of them tried twice (the 503)")
  for (const p of processes) {
    assert.equal(p.kind, 5, "process is a CONSUMER span")
    const send = parentOf(p)
    assert.equal(send?.name, `send ${stream.site}.esl.label`, "process is a send's child")
    assert.equal(send?.attributes["messaging.message.id"], p.attributes["messaging.message.id"])
  }
  assert.equal(processes.filter((p) => p.statusCode === 2).length, 1, "the 503 try is an error")

  const posts = trace.filter((s) => s.name === "POST")
  const renders = trace.filter((s) => s.name === "render label")
  assert.equal(posts.length, 4)
  assert.equal(renders.length, 4)
  for (const s of [...posts, ...renders]) {
    assert.equal(parentOf(s)?.name, "process esl.label", `${s.name} is a process span's child`)
  }
  for (const post of posts) {
    assert.equal(post.kind, 3, "the AIMS call is a CLIENT span")
    assert.ok(String(post.attributes["url.full"]).includes("/api/v2/common/labels/image"))
  }
  assert.deepEqual(
    posts.map((p) => p.attributes["http.response.status_code"]).sort(),
    [200, 200, 200, 503],
  )
  // What AIMS received carries the trace on: traceparent = 00-<trace id>-<client span id>-01.
  for (const request of aims.requests()) {
    const [, traceId, spanId] = (request.traceparent ?? "").split("-")
    assert.equal(traceId, writer.traceId, "AIMS got the job's trace id")
    assert.ok(
      posts.some((p) => p.spanId === spanId),
      "AIMS got the client span as parent",
    )
    assert.equal(request.baggage, "erp.order=SO-1042", "AIMS got the writer's baggage")
  }
  assert.equal(new Set(trace.map((s) => s.traceId)).size, 1)
  assert.equal(trace.length, 1 + 3 + 4 + 4 + 4, "nothing else in the trace, nothing missing")
})
