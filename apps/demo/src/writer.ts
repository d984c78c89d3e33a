// A site's steady demo traffic (`just up` runs one per site): one outbox event per
// transaction at DEMO_RATE per second, the way a service writes its domain changes. The
// relay publishes them; the other site's worker handles them. SIGTERM stops between
// transactions, so nothing is left half-written, and exits 0.
import { setTimeout as sleep } from "node:timers/promises"
import { createDb } from "@keyway/db"
import { enqueue } from "@keyway/outbox"
import { startTelemetry } from "@keyway/telemetry"
import { SpanStatusCode, trace } from "@opentelemetry/api"
import { ConfigError, type DemoWriterConfig, parseWriterConfig } from "./config.ts"
import { demoEvent, nextDue } from "./demo-event.ts"

function fail(message: string): never {
  console.error(`demo writer: ${message}`)
  process.exit(2)
}

let config: DemoWriterConfig
try {
  config = parseWriterConfig(process.env)
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  fail(err.message)
}
const { site, databaseUrl, rate, keys } = config

const log = (message: string, fields?: Record<string, unknown>) =>
  console.log(JSON.stringify({ level: "info", message, ...fields }))
// Each write in a span of its own, as a service's request would be: an event's trace then
// starts at the writer, and the relay's send and the worker's process continue it.
const telemetry = startTelemetry({
  otlpEndpoint: config.otlpEndpoint,
  serviceName: config.serviceName,
  logger: {
    warn: (message, fields) => console.log(JSON.stringify({ level: "warn", message, ...fields })),
  },
})
const tracer = trace.getTracer("@keyway/demo")
const db = createDb({
  connectionString: databaseUrl,
  max: 1,
  applicationName: `keyway-demo:${site}`,
})

let running = true
let written = 0
// Ends the pauses at once: at the slowest rate a pause is 100 s, far past the grace pm2 and
// compose give a stop before they kill.
const stopped = new AbortController()
const pause = (ms: number) => sleep(ms, undefined, { signal: stopped.signal }).catch(() => {})
const loop = (async () => {
  let due = Date.now()
  while (running) {
    try {
      await tracer.startActiveSpan("demo write", async (span) => {
        try {
          await db.transaction().execute((trx) => enqueue(trx, demoEvent(site, written, keys)))
        } catch (err) {
          span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message })
          throw err
        } finally {
          span.end()
        }
      })
      written++
    } catch (err) {
      // Postgres restarting: keep the process and its pace; the transaction left nothing.
      log("write failed; retrying", { error: (err as Error).message })
      await pause(1000)
      continue
    }
    if (written % Math.max(1, Math.round(rate * 60)) === 0) log("demo traffic", { site, written })
    due = nextDue(due, rate)
    await pause(Math.max(0, due - Date.now()))
  }
})()
log("demo writer started", { site, rate, keys })

async function shutdown(signal: string) {
  if (!running) return
  running = false
  stopped.abort()
  await loop
  await telemetry
    .shutdown()
    .catch((err) => log("telemetry shutdown failed", { error: String(err) }))
  await db.destroy()
  log("demo writer stopped", { signal, written })
  process.exit(0)
}
process.on("SIGTERM", () => void shutdown("SIGTERM"))
process.on("SIGINT", () => void shutdown("SIGINT"))
