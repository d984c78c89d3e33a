import {
  ConfigError,
  type Env,
  intEnv,
  metricsPortEnv,
  type NatsClientEnv,
  natsClientEnv,
  postgresUrlEnv,
  requiredEnv,
  type TelemetryEnv,
  telemetryEnv,
} from "@keyway/app-config"

export { ConfigError }

// The relay's whole environment, parsed once. Anything wrong stops the process at start with
// a message naming the variable, rather than failing later in the middle of a batch.

export interface RelayAppConfig extends TelemetryEnv, NatsClientEnv {
  databaseUrl: string
  site: string
  /** Stream definitions to apply at start (nats/streams/<site>.json); none if unset. */
  streamsFile?: string
  batchSize: number
  batchBytes: number
  window: number
  pollIntervalMs: number
  /** The pause between claims while events flow (createRelay's busyPollMs). */
  busyPollMs: number
  retentionHours: number
  /** Serve /metrics on this port (METRICS_PORT); unset: no metrics server. */
  metricsPort?: number
}

export function parseConfig(env: Env): RelayAppConfig {
  const site = requiredEnv(env, "KEYWAY_SITE", "cloud")
  // At most 64, as createRelay takes it: longer, it was refused only once Postgres and NATS
  // had been waited for, as a crash instead of this line and exit 2.
  if (!/^[a-z][a-z0-9-]{0,63}$/.test(site)) {
    throw new ConfigError(
      `KEYWAY_SITE must be 1-64 lowercase letters, digits and dashes, starting with a letter, got ${site}`,
    )
  }
  return {
    metricsPort: metricsPortEnv(env),
    databaseUrl: postgresUrlEnv(env),
    ...natsClientEnv(env),
    site,
    streamsFile: env.KEYWAY_STREAMS_FILE || undefined,
    // Bounded: a batch is claimed into memory whole, and a window of PubAcks is as many
    // messages in flight.
    batchSize: intEnv(env, "RELAY_BATCH_SIZE", 500, { max: 10_000 }),
    batchBytes: intEnv(env, "RELAY_BATCH_BYTES", 16 * 1024 * 1024),
    window: intEnv(env, "RELAY_WINDOW", 256, { max: 10_000 }),
    pollIntervalMs: intEnv(env, "RELAY_POLL_MS", 1000),
    busyPollMs: intEnv(env, "RELAY_BUSY_POLL_MS", 3),
    retentionHours: intEnv(env, "RELAY_RETENTION_HOURS", 24, { max: 24 * 365 * 10 }),
    ...telemetryEnv(env, "keyway-relay"),
  }
}
