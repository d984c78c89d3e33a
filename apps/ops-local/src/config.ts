// The runner's environment, parsed once. Site ports and names are fixed in site-plan.ts
// (the compose files and nats/README.md agree with them); only what differs between
// machines is read here.
import { existsSync } from "node:fs"
import { ConfigError, perSecondEnv } from "@keyway/app-config"

export interface OpsConfig {
  /** The Postgres server; each site gets its own database on it (keyway_cloud, keyway_factory). */
  postgresUrl: string
  /** Events per second each site's demo writer enqueues. */
  demoRate: number
}

export { ConfigError }

export function parseOpsConfig(env: Record<string, string | undefined>): OpsConfig {
  const postgresUrl =
    env.KEYWAY_POSTGRES_URL?.trim() || "postgres://postgres@127.0.0.1:5432/postgres"
  try {
    new URL(postgresUrl)
  } catch {
    // Not repeated: it may hold a password (one with a `/` in it is what breaks the URL).
    throw new ConfigError(
      "KEYWAY_POSTGRES_URL is not a URL (postgres://user:password@host:port/db; a password with / or @ in it must be percent-encoded)",
    )
  }
  return { postgresUrl, demoRate: perSecondEnv(env, "DEMO_RATE", 10, 1000) }
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
