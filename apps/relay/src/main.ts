// The relay process: one per outbox database; start several and one is active while the
// others stand by. SIGTERM finishes the batch in flight, then exits 0.
import { handleStopSignals, retryUntilReady } from "@keyway/app-config"
import { assertMigrated, createDb } from "@keyway/db"
import { applyStreams, closeNats, connectNats, loadStreamDefinitions } from "@keyway/nats"
import { createRelay, type RelayLogger } from "@keyway/outbox"
import { createMetricsRegistry, serveMetrics, startTelemetry } from "@keyway/telemetry"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import { ConfigError, parseConfig } from "./config.ts"

const logger: RelayLogger = {
  info: (message, fields) => console.log(JSON.stringify({ level: "info", message, ...fields })),
  warn: (message, fields) => console.log(JSON.stringify({ level: "warn", message, ...fields })),
  error: (message, fields) => console.log(JSON.stringify({ level: "error", message, ...fields })),
}

let config: ReturnType<typeof parseConfig>
try {
  config = parseConfig(process.env)
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  console.error(`relay: ${err.message}`)
  process.exit(2)
}

// Before anything that may wait for a server: a stop during startup ends the process.
const signals = handleStopSignals({
  name: "relay",
  log: logger.info,
  logError: logger.error,
  stop: shutdown,
})
// Before the relay's first span: each event's `send` span joins its writer's trace.
const telemetry = startTelemetry({
  serviceName: config.serviceName,
  otlpEndpoint: config.otlpEndpoint,
  logger,
  resourceAttributes: { "keyway.site": config.site },
})

const untilReady = <T>(what: string, step: () => Promise<T>) =>
  retryUntilReady(step, { what, log: logger.warn })
// One line in the process's log format and exit 1 for what waiting cannot mend.
const { nc, relay, metricsServer } = await start().catch(signals.failedToStart)
signals.started()
logger.info("relay started", { site: config.site, metrics: metricsServer?.url })

async function shutdown(signal: string) {
  logger.info("relay stopping", { signal })
  await relay.stop()
  // The last spans out first, once nothing makes more: the closes below have no bound of
  // their own (a pool waits for a connection in use), and a stop cut short at its limit
  // lost them. Lost too if the receiver is away; the stop is still clean.
  await telemetry
    .shutdown()
    .catch((err) => logger.warn("telemetry shutdown failed", { error: String(err) }))
  await metricsServer?.stop()
  await closeNats(nc)
  logger.info("relay stopped", relay.status() as unknown as Record<string, unknown>)
}

async function start() {
  // Read before connecting: a bad file is reported at once, with NATS up or not.
  const streams = config.streamsFile ? await loadStreamDefinitions(config.streamsFile) : []
  // Ready means reachable and migrated: a schema behind the code waits like a server away. The
  // relay's sessions are pg connections of its own; the check needs a Kysely for a moment.
  const schemaCheck = createDb({
    connectionString: config.databaseUrl,
    max: 1,
    applicationName: "keyway-relay",
  })
  await untilReady("Postgres", () => assertMigrated(schemaCheck)).finally(() =>
    schemaCheck.destroy(),
  )
  const nc = await untilReady("NATS", () =>
    connectNats({
      servers: config.natsServers,
      name: `keyway-relay:${config.site}`,
      user: config.natsUser,
      pass: config.natsPass,
      inboxPrefix: config.natsInboxPrefix,
      waitForServer: false,
    }),
  )
  if (streams.length > 0) {
    // Connected is not ready: JetStream answers only once it has recovered its store.
    await untilReady("JetStream (applying streams)", async () =>
      applyStreams(await jetstreamManager(nc), streams),
    ).catch((err: Error) => {
      // Refused for good (what waits for a server was retried above): one line, for pm2's log.
      logger.error("relay cannot start: its stream definitions cannot be applied", {
        file: config.streamsFile,
        error: err.message,
      })
      process.exit(1)
    })
  }
  const metrics = createMetricsRegistry({ prefix: "keyway_" })
  const relay = createRelay({
    connectionString: config.databaseUrl,
    jetstream: jetstream(nc),
    connection: nc,
    site: config.site,
    batchSize: config.batchSize,
    batchBytes: config.batchBytes,
    window: config.window,
    pollIntervalMs: config.pollIntervalMs,
    busyPollMs: config.busyPollMs,
    retentionMs: config.retentionHours * 3600_000,
    logger,
    metrics,
  })
  const metricsServer = await serveMetrics(metrics, config.metricsPort)
  await relay.start()
  return { nc, relay, metricsServer }
}
