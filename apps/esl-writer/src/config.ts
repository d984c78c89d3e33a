import {
  ConfigError,
  type Env,
  intEnv,
  requiredEnv,
  type TelemetryEnv,
  telemetryEnv,
} from "@keyway/app-config"

export { ConfigError }

// The ESL writer's environment, parsed once at start.

export interface EslWriterAppConfig extends TelemetryEnv {
  databaseUrl: string
  /** HTTP port of the job API (and /metrics). */
  port: number
}

export function parseConfig(env: Env): EslWriterAppConfig {
  return {
    databaseUrl: requiredEnv(env, "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/keyway"),
    port: intEnv(env, "PORT", 8080, { min: 0, max: 65535 }),
    ...telemetryEnv(env, "esl-writer"),
  }
}
