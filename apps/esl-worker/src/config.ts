import {
  ConfigError,
  type Env,
  intEnv,
  metricsPortEnv,
  type NatsClientEnv,
  natsClientEnv,
  postgresUrlEnv,
  redisUrlEnv,
  requiredEnv,
  type TelemetryEnv,
  telemetryEnv,
  urlEnv,
} from "@keyway/app-config"
import { DEFAULT_SETTLE_MS } from "./aims-client.ts"
import { ESL_LABEL_POLICY } from "./create-esl-worker.ts"

export { ConfigError }

// The ESL worker's whole environment, parsed once at start; anything wrong stops the process
// with a message naming the variable.

export interface EslWorkerAppConfig extends TelemetryEnv, NatsClientEnv {
  databaseUrl: string
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
    settleMs: number
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
}

export function parseConfig(env: Env): EslWorkerAppConfig {
  const onDead = env.ESL_ON_DEAD?.trim() || "park"
  if (onDead !== "park" && onDead !== "block") {
    throw new ConfigError(`ESL_ON_DEAD must be park or block, got ${JSON.stringify(onDead)}`)
  }
  return {
    databaseUrl: postgresUrlEnv(env),
    ...natsClientEnv(env),
    redisUrl: redisUrlEnv(env),
    stream: requiredEnv(env, "ESL_STREAM", "CLOUD"),
    group: env.ESL_GROUP?.trim() || "esl-worker",
    // esl.label's origin site is the cloud; relays publish `<site>.<topic>`.
    filterSubject: env.ESL_FILTER_SUBJECT?.trim() || "cloud.esl.label",
    workerId: env.WORKER_ID?.trim() || undefined,
    aims: {
      baseUrl: urlEnv(env, "AIMS_URL", "https://eu.common.solumesl.com"),
      company: requiredEnv(env, "AIMS_COMPANY", "ACME"),
      store: requiredEnv(env, "AIMS_STORE", "S001"),
      username: requiredEnv(env, "AIMS_USERNAME", "esl@acme.example"),
      password: requiredEnv(env, "AIMS_PASSWORD", "…"),
      timeoutMs: intEnv(env, "AIMS_TIMEOUT_MS", 5000),
      settleMs: intEnv(env, "AIMS_SETTLE_MS", DEFAULT_SETTLE_MS),
    },
    concurrency: intEnv(env, "ESL_CONCURRENCY", 64),
    // The topic's own policy unless told otherwise: defaults written out again here had
    // drifted from it, and the process ran with those.
    maxAttempts: intEnv(env, "ESL_MAX_ATTEMPTS", ESL_LABEL_POLICY.maxAttempts),
    backoffMs: intEnv(env, "ESL_BACKOFF_MS", ESL_LABEL_POLICY.backoffMs),
    maxBackoffMs: intEnv(env, "ESL_MAX_BACKOFF_MS", ESL_LABEL_POLICY.maxBackoffMs),
    onDead,
    leaseMs: intEnv(env, "LEASE_MS", 15_000),
    pollIntervalMs: intEnv(env, "POLL_MS", 2000),
    recoveryIntervalMs: intEnv(env, "RECOVERY_MS", 5000),
    metricsPort: metricsPortEnv(env),
    ...telemetryEnv(env, "esl-worker"),
  }
}
