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

// Node's timers take at most 2^31 - 1 ms; a longer one fires after 1 ms (with a warning), so
// a poll interval of a month would poll a thousand times a second.
const MAX_TIMER_MS = 2 ** 31 - 1

/**
 * An integer within bounds written in decimal digits, or `fallback` when unset. The default
 * upper bound is the longest timer Node can set, since most of these are milliseconds.
 */
export function intEnv(
  env: Env,
  name: string,
  fallback: number,
  bounds: { min?: number; max?: number } = {},
): number {
  const raw = env[name]?.trim()
  if (!raw) return fallback
  // Not Number(): it also reads "0x10", "1e3" and "" as numbers.
  const value = /^-?[0-9]+$/.test(raw) ? Number(raw) : Number.NaN
  const min = bounds.min ?? 1
  const max = bounds.max ?? MAX_TIMER_MS
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new ConfigError(
      `${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(raw)}`,
    )
  }
  return value
}

/**
 * A rate per second written as a decimal number ("50", "0.5"), or `fallback` when unset. At
 * least 0.01 (one every 100 s): the pause between two events is a Node timer, and one longer
 * than Node can set fires after 1 ms, so a tiny rate ran flat out.
 */
export function perSecondEnv(env: Env, name: string, fallback: number, max: number): number {
  const raw = env[name]?.trim()
  if (!raw) return fallback
  // Not Number(): it also reads "1e3" and "0x10".
  const value = /^[0-9]+(\.[0-9]+)?$/.test(raw) ? Number(raw) : Number.NaN
  if (!(value >= 0.01 && value <= max)) {
    throw new ConfigError(
      `${name} must be a number of events per second from 0.01 to ${max}, got ${JSON.stringify(raw)}`,
    )
  }
  return value
}

/**
 * NATS_URL: one or more servers, comma-separated, each `nats://host:port` or `host:port`,
 * without credentials (NATS_USER, NATS_PASS); a default when unset. nats.js takes a bad entry for a server that is down, and waits for
 * it for ever.
 */
export function natsServersEnv(env: Env, fallback = "nats://127.0.0.1:4222"): string[] {
  const raw = env.NATS_URL?.trim() || fallback
  const servers = raw.split(",").map((s) => s.trim())
  for (const [i, server] of servers.entries()) {
    let url: URL | undefined
    try {
      url = new URL(server.includes("://") ? server : `nats://${server}`)
    } catch {}
    // nats.js drops any other scheme (tls://, ws://) and connects in plain TCP. The value is
    // not repeated: operators of other NATS clients put user:password@ in it.
    if (!url?.hostname || url.protocol !== "nats:") {
      throw new ConfigError(
        `NATS_URL must be comma-separated servers like nats://127.0.0.1:4222 or 127.0.0.1:4222; server ${i + 1} of ${servers.length} is not one`,
      )
    }
    // nats.js reads only host and port from a server URL: a user and password written into
    // it were dropped, and the process connected as nobody and was refused, or waited.
    if (url.username || url.password) {
      throw new ConfigError(
        `NATS_URL server ${i + 1} of ${servers.length} carries a user or password, which the NATS client ignores: give them in NATS_USER and NATS_PASS`,
      )
    }
  }
  return servers
}

/**
 * NATS_USER, NATS_PASS and NATS_INBOX_PREFIX, each unset when empty. A password without a
 * user is refused: nats.js sends a password only beside a user, so the process connected as
 * nobody and the server's "Authorization Violation" said nothing of NATS_USER.
 */
export function natsAuthEnv(env: Env): { user?: string; pass?: string; inboxPrefix?: string } {
  const user = env.NATS_USER || undefined
  const pass = env.NATS_PASS || undefined
  if (pass !== undefined && user === undefined) {
    throw new ConfigError("NATS_PASS is set without NATS_USER: the NATS client sends neither")
  }
  // A stray "\r" (a file saved on Windows) is part of the user, and of the inbox prefix
  // derived from it: the server's refusal would not say why.
  if (user !== undefined && /[\s\p{Cc}]/u.test(user)) {
    throw new ConfigError("NATS_USER holds a space or a control character")
  }
  const inboxPrefix = env.NATS_INBOX_PREFIX || undefined
  // Refused by nats.js only once connecting, where waiting for the server retried it for
  // ever; a space it sends on, breaking the protocol line. `_INBOX_cloud-worker.>`, copied
  // from a permission in nats/, is the likely mistake: the prefix is that without `.>`.
  if (inboxPrefix !== undefined && !SUBJECT_PREFIX.test(inboxPrefix)) {
    throw new ConfigError(
      `NATS_INBOX_PREFIX ${JSON.stringify(inboxPrefix)} must be subject tokens without wildcards (such as "_INBOX_cloud-worker", not "_INBOX_cloud-worker.>")`,
    )
  }
  return { user, pass, inboxPrefix }
}

/** The NATS client settings every app takes, under the names its config carries. */
export interface NatsClientEnv {
  natsServers: string[]
  natsUser?: string
  natsPass?: string
  /** The reply prefix; unset, the user's own (nats/README.md), or `_INBOX` without a user. */
  natsInboxPrefix?: string
}

/** NATS_URL, NATS_USER, NATS_PASS and NATS_INBOX_PREFIX, each checked as above. */
export function natsClientEnv(env: Env): NatsClientEnv {
  const auth = natsAuthEnv(env)
  return {
    natsServers: natsServersEnv(env),
    natsUser: auth.user,
    natsPass: auth.pass,
    natsInboxPrefix: auth.inboxPrefix,
  }
}

/** Dot-separated subject tokens: no wildcard, no whitespace, no empty token. */
const SUBJECT_PREFIX = /^[^\s.*>]+(\.[^\s.*>]+)*$/

/** DATABASE_URL, required: a postgres:// or postgresql:// URL, as pg reads it. */
export function postgresUrlEnv(env: Env, name = "DATABASE_URL"): string {
  const example = "postgres://postgres@127.0.0.1:5432/keyway"
  const value = requiredEnv(env, name, example)
  let url: URL | undefined
  try {
    url = new URL(value)
  } catch {}
  if (!url || !/^postgres(ql)?:$/.test(url.protocol)) {
    // Not repeated: it may hold a password, and one with a / in it (as base64 ones have) is
    // the usual reason it does not parse.
    throw new ConfigError(
      `${name} must be a URL like ${example}, got a value that is not one${url ? "" : " (a password with / or @ in it must be percent-encoded)"}`,
    )
  }
  // pg decodes the user, password and database when a client is made: a
  // malformed escape (`%E9`, a Latin-1 é encoded by hand) threw there, and the process waited
  // for Postgres for ever, logging "URI malformed" with no word of DATABASE_URL.
  for (const [part, text, decode] of [
    ["user", url.username, decodeURIComponent],
    ["password", url.password, decodeURIComponent],
    ["host", url.hostname, decodeURIComponent],
    // The database name, as pg decodes it.
    ["database name", url.pathname, decodeURI],
  ] as const) {
    try {
      decode(text)
    } catch {
      throw new ConfigError(
        `${name}'s ${part} holds a % that does not start an escape of UTF-8: write a % itself as %25`,
      )
    }
  }
  // pg falls back on a database named as the user: `migrate` created Keyway's tables in
  // `postgres`, and the apps ran on them, or failed there with "relation does not exist".
  if (url.pathname === "" || url.pathname === "/") {
    throw new ConfigError(`${name} names no database: end it with one, as in ${example}`)
  }
  // Read by @keyway/db's connectTimeoutMillis as libpq reads it; a bad one failed there, as
  // the pool was made, with a stack trace instead of this message and exit 2.
  const timeout = url.searchParams.get("connect_timeout")
  if (timeout !== null && timeout !== "" && !/^\s*[-+]?\d+\s*$/.test(timeout)) {
    throw new ConfigError(
      `${name}'s connect_timeout must be a whole number of seconds (0 for no limit), not ${JSON.stringify(timeout)}`,
    )
  }
  return value
}

/**
 * REDIS_URL: `redis://[[user]:password@]host[:port][/db]` (or `rediss://`), a default when
 * unset. ioredis parses it only when the client is made, after the other servers are waited
 * for, and its error carries the value, password and all.
 */
export function redisUrlEnv(env: Env, fallback = "redis://127.0.0.1:6379"): string {
  const value = env.REDIS_URL?.trim() || fallback
  let url: URL | undefined
  try {
    url = new URL(value)
  } catch {}
  if (!url?.hostname || !/^rediss?:$/.test(url.protocol)) {
    throw new ConfigError(
      "REDIS_URL must be a URL like redis://127.0.0.1:6379 or redis://:password@host:6379/0, got a value that is not one (a password with / ? # @ or % in it must be percent-encoded)",
    )
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
  const name = "OTEL_EXPORTER_OTLP_ENDPOINT"
  const endpoint = env[name]?.trim() ? urlEnv(env, name, "http://localhost:4318") : undefined
  if (endpoint !== undefined) {
    // `jaeger:4318` parses as a URL of scheme "jaeger:", and the exporter then failed at start
    // with a stack trace; `…/v1/traces` sent every span to …/v1/traces/v1/traces, a 404 that
    // nothing logs. The variable is the base URL, as OpenTelemetry defines it.
    const url = new URL(endpoint)
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new ConfigError(
        `${name} must be an http(s) URL such as http://jaeger:4318, got ${JSON.stringify(endpoint)}`,
      )
    }
    if (/\/v1\/traces\/?$/.test(url.pathname)) {
      throw new ConfigError(
        `${name} is the receiver's base URL (http://jaeger:4318): /v1/traces is added to it, got ${JSON.stringify(endpoint)}`,
      )
    }
  }
  return {
    otlpEndpoint: endpoint,
    serviceName: env.OTEL_SERVICE_NAME?.trim() || defaultServiceName,
  }
}
