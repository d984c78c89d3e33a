// The ESL worker process: start as many as you like on one consumer group. SIGTERM lets each
// label finish its task in hand, then exits 0. Prints one JSON line per event of note.
import { handleStopSignals, retryUntilReady } from "@keyway/app-config"
import { assertMigrated, createDb } from "@keyway/db"
import type { KeyedConsumerLogger } from "@keyway/keyed-consumer"
import { closeNats, connectNats } from "@keyway/nats"
import { createMetricsRegistry, serveMetrics, startTelemetry } from "@keyway/telemetry"
import { Redis } from "ioredis"
import { ConfigError, parseConfig } from "./config.ts"
import { createEslWorker } from "./create-esl-worker.ts"

const logger: KeyedConsumerLogger = {
  info: (message, fields) => console.log(JSON.stringify({ level: "info", message, ...fields })),
  warn: (message, fields) => console.log(JSON.stringify({ level: "warn", message, ...fields })),
  error: (message, fields) => console.log(JSON.stringify({ level: "error", message, ...fields })),
}

let config: ReturnType<typeof parseConfig>
try {
  config = parseConfig(process.env)
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  console.error(`esl-worker: ${err.message}`)
  process.exit(2)
}

// Before anything that may wait for a server: a stop during startup ends the process.
const signals = handleStopSignals({
  name: "esl-worker",
  log: logger.info,
  logError: logger.error,
  stop: shutdown,
})

// First, so the libraries' tracers record into it from their first span.
const telemetry = startTelemetry({
  serviceName: config.serviceName,
  otlpEndpoint: config.otlpEndpoint,
  logger,
})
const metrics = createMetricsRegistry({ prefix: "keyway_" })
const untilReady = <T>(what: string, step: () => Promise<T>) =>
  retryUntilReady(step, { what, log: logger.warn })
// One line in the process's log format and exit 1 for what waiting cannot mend.
const { nc, db, redis, worker, metricsServer } = await start().catch(signals.failedToStart)
signals.started()
console.log(
  JSON.stringify({ started: config.workerId ?? process.pid, metrics: metricsServer?.url }),
)

async function shutdown(signal: string) {
  logger.info("esl-worker stopping", { signal })
  await worker.stop()
  // The last spans out first, once nothing makes more: the closes below have no bound of
  // their own (a pool waits for a connection in use), and a stop cut short at its limit
  // lost them. Lost too if the receiver is away; the stop is still clean.
  await telemetry
    .shutdown()
    .catch((err) => logger.warn("telemetry shutdown failed", { error: String(err) }))
  await metricsServer?.stop()
  await closeNats(nc)
  await db.destroy()
  redis.disconnect()
  console.log(JSON.stringify({ stopped: worker.status() }))
}

async function start() {
  const nc = await untilReady("NATS", () =>
    connectNats({
      servers: config.natsServers,
      name: `keyway-esl-worker:${config.workerId ?? process.pid}`,
      user: config.natsUser,
      pass: config.natsPass,
      inboxPrefix: config.natsInboxPrefix,
      waitForServer: false,
    }),
  )
  const db = createDb({
    connectionString: config.databaseUrl,
    max: Math.min(32, config.concurrency + 4),
    applicationName: "keyway-esl-worker",
  })
  // Ready means reachable and migrated: a schema behind the code waits like a server away.
  await untilReady("Postgres", () => assertMigrated(db))
  // Auto-pipelining: the lock commands of the keys draining at once share socket writes.
  const redis = new Redis(config.redisUrl, { maxRetriesPerRequest: 1, enableAutoPipelining: true })
  redis.on("error", (err) => logger.warn("redis error", { error: err.message }))
  // Reached before the worker says it started: the key locks are Redis', and without them no
  // task runs, while ingest goes on as if all were well. A refused password ends the process.
  await retryUntilReady(() => redis.ping(), {
    what: "Redis",
    log: logger.warn,
    attemptTimeoutMs: 5000,
  })

  const worker = createEslWorker({
    db,
    nats: nc,
    redis,
    stream: config.stream,
    group: config.group,
    filterSubject: config.filterSubject,
    workerId: config.workerId,
    aims: config.aims,
    policy: {
      maxAttempts: config.maxAttempts,
      backoffMs: config.backoffMs,
      maxBackoffMs: config.maxBackoffMs,
      onDead: config.onDead,
    },
    concurrency: config.concurrency,
    leaseMs: config.leaseMs,
    pollIntervalMs: config.pollIntervalMs,
    recoveryIntervalMs: config.recoveryIntervalMs,
    metrics,
    logger,
  })
  const metricsServer = await serveMetrics(metrics, config.metricsPort)
  await untilReady(`stream ${config.stream} on NATS`, () => worker.start())
  return { nc, db, redis, worker, metricsServer }
}
