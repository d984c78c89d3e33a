import assert from "node:assert/strict"
import { createServer as createHttpServer } from "node:http"
import { type AddressInfo, createServer, type Socket } from "node:net"
import { after, before, describe, test } from "node:test"
import { fileURLToPath } from "node:url"
import { metricValue, type OtlpReceiver, spawnTs, startOtlpReceiver } from "@keyway/testkit"
import { context, metrics, propagation, SpanKind, trace } from "@opentelemetry/api"
import {
  createMetricsRegistry,
  createMetricsServer,
  MetricsError,
  oldestAnswerSeconds,
  perScrape,
  startTelemetry,
  type Telemetry,
  TelemetryError,
} from "../src/index.ts"

describe("startTelemetry", () => {
  let receiver: OtlpReceiver
  let telemetry: Telemetry
  before(async () => {
    receiver = await startOtlpReceiver()
    // As the apps run: their endpoint comes from this variable, which the SDK reads too.
    process.env.OTEL_EXPORTER_OTLP_ENDPOINT = receiver.url
    // Left in a shell, these told the SDK to sample nothing and keep no attribute, while
    // startTelemetry said it exported: what is recorded is the config's to say.
    process.env.OTEL_TRACES_SAMPLER = "always_off"
    process.env.OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT = "0"
    process.env.OTEL_ATTRIBUTE_COUNT_LIMIT = "0"
    // Read by the batch processor for any setting not given: with this, forceFlush never
    // settled and the first export below waited for ever.
    process.env.OTEL_BSP_MAX_EXPORT_BATCH_SIZE = "0"
    telemetry = startTelemetry({
      serviceName: "telemetry-test",
      serviceVersion: "1.2.3",
      otlpEndpoint: receiver.url,
      resourceAttributes: { "keyway.site": "cloud" },
    })
  })
  after(async () => {
    await telemetry.shutdown()
    await receiver.stop()
    delete process.env.OTEL_EXPORTER_OTLP_ENDPOINT
    delete process.env.OTEL_TRACES_SAMPLER
    delete process.env.OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT
    delete process.env.OTEL_ATTRIBUTE_COUNT_LIMIT
    delete process.env.OTEL_BSP_MAX_EXPORT_BATCH_SIZE
  })

  test("exports spans over OTLP/HTTP JSON with the service's resource and parent links", async () => {
    const tracer = trace.getTracer("test")
    let traceparent = ""
    tracer.startActiveSpan("parent", (parent) => {
      const child = tracer.startSpan("child", { kind: SpanKind.PRODUCER, attributes: { n: 7 } })
      const carrier: Record<string, string> = {}
      propagation.inject(trace.setSpan(context.active(), child), carrier)
      traceparent = carrier.traceparent ?? ""
      child.end()
      parent.end()
    })
    await telemetry.forceFlush()
    assert.deepEqual(receiver.refused, [])
    const parent = receiver.spans().find((s) => s.name === "parent")
    const child = receiver.spans().find((s) => s.name === "child")
    assert.ok(parent && child)
    assert.equal(parent.serviceName, "telemetry-test")
    assert.equal(parent.resource["service.version"], "1.2.3")
    assert.equal(parent.resource["keyway.site"], "cloud", "the app's own resource attributes")
    assert.equal(child.traceId, parent.traceId)
    assert.equal(child.parentSpanId, parent.spanId)
    assert.equal(child.kind, 4)
    assert.equal(child.attributes.n, 7)
    // W3C propagation is registered: the header names the child span in the same trace.
    assert.equal(traceparent, `00-${child.traceId}-${child.spanId}-01`)
  })

  test("a caller's unsampled trace is recorded: an order is traced whatever the caller decided", async () => {
    // An ERP sampling 1% of its own traces sends `-00` on the rest; the writer adopts its
    // context, and every hop after followed that decision: the order had no trace at all.
    const caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    const parent = propagation.extract(context.active(), { traceparent: caller })
    const carrier: Record<string, string> = {}
    const span = trace.getTracer("test").startSpan("from an unsampling caller", {}, parent)
    propagation.inject(trace.setSpan(parent, span), carrier)
    span.end()
    await telemetry.forceFlush()
    const got = receiver.spans().find((s) => s.name === "from an unsampling caller")
    assert.ok(got, "exported")
    assert.equal(got.traceId, "0af7651916cd43dd8448eb211c80319c", "in the caller's trace")
    assert.match(carrier.traceparent ?? "", /-01$/, "and sampled for the hops after it")
  })

  // The logs half (logRecordProcessors: []) has no test: nothing in Keyway writes OTel logs,
  // and writing one here would need @opentelemetry/api-logs, which no package depends on.
  test("only traces leave over OTLP: no metrics pushed to the trace endpoint", async () => {
    // Something in the process using the OpenTelemetry metrics API (a library, say).
    metrics.getMeter("test").createCounter("things").add(1)
    // Shutdown flushes every exporter the SDK made; after() shuts down again, a no-op.
    await telemetry.shutdown()
    assert.deepEqual(receiver.elsewhere(), [])
  })

  test("a second start in one process is refused: the SDK's providers are global", () => {
    assert.throws(() => startTelemetry({ serviceName: "again" }), TelemetryError)
  })
})

describe("metrics", () => {
  test("labels take only their declared values: no MAC or IMEI label by mistake", () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    const tasks = m.counter({
      name: "tasks_total",
      help: "tasks",
      labels: { outcome: ["done", "dead"] },
    })
    tasks.inc({ outcome: "done" })
    assert.throws(() => tasks.inc({ outcome: "0A1B2C3D4E5F" as "done" }), MetricsError)
    assert.throws(() => tasks.inc({ mac: "0A1B2C3D4E5F" } as never), MetricsError)
  })

  test("collected metrics read their owner's value at each scrape", async () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    let total = 5
    let depth: number | undefined = 7
    m.collectedCounter({ name: "done_total", help: "done", collect: () => total })
    m.collectedGauge({ name: "depth", help: "depth", collect: async () => depth })
    const scrape = async () => (await m.render()).body
    assert.match(await scrape(), /^done_total 5$/m)
    assert.match(await scrape(), /^depth 7$/m)
    total = 8
    depth = undefined
    const body = await scrape()
    assert.match(body, /^done_total 8$/m)
    assert.match(body, /^depth 7$/m, "undefined leaves the last value")
    total = 2 // the owner started again: its 2 are new
    assert.match(await scrape(), /^done_total 10$/m)
  })

  test("a collected metric leaves with its owner; its name is refused while another reports it", async () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    const remove = m.collectedGauge({ name: "draining", help: "d", collect: () => 3 })
    assert.throws(
      () => m.collectedGauge({ name: "draining", help: "d", collect: () => 4 }),
      (err: Error) => err instanceof MetricsError && /reported by another owner/.test(err.message),
    )
    assert.match((await m.render()).body, /^draining 3$/m)
    remove()
    assert.doesNotMatch((await m.render()).body, /draining/, "gone with its owner")
    // The owner made again after it registers the name anew.
    m.collectedGauge({ name: "draining", help: "d", collect: () => 4 })
    assert.match((await m.render()).body, /^draining 4$/m)
  })

  test("a metric asked for again by name is the same series, and of the same kind only", async () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    const first = m.histogram({ name: "wait_seconds", help: "w" })
    const second = m.histogram({ name: "wait_seconds", help: "w" })
    first.observe(0.2)
    second.observe(0.3)
    assert.match((await m.render()).body, /^wait_seconds_count 2$/m)
    assert.throws(
      () => m.counter({ name: "wait_seconds", help: "w" }),
      (err: Error) =>
        err instanceof MetricsError && /registered already as a histogram/.test(err.message),
    )
  })

  test("latencies of hours (a leaf link cut, a task retried for two) fall in a bucket, not +Inf", async () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    const h = m.histogram({ name: "commit_to_done_seconds", help: "c" })
    h.observe(600)
    h.observe(7200)
    const body = (await m.render()).body
    assert.match(body, /^commit_to_done_seconds_bucket\{le="3600"\} 1$/m)
    assert.match(body, /^commit_to_done_seconds_bucket\{le="14400"\} 2$/m)
  })

  test("gauges fed by one query ask it once per scrape; a failed read keeps their values", async () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    let reads = 0
    let fail = false
    const read = perScrape(async () => {
      reads++
      await new Promise((r) => setTimeout(r, 10))
      if (fail) throw new Error("database gone")
      return { pending: 10 * reads, oldest: reads }
    })
    m.collectedGauge({ name: "pending", help: "p", collect: async () => (await read())?.pending })
    m.collectedGauge({ name: "oldest", help: "o", collect: async () => (await read())?.oldest })
    const scrape = async () => (await m.render()).body
    const first = await scrape()
    assert.equal(reads, 1)
    assert.match(first, /^pending 10$/m)
    assert.match(first, /^oldest 1$/m)
    const second = await scrape()
    assert.equal(reads, 2, "each scrape reads afresh")
    assert.match(second, /^pending 20$/m)
    fail = true
    const third = await scrape()
    assert.match(third, /^pending 20$/m)
    assert.match(third, /^oldest 2$/m)
  })

  test("how long ago a read last answered is a gauge: it grows while reads fail, and starts again", async () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    let reads = 0
    let fail = false
    const read = perScrape(async () => {
      reads++
      if (fail) throw new Error("database gone")
      return 1
    })
    m.collectedGauge({ name: "pending", help: "p", collect: read })
    m.collectedGauge({
      name: "read_age_seconds",
      help: "a",
      collect: () => oldestAnswerSeconds([read]),
    })
    const age = async () => metricValue((await m.render()).body, "read_age_seconds")!
    await age()
    assert.equal(reads, 1, "the age gauge shares the scrape's read")
    fail = true
    const failing = [await age()]
    for (let i = 0; i < 2; i++) {
      await new Promise((r) => setTimeout(r, 20))
      failing.push(await age())
    }
    assert.ok(failing[1]! > failing[0]! && failing[2]! > failing[1]!, `grows: ${failing}`)
    fail = false
    assert.ok((await age()) < failing[2]!, "an answer starts it again")
    assert.equal(reads, 5)
  })

  test("a read that does not answer holds up no scrape: its gauges keep their values, the rest is served", async () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    let reads = 0
    let answer: ((n: number) => void) | undefined
    const read = perScrape(() => {
      reads++
      if (reads !== 2) return Promise.resolve(reads === 1 ? 5 : 9)
      return new Promise<number>((resolve) => {
        answer = resolve
      })
    }, 50)
    m.collectedGauge({ name: "pending", help: "p", collect: read })
    m.counter({ name: "done_total", help: "d" }).inc(undefined, 3)
    assert.match((await m.render()).body, /^pending 5$/m)
    // Now stuck: waiting on a pool its drains hold, say. The scrape is answered all the same.
    const stuck = (await m.render()).body
    assert.match(stuck, /^done_total 3$/m)
    assert.match(stuck, /^pending 5$/m, "the gauge keeps its value")
    // The next scrape joins the read still in flight rather than start another.
    await m.render()
    assert.equal(reads, 2)
    // Once it has answered (too late for any scrape), the next scrape reads afresh.
    answer!(7)
    await new Promise((r) => setTimeout(r, 10))
    assert.match((await m.render()).body, /^pending 9$/m)
    assert.equal(reads, 3)
  })

  test("a read slower than every scrape's wait is still shown, one scrape late", async () => {
    const m = createMetricsRegistry({ defaultMetrics: false })
    let reads = 0
    // Always 100 ms, the scrape waits 30: a count over millions of unpublished rows, say.
    const read = perScrape(async () => {
      const n = ++reads
      await new Promise((r) => setTimeout(r, 100))
      return n * 1000
    }, 30)
    m.collectedGauge({ name: "pending", help: "p", collect: read })
    assert.match((await m.render()).body, /^pending 0$/m, "nothing has answered yet")
    await new Promise((r) => setTimeout(r, 120))
    // The first read answered between the scrapes: shown now, while the second is on its way.
    assert.match((await m.render()).body, /^pending 1000$/m)
    assert.equal(reads, 2)
  })

  test("/metrics serves the registry in the Prometheus text format", async () => {
    const m = createMetricsRegistry({ prefix: "keyway_" })
    m.counter({ name: "tasks_total", help: "tasks", labels: { outcome: ["done"] } }).inc(
      { outcome: "done" },
      3,
    )
    m.histogram({ name: "latency_seconds", help: "latency" }).observe(0.02)
    await using server = createMetricsServer({ registry: m, port: 0, host: "127.0.0.1" })
    await server.start()
    const res = await fetch(`${server.url}/metrics`)
    assert.equal(res.status, 200)
    assert.match(res.headers.get("content-type") ?? "", /text\/plain/)
    const body = await res.text()
    assert.match(body, /^keyway_tasks_total\{outcome="done"\} 3$/m)
    assert.match(body, /^keyway_latency_seconds_bucket\{le="0.025"\} 1$/m)
    assert.match(body, /^keyway_process_cpu_user_seconds_total /m, "process metrics")
    assert.equal((await fetch(`${server.url}/other`)).status, 404)
  })
})

test("without an endpoint, a context made active holds across an await, and is propagated", async () => {
  // In a process of its own: startTelemetry registers globals once per process.
  const child = spawnTs(
    fileURLToPath(new URL("./fixtures/context-across-await.ts", import.meta.url)),
  )
  await child.exited()
  assert.equal(child.exitCode, 0, child.lines.join("\n"))
  assert.deepEqual(child.json(), [
    { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", exporting: false },
  ])
})

test("with the SDK disabled from the environment, context is still propagated, and nothing said to export", async () => {
  // OTEL_SDK_DISABLED is read by the SDK itself; its start() then registered nothing.
  const child = spawnTs(
    fileURLToPath(new URL("./fixtures/context-across-await.ts", import.meta.url)),
    { OTLP_URL: "http://127.0.0.1:9", OTEL_SDK_DISABLED: "true" },
  )
  await child.exited()
  assert.equal(child.exitCode, 0, child.lines.join("\n"))
  assert.deepEqual(child.json(), [
    { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", exporting: false },
  ])
})

test("shutdown gives up after shutdownTimeoutMs on a receiver that takes the connection and never answers", async () => {
  const held: Socket[] = []
  const silent = createServer((socket) => held.push(socket))
  await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r))
  try {
    const { port } = silent.address() as AddressInfo
    const child = spawnTs(
      fileURLToPath(new URL("./fixtures/shutdown-stalled-receiver.ts", import.meta.url)),
      { OTLP_URL: `http://127.0.0.1:${port}` },
    )
    await child.exited()
    assert.equal(child.exitCode, 0, child.lines.join("\n"))
    assert.match(
      String(child.json()[0]?.shutdown),
      /gave up after 500 ms: the OTLP receiver at http:\/\/127\.0\.0\.1:\d+\/v1\/traces did not take the last spans/,
    )
  } finally {
    for (const socket of held) socket.destroy()
    silent.close()
  }
})

for (const [env, why] of [
  [{}, ""],
  [{ OTEL_LOG_LEVEL: "debug" }, ", OTEL_LOG_LEVEL set or not"],
] as const)
  test(`a failing export is reported to the logger given, once however often it fails${why}`, async () => {
    let requests = 0
    const refusing = createHttpServer((req, res) => {
      requests++
      req.resume()
      req.on("end", () => res.writeHead(500).end("receiver broken"))
    })
    await new Promise<void>((r) => refusing.listen(0, "127.0.0.1", r))
    try {
      const { port } = refusing.address() as AddressInfo
      const child = spawnTs(fileURLToPath(new URL("./fixtures/export-fails.ts", import.meta.url)), {
        OTLP_URL: `http://127.0.0.1:${port}`,
        ...env,
      })
      await child.exited()
      assert.equal(child.exitCode, 0, child.lines.join("\n"))
      // The SDK reads OTEL_LOG_LEVEL itself, and put a console logger of its own in place of
      // the one given: its reports went to the console, each export's. (That logger still
      // writes a line of its own before it is replaced.)
      assert.deepEqual(
        child.lines.filter((l) => !l.startsWith("{") && /receiver broken|OTLPExporter/.test(l)),
        [],
        "no report to the console",
      )
      const reports = child
        .json()
        .filter((l) => l.message === "telemetry: the OpenTelemetry SDK reports trouble")
      assert.ok(requests >= 3, `${requests} exports tried`)
      // One, the export's: the console logger's replacement is not reported as trouble.
      assert.equal(reports.length, 1, child.lines.join("\n"))
      assert.match(String(reports[0]!.report), /500|receiver broken/)
    } finally {
      refusing.close()
    }
  })
