// A site's worker process: one member of its consumer group on the site's copy of the other
// site's stream. Start several and they share the group's keys. SIGTERM lets each key finish
// the event in hand, then exits 0.
import { handleStopSignals, retryUntilReady } from "@keyway/app-config"
import { assertMigrated, createDb } from "@keyway/db"
import { createKeyedConsumer, type KeyedConsumerLogger } from "@keyway/keyed-consumer"
import { closeNats, connectNats } from "@keyway/nats"
import { createMetricsRegistry, serveMetrics, startTelemetry } from "@keyway/telemetry"
import { Redis } from "ioredis"
import { ConfigError, parseConfig, type WorkerAppConfig } from "./config.ts"
import { demoHandlers, ensureDemoEffectTable } from "./handlers/demo-handlers.ts"

const logger: KeyedConsumerLogger = {
  info: (message, fields) => console.log(JSON.stringify({ level: "info", message, ...fields })),
  warn: (message, fields) => console.log(JSON.stringify({ level: "warn", message, ...fields })),
  error: (message, fields) => console.log(JSON.stringify({ level: "error", message, ...fields })),
}

let config: WorkerAppConfig
try {
  config = parseConfig(process.env)
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  console.error(`worker: ${err.message}`)
  process.exit(2)
}

// Before anything that may wait for a server: a stop during startup ends the process.
const signals = handleStopSignals({
  name: "worker",
  log: logger.info,
  logError: logger.error,
  stop: shutdown,
})
// Before the consumer's first span: each handler's `process` span joins its event's trace.
const telemetry = startTelemetry({
  serviceName: config.serviceName,
  otlpEndpoint: config.otlpEndpoint,
  logger,
  resourceAttributes: { "keyway.site": config.site },
})
const untilReady = <T>(what: string, step: () => Promise<T>) =>
  retryUntilReady(step, { what, log: logger.warn })

// One line in the process's log format and exit 1 for what waiting cannot mend.
const { db, redis, nc, consumer, metricsServer } = await start().catch(signals.failedToStart)
signals.started()
logger.info("worker started", {
  site: config.site,
  stream: config.stream,
  group: config.group,
  metrics: metricsServer?.url,
})

async function start() {
  const db = createDb({
    connectionString: config.databaseUrl,
    max: config.pgPoolSize,
    applicationName: `keyway-worker:${config.site}`,
  })
  // Ready means reachable and migrated: a schema behind the code waits like a server away.
  await untilReady("Postgres", async () => {
    await assertMigrated(db)
    await ensureDemoEffectTable(db)
  })
  // Auto-pipelining: the lock commands of the keys draining at once share socket writes.
  const redis = new Redis(config.redisUrl, { enableAutoPipelining: true })
  // ioredis reconnects by itself; without a listener an outage would print a stack per retry.
  redis.on("error", (err) => logger.warn("redis", { error: err.message }))
  // Reached before the worker says it started: the key locks are Redis', and without them no
  // task runs, while ingest goes on as if all were well. A refused password ends the process.
  await retryUntilReady(() => redis.ping(), {
    what: "Redis",
    log: logger.warn,
    attemptTimeoutMs: 5000,
  })
  const nc = await untilReady("NATS", () =>
    connectNats({
      servers: config.natsServers,
      name: `keyway-worker:${config.site}:${config.group}`,
      user: config.natsUser,
      pass: config.natsPass,
      inboxPrefix: config.natsInboxPrefix,
      waitForServer: false,
    }),
  )
  const metrics = createMetricsRegistry({ prefix: "keyway_" })
  const consumer = createKeyedConsumer({
    group: config.group,
    stream: config.stream,
    filterSubject: config.filterSubject,
    nats: nc,
    db,
    redis,
    handlers: demoHandlers,
    concurrency: config.concurrency,
    logger,
    metrics,
  })
  const metricsServer = await serveMetrics(metrics, config.metricsPort)
  await untilReady(`stream ${config.stream} on NATS`, () => consumer.start())
  return { db, redis, nc, consumer, metricsServer }
}

async function shutdown(signal: string) {
  logger.info("worker stopping", { signal })
  await consumer.stop()
  // The last spans out first, once nothing makes more: the closes below have no bound of
  // their own (a pool waits for a connection in use), and a stop cut short at its limit
  // lost them. Lost too if the receiver is away; the stop is still clean.
  await telemetry
    .shutdown()
    .catch((err) => logger.warn("telemetry shutdown failed", { error: String(err) }))
  await metricsServer?.stop()
  await closeNats(nc)
  redis.disconnect()
  await db.destroy()
  logger.info("worker stopped", consumer.status() as unknown as Record<string, unknown>)
}
