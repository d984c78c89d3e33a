import { ConfigError, type Env, intEnv, requiredEnv } from "@keyway/app-config"

export { ConfigError }

// The ESL writer's environment, parsed once at start.

export interface EslWriterAppConfig {
  databaseUrl: string
  /** HTTP port of the job API (and /metrics). */
  port: number
  otlpEndpoint?: string
  serviceName: string
}

export function parseConfig(env: Env): EslWriterAppConfig {
  return {
    databaseUrl: requiredEnv(env, "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/keyway"),
    port: intEnv(env, "PORT", 8080, { min: 0, max: 65535 }),
    otlpEndpoint: env.OTEL_EXPORTER_OTLP_ENDPOINT?.trim() || undefined,
    serviceName: env.OTEL_SERVICE_NAME?.trim() || "esl-writer",
  }
}
