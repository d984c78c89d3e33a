// The ESL writer's environment, parsed once at start.

export interface EslWriterAppConfig {
  databaseUrl: string
  /** HTTP port of the job API (and /metrics). */
  port: number
  otlpEndpoint?: string
  serviceName: string
}

export class ConfigError extends Error {
  override name = "ConfigError"
}

export function parseConfig(env: Record<string, string | undefined>): EslWriterAppConfig {
  const databaseUrl = env.DATABASE_URL?.trim()
  if (!databaseUrl) {
    throw new ConfigError(
      "DATABASE_URL is required (e.g. postgres://postgres@127.0.0.1:5432/keyway)",
    )
  }
  const rawPort = env.PORT?.trim() || "8080"
  const port = Number(rawPort)
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new ConfigError(`PORT must be a TCP port, got ${JSON.stringify(rawPort)}`)
  }
  return {
    databaseUrl,
    port,
    otlpEndpoint: env.OTEL_EXPORTER_OTLP_ENDPOINT?.trim() || undefined,
    serviceName: env.OTEL_SERVICE_NAME?.trim() || "esl-writer",
  }
}
