// The relay process: one per outbox database; start several and one is active while the
// others stand by. SIGTERM finishes the batch in flight, then exits 0.
import { applyStreams, connectNats, loadStreamDefinitions } from "@keyway/nats"
import { createRelay, type RelayLogger } from "@keyway/outbox"
import { createMetricsRegistry, serveMetrics } from "@keyway/telemetry"
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

const nc = await connectNats({
  servers: config.natsServers,
  name: `keyway-relay:${config.site}`,
  user: config.natsUser,
  pass: config.natsPass,
  inboxPrefix: config.natsInboxPrefix,
})
if (config.streamsFile) {
  await applyStreams(await jetstreamManager(nc), await loadStreamDefinitions(config.streamsFile))
}
const metrics = createMetricsRegistry({ prefix: "keyway_" })
const relay = createRelay({
  connectionString: config.databaseUrl,
  jetstream: jetstream(nc),
  connection: nc,
  site: config.site,
  batchSize: config.batchSize,
  window: config.window,
  pollIntervalMs: config.pollIntervalMs,
  busyPollMs: config.busyPollMs,
  retentionMs: config.retentionHours * 3600_000,
  logger,
  metrics,
})
const metricsServer = await serveMetrics(metrics, config.metricsPort)
await relay.start()
logger.info("relay started", { site: config.site, metrics: metricsServer?.url })

let stopping = false
async function shutdown(signal: string) {
  if (stopping) return
  stopping = true
  logger.info("relay stopping", { signal })
  await relay.stop()
  await metricsServer?.stop()
  await nc.drain()
  logger.info("relay stopped", relay.status() as unknown as Record<string, unknown>)
  process.exit(0)
}
process.on("SIGTERM", () => void shutdown("SIGTERM"))
process.on("SIGINT", () => void shutdown("SIGINT"))
