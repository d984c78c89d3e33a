// The relay's whole environment, parsed once. Anything wrong stops the process at start with
// a message naming the variable, rather than failing later in the middle of a batch.

export interface RelayAppConfig {
  databaseUrl: string
  natsServers: string[]
  natsUser?: string
  natsPass?: string
  /** The user's own reply prefix (nats/README.md): required when NATS_USER is a Keyway user. */
  natsInboxPrefix?: string
  site: string
  /** Stream definitions to apply at start (nats/streams/<site>.json); none if unset. */
  streamsFile?: string
  batchSize: number
  window: number
  pollIntervalMs: number
  retentionHours: number
}

export class ConfigError extends Error {
  override name = "ConfigError"
}

type Env = Record<string, string | undefined>

function required(env: Env, name: string, example: string): string {
  const value = env[name]?.trim()
  if (!value) throw new ConfigError(`${name} is required (e.g. ${name}=${example})`)
  return value
}

function positiveInt(env: Env, name: string, fallback: number): number {
  const raw = env[name]?.trim()
  if (!raw) return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value <= 0) {
    throw new ConfigError(`${name} must be a positive integer, got ${JSON.stringify(raw)}`)
  }
  return value
}

export function parseConfig(env: Env): RelayAppConfig {
  const site = required(env, "KEYWAY_SITE", "cloud")
  if (!/^[a-z][a-z0-9-]*$/.test(site)) {
    throw new ConfigError(`KEYWAY_SITE must be lowercase letters, digits and dashes, got ${site}`)
  }
  return {
    databaseUrl: required(env, "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/keyway"),
    natsServers: (env.NATS_URL ?? "nats://127.0.0.1:4222").split(",").map((s) => s.trim()),
    natsUser: env.NATS_USER || undefined,
    natsPass: env.NATS_PASS || undefined,
    natsInboxPrefix: env.NATS_INBOX_PREFIX || undefined,
    site,
    streamsFile: env.KEYWAY_STREAMS_FILE || undefined,
    batchSize: positiveInt(env, "RELAY_BATCH_SIZE", 500),
    window: positiveInt(env, "RELAY_WINDOW", 256),
    pollIntervalMs: positiveInt(env, "RELAY_POLL_MS", 1000),
    retentionHours: positiveInt(env, "RELAY_RETENTION_HOURS", 24),
  }
}
