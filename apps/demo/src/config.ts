import {
  ConfigError,
  type Env,
  intEnv,
  natsServersEnv,
  perSecondEnv,
  postgresUrlEnv,
  requiredEnv,
  type TelemetryEnv,
  telemetryEnv,
} from "@keyway/app-config"

export { ConfigError }

// The demo's two processes read their environments here, once, before anything starts: a
// rate of 0 or "abc" made the pacing delay Infinity or NaN, which Node runs as 1 ms, and the
// demo wrote flat out with a warning per write. The site of `just demo` is its argument, not
// a variable: main.ts checks it against nats/streams/.

/** `just demo [site]` (main.ts): one site on the machine's shared servers. */
export interface DemoAppConfig {
  /** Created and migrated if need be; the shared server's `keyway` by default. */
  databaseUrl: string
  natsServers: string[]
  /** Demo events written per second (DEMO_RATE, default 50). */
  rate: number
  /** How long to run (DEMO_SECONDS); 0, the default, runs until Ctrl-C. */
  seconds: number
}

export function parseConfig(env: Env): DemoAppConfig {
  return {
    // The shared server's by default: `just demo` needs no setup on a developer's machine.
    databaseUrl: env.DATABASE_URL?.trim()
      ? postgresUrlEnv(env)
      : "postgres://postgres@127.0.0.1:5432/keyway",
    natsServers: natsServersEnv(env),
    rate: perSecondEnv(env, "DEMO_RATE", 50, 100_000),
    // At most 2,000,000 s: the stop is a Node timer, and one past 2^31 - 1 ms fires after
    // 1 ms, ending the demo at once.
    seconds: intEnv(env, "DEMO_SECONDS", 0, { min: 0, max: 2_000_000 }),
  }
}

/** The steady writer `just up` and compose run per site (writer.ts). */
export interface DemoWriterConfig extends TelemetryEnv {
  site: string
  databaseUrl: string
  /** Demo events written per second (DEMO_RATE, default 10). */
  rate: number
  /** How many keys the events spread over (DEMO_KEYS, default 20). */
  keys: number
}

export function parseWriterConfig(env: Env): DemoWriterConfig {
  const site = requiredEnv(env, "KEYWAY_SITE", "factory")
  return {
    site,
    // Checked as the relay's and worker's are: a malformed URL retried its writes for ever.
    databaseUrl: postgresUrlEnv(env),
    rate: perSecondEnv(env, "DEMO_RATE", 10, 100_000),
    keys: intEnv(env, "DEMO_KEYS", 20, { min: 1, max: 1_000_000 }),
    ...telemetryEnv(env, `keyway-demo-${site}`),
  }
}
