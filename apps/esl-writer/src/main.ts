// The ESL writer process: a small HTTP API in front of writeLabelJob/writePriceChange.
//   POST /label-jobs     {"jobId"?, "labels": [{"labelCode","productId","page"?,"frontPage"?}]}
//   POST /price-changes  {"jobId"?, "changes": [{"productId","priceMinor","currency"?,"name"?}]}
//   GET  /metrics
// Answers 201 {"jobId","tasks"}; or {"error"} naming what is wrong: 400 a request that is
// not UTF-8 JSON or not a valid job, 404 another path, 409 a job id used before or a product
// stored with a value no label can show, 413 a body over 4 MiB, 500 anything else.
import { createServer, type IncomingMessage, type ServerResponse } from "node:http"
import type { AddressInfo } from "node:net"
import { handleStopSignals, retryUntilReady } from "@keyway/app-config"
import { assertMigrated, createDb } from "@keyway/db"
import { EnqueueError } from "@keyway/outbox"
import { InvalidEventError } from "@keyway/schemas"
import { createMetricsRegistry, metricsHandler, startTelemetry } from "@keyway/telemetry"
import { propagation, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api"
import { ConfigError, parseConfig } from "./config.ts"
import { migrateEslSchema } from "./migrate-esl-schema.ts"
import {
  EslWriterError,
  JobExistsError,
  StoredProductError,
  writeLabelJob,
  writePriceChange,
} from "./write-esl-job.ts"

let config: ReturnType<typeof parseConfig>
try {
  config = parseConfig(process.env)
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  console.error(`esl-writer: ${err.message}`)
  process.exit(2)
}

const log =
  (level: string) =>
  (message: string, fields: Record<string, unknown> = {}) =>
    console.log(JSON.stringify({ level, message, ...fields }))
const telemetry = startTelemetry({
  serviceName: config.serviceName,
  otlpEndpoint: config.otlpEndpoint,
  logger: { warn: log("warn") },
})
const metrics = createMetricsRegistry({ prefix: "keyway_" })
const jobs = metrics.counter({
  name: "esl_jobs_total",
  help: "ESL jobs by kind and result",
  labels: { kind: ["label_job", "price_change"], result: ["ok", "rejected", "error"] },
})
const tasks = metrics.counter({
  name: "esl_tasks_enqueued_total",
  help: "ESL label tasks enqueued",
})
const db = createDb({
  connectionString: config.databaseUrl,
  max: 10,
  applicationName: "keyway-esl-writer",
})
// Before anything that may wait for a server: a stop during startup ends the process.
const signals = handleStopSignals({
  name: "esl-writer",
  log: log("info"),
  logError: log("error"),
  stop: shutdown,
})
// Ready means reachable and migrated: a schema behind the code waits like a server away.
await retryUntilReady(
  async () => {
    await assertMigrated(db)
    await migrateEslSchema(db)
  },
  { what: "Postgres", log: log("warn") },
)
const serveMetrics = metricsHandler(metrics)

// A job for every label of a large store is about 100 bytes a label: 4 MiB is 40,000 labels.
// Without a bound, one huge request would take the process's memory, and every other job.
const MAX_BODY_BYTES = 4 * 1024 * 1024

class BodyTooLargeError extends Error {
  override name = "BodyTooLargeError"
}

const readJson = async (req: IncomingMessage): Promise<any> => {
  const chunks: Buffer[] = []
  let size = 0
  // Past the bound, what is left is read and dropped rather than refused mid-upload: a client
  // whose request is cut off while it is still sending sees a broken connection, not the 413.
  for await (const c of req) {
    size += (c as Buffer).length
    if (size <= MAX_BODY_BYTES) chunks.push(c as Buffer)
  }
  if (size > MAX_BODY_BYTES) {
    throw new BodyTooLargeError(`request body over ${MAX_BODY_BYTES} bytes; split the job`)
  }
  let text: string
  try {
    // Fatal: a body in another encoding (an ERP's Latin-1 "Crème") was decoded with U+FFFD in
    // place of each byte it could not read, accepted, and drawn so on the shelf. A BOM is
    // dropped.
    text = utf8.decode(Buffer.concat(chunks))
  } catch {
    throw new BadBodyError("request body is not UTF-8 text; send the JSON as UTF-8")
  }
  try {
    return JSON.parse(text)
  } catch (err) {
    throw new BadBodyError(`request body is not JSON: ${(err as Error).message}`)
  }
}
const utf8 = new TextDecoder("utf-8", { fatal: true })
class BadBodyError extends Error {
  override name = "BadBodyError"
}
// Once stopping, every answer ends its connection: a keep-alive client would otherwise go on
// sending requests over it, and the grace period would cut one of them short.
const endConnectionIfStopping = (res: ServerResponse) => {
  if (signals.stopping) res.setHeader("connection", "close")
}

const reply = (res: ServerResponse, status: number, body: unknown) => {
  endConnectionIfStopping(res)
  const span = trace.getActiveSpan()
  span?.setAttribute("http.response.status_code", status)
  if (status >= 500) span?.setStatus({ code: SpanStatusCode.ERROR })
  res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body))
}

const tracer = trace.getTracer("@keyway/esl-writer")

const server = createServer(async (req, res) => {
  endConnectionIfStopping(res)
  const path = (req.url ?? "").split("?")[0]
  if (req.method === "GET" && path === "/metrics") return serveMetrics(req, res)
  const kind =
    path === "/label-jobs" ? "label_job" : path === "/price-changes" ? "price_change" : undefined
  if (req.method !== "POST" || !kind) return reply(res, 404, { error: "not found" })
  // The caller's trace (an ERP's traceparent) goes on through the job, its outbox rows and
  // every label push: one trace from the request that changed a price to the shelf.
  const parent = propagation.extract(ROOT_CONTEXT, req.headers)
  await tracer.startActiveSpan(
    `POST ${path}`,
    {
      kind: SpanKind.SERVER,
      attributes: { "http.request.method": "POST", "url.path": path, "http.route": path },
    },
    parent,
    async (span) => {
      try {
        await handleJob(req, res, kind)
      } finally {
        span.end()
      }
    },
  )
})

async function handleJob(
  req: IncomingMessage,
  res: ServerResponse,
  kind: "label_job" | "price_change",
) {
  try {
    // Checked whole by the writer, which names what is wrong.
    const body = await readJson(req)
    const result =
      kind === "label_job" ? await writeLabelJob(db, body) : await writePriceChange(db, body)
    jobs.inc({ kind, result: "ok" })
    tasks.inc({}, result.tasks.length)
    reply(res, 201, result)
  } catch (err) {
    if (err instanceof BodyTooLargeError) {
      jobs.inc({ kind, result: "rejected" })
      return reply(res, 413, { error: err.message })
    }
    if (err instanceof JobExistsError || err instanceof StoredProductError) {
      jobs.inc({ kind, result: "rejected" })
      return reply(res, 409, { error: err.message })
    }
    const bad =
      err instanceof BadBodyError ||
      err instanceof InvalidEventError ||
      err instanceof EnqueueError ||
      err instanceof EslWriterError
    jobs.inc({ kind, result: bad ? "rejected" : "error" })
    reply(res, bad ? 400 : 500, { error: (err as Error).message })
  }
}
// A server error after listen() (a failed accept, say) is logged; unheard, it would end the
// process and every job in flight. One at listen() (the port taken) still ends it.
server.once("listening", () =>
  server.on("error", (err) =>
    console.error(JSON.stringify({ level: "error", message: "http server", error: err.message })),
  ),
)
server.listen(config.port, () => {
  signals.started()
  const { port } = server.address() as AddressInfo
  console.log(JSON.stringify({ started: "esl-writer", port }))
})

async function shutdown() {
  // A request in hand finishes: its job commits or rolls back and its client hears which.
  // Cutting it instead could leave a committed job whose client, seeing no answer, sends it
  // again. close() stops accepting and closes idle keep-alive connections, the others close
  // after their answer (endConnectionIfStopping); what is still busy after the grace period
  // is cut.
  const closed = new Promise((resolve) => server.close(resolve))
  const grace = setTimeout(() => server.closeAllConnections(), 10_000)
  await closed
  clearTimeout(grace)
  // The last spans out first, once nothing makes more: the closes below have no bound of
  // their own (a pool waits for a connection in use), and a stop cut short at its limit
  // lost them. Lost too if the receiver is away; the stop is still clean.
  await telemetry
    .shutdown()
    .catch((err) => log("warn")("telemetry shutdown failed", { error: String(err) }))
  await db.destroy()
}
