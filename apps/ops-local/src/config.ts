// The runner's environment, parsed once. Site ports and names are fixed in site-plan.ts
// (the compose files and nats/README.md agree with them); only what differs between
// machines is read here.
import { existsSync } from "node:fs"
import { ConfigError, perSecondEnv, postgresUrlEnv } from "@keyway/app-config"

export interface OpsConfig {
  /** The Postgres server; each site gets its own database on it (keyway_cloud, keyway_factory). */
  postgresUrl: string
  /** Events per second each site's demo writer enqueues. */
  demoRate: number
}

export { ConfigError }

export function parseOpsConfig(env: Record<string, string | undefined>): OpsConfig {
  return { postgresUrl: parsePostgresUrl(env), demoRate: perSecondEnv(env, "DEMO_RATE", 10, 1000) }
}

/** KEYWAY_POSTGRES_URL alone: what `status` reads, which a bad DEMO_RATE must not stop. */
export function parsePostgresUrl(env: Record<string, string | undefined>): string {
  // Checked as every app checks DATABASE_URL: a value pg would misread (`localhost:5432` is a
  // URL of scheme "localhost:") failed only once both sites' servers were up, or went to a
  // database nobody meant.
  let value = env.KEYWAY_POSTGRES_URL?.trim() || "postgres://postgres@127.0.0.1:5432/postgres"
  // A server's URL: each site's database replaces its path, so one without a database is
  // fine here, and names the maintenance database for the steps that need one.
  try {
    const url = new URL(value)
    if (url.host && (url.pathname === "" || url.pathname === "/")) {
      url.pathname = "/postgres"
      value = url.toString()
    }
  } catch {} // not a URL: postgresUrlEnv says so, without repeating it
  return postgresUrlEnv({ KEYWAY_POSTGRES_URL: value }, "KEYWAY_POSTGRES_URL")
}

// Debian installs nats-server under /usr/sbin, which is not on every user's PATH.
const firstExisting = (name: string, candidates: string[]) =>
  candidates.find((path) => existsSync(path)) ?? name

export const binaries = {
  nodeBinary: process.execPath,
  natsServerBinary: firstExisting("nats-server", [
    "/usr/sbin/nats-server",
    "/usr/local/bin/nats-server",
  ]),
  redisServerBinary: firstExisting("redis-server", [
    "/usr/bin/redis-server",
    "/usr/local/bin/redis-server",
  ]),
}
