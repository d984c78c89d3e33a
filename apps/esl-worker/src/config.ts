// The ESL worker's whole environment, parsed once at start; anything wrong stops the process
// with a message naming the variable.

export interface EslWorkerAppConfig {
  databaseUrl: string
  natsServers: string[]
  natsUser?: string
  natsPass?: string
  redisUrl: string
  stream: string
  group: string
  filterSubject: string
  workerId?: string
  aims: {
    baseUrl: string
    company: string
    store: string
    username: string
    password: string
    timeoutMs: number
  }
  concurrency: number
  maxAttempts: number
  backoffMs: number
  maxBackoffMs: number
  onDead: "block" | "park"
  leaseMs: number
  pollIntervalMs: number
  recoveryIntervalMs: number
  /** Serve /metrics on this port; unset: no metrics server. */
  metricsPort?: number
  /** OTLP/HTTP base URL (Jaeger: http://host:4318); unset: no traces exported. */
  otlpEndpoint?: string
  serviceName: string
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

function int(env: Env, name: string, fallback: number, min = 1): number {
  const raw = env[name]?.trim()
  if (!raw) return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value < min) {
    throw new ConfigError(`${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`)
  }
  return value
}

function url(env: Env, name: string, example: string): string {
  const value = required(env, name, example)
  try {
    new URL(value)
  } catch {
    throw new ConfigError(`${name} must be a URL, got ${JSON.stringify(value)}`)
  }
  return value
}

export function parseConfig(env: Env): EslWorkerAppConfig {
  const onDead = env.ESL_ON_DEAD?.trim() || "park"
  if (onDead !== "park" && onDead !== "block") {
    throw new ConfigError(`ESL_ON_DEAD must be park or block, got ${JSON.stringify(onDead)}`)
  }
  const metricsPort = env.METRICS_PORT?.trim() ? int(env, "METRICS_PORT", 0, 0) : undefined
  return {
    databaseUrl: required(env, "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/keyway"),
    natsServers: (env.NATS_URL ?? "nats://127.0.0.1:4222").split(",").map((s) => s.trim()),
    natsUser: env.NATS_USER || undefined,
    natsPass: env.NATS_PASS || undefined,
    redisUrl: env.REDIS_URL?.trim() || "redis://127.0.0.1:6379",
    stream: required(env, "ESL_STREAM", "CLOUD"),
    group: env.ESL_GROUP?.trim() || "esl-worker",
    // esl.label's origin site is the cloud; relays publish `<site>.<topic>`.
    filterSubject: env.ESL_FILTER_SUBJECT?.trim() || "cloud.esl.label",
    workerId: env.WORKER_ID?.trim() || undefined,
    aims: {
      baseUrl: url(env, "AIMS_URL", "https://eu.common.solumesl.com"),
      company: required(env, "AIMS_COMPANY", "ACME"),
      store: required(env, "AIMS_STORE", "S001"),
      username: required(env, "AIMS_USERNAME", "esl@acme.example"),
      password: required(env, "AIMS_PASSWORD", "…"),
      timeoutMs: int(env, "AIMS_TIMEOUT_MS", 5000),
    },
    concurrency: int(env, "ESL_CONCURRENCY", 16),
    maxAttempts: int(env, "ESL_MAX_ATTEMPTS", 10),
    backoffMs: int(env, "ESL_BACKOFF_MS", 200),
    maxBackoffMs: int(env, "ESL_MAX_BACKOFF_MS", 30_000),
    onDead,
    leaseMs: int(env, "LEASE_MS", 15_000),
    pollIntervalMs: int(env, "POLL_MS", 2000),
    recoveryIntervalMs: int(env, "RECOVERY_MS", 5000),
    metricsPort,
    otlpEndpoint: env.OTEL_EXPORTER_OTLP_ENDPOINT?.trim() || undefined,
    serviceName: env.OTEL_SERVICE_NAME?.trim() || "esl-worker",
  }
}
