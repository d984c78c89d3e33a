import {
  ConfigError,
  type Env,
  intEnv,
  postgresUrlEnv,
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
    databaseUrl: postgresUrlEnv(env),
    port: intEnv(env, "PORT", 8080, { min: 0, max: 65535 }),
    ...telemetryEnv(env, "esl-writer"),
  }
}
