// What every app's src/config.ts needs to read its environment once and fail fast: a missing
// or malformed variable stops the process at start with the variable's name and an example,
// not minutes later in the middle of work. Libraries never read the environment themselves.

export type Env = Record<string, string | undefined>

export class ConfigError extends Error {
  override name = "ConfigError"
}

/** A variable that must be set; `example` shows the operator what a value looks like. */
export function requiredEnv(env: Env, name: string, example: string): string {
  const value = env[name]?.trim()
  if (!value) throw new ConfigError(`${name} is required (e.g. ${name}=${example})`)
  return value
}

/**
 * A positive whole number written in decimal digits, at most `max`; undefined for anything
 * else. For command-line flags: Number() also reads "0x10", "1e3" and " 7", and rounds past
 * 2^53.
 */
export function parsePositiveInt(raw: string, max = Number.MAX_SAFE_INTEGER): number | undefined {
  const n = /^[1-9][0-9]*$/.test(raw) ? Number(raw) : Number.NaN
  return Number.isSafeInteger(n) && n <= max ? n : undefined
}

/** An integer within bounds, or `fallback` when unset. */
export function intEnv(
  env: Env,
  name: string,
  fallback: number,
  bounds: { min?: number; max?: number } = {},
): number {
  const raw = env[name]?.trim()
  if (!raw) return fallback
  const value = Number(raw)
  const min = bounds.min ?? 1
  const max = bounds.max ?? Number.MAX_SAFE_INTEGER
  if (!Number.isInteger(value) || value < min || value > max) {
    const range = bounds.max === undefined ? `>= ${min}` : `from ${min} to ${max}`
    throw new ConfigError(`${name} must be an integer ${range}, got ${JSON.stringify(raw)}`)
  }
  return value
}

/** A required variable that must parse as a URL. */
export function urlEnv(env: Env, name: string, example: string): string {
  const value = requiredEnv(env, name, example)
  try {
    new URL(value)
  } catch {
    throw new ConfigError(`${name} must be a URL, got ${JSON.stringify(value)}`)
  }
  return value
}

/**
 * The port for an app's `/metrics` (METRICS_PORT; 0 picks a free one), or undefined when
 * unset: that app then serves no metrics.
 */
export function metricsPortEnv(env: Env): number | undefined {
  return env.METRICS_PORT?.trim()
    ? intEnv(env, "METRICS_PORT", 0, { min: 0, max: 65535 })
    : undefined
}

/** Where a process sends its spans, and under what name (the OpenTelemetry variables). */
export interface TelemetryEnv {
  /** OTLP/HTTP base URL (OTEL_EXPORTER_OTLP_ENDPOINT; Jaeger: http://host:4318); unset: none. */
  otlpEndpoint?: string
  /** OTEL_SERVICE_NAME, or the app's own name. */
  serviceName: string
}

export function telemetryEnv(env: Env, defaultServiceName: string): TelemetryEnv {
  return {
    otlpEndpoint: env.OTEL_EXPORTER_OTLP_ENDPOINT?.trim()
      ? urlEnv(env, "OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
      : undefined,
    serviceName: env.OTEL_SERVICE_NAME?.trim() || defaultServiceName,
  }
}
