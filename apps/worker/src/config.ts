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
} from "@keyway/app-config"
import { demoHandlers } from "./handlers/demo-handlers.ts"

export { ConfigError }

// The worker's whole environment, parsed once: a missing or malformed variable stops the
// process at start with its name, not minutes later inside a handler.

export interface WorkerAppConfig extends TelemetryEnv, NatsClientEnv {
  site: string
  databaseUrl: string
  redisUrl: string
  stream: string
  group: string
  /** Always set: the worker's handlers are the demo's, and it takes no other events. */
  filterSubject: string
  concurrency: number
  /**
   * Postgres connections at most (WORKER_PG_POOL_SIZE, default 20). Not tied to the
   * concurrency: claims, completions and re-checks go in shared batches, so the keys draining
   * at once need few connections (`just bench pipeline`'s worker: 20, for 256 keys at once),
   * and at 64 + 4 each, the two workers of `just up` alone could take more than the 100 a
   * default Postgres allows, leaving none for the relays, `just status` or `just admin`.
   */
  pgPoolSize: number
  /** Serve /metrics on this port (METRICS_PORT); unset: no metrics server. */
  metricsPort?: number
}

// The demo's two directions (DESIGN.md §1): the cloud handles what factories write, a
// factory handles the cloud's commands. Other sites name their stream, group and filter.
const siteDefaults: Record<string, { stream: string; group: string; filterSubject: string }> = {
  cloud: { stream: "FACTORY_IN", group: "cloud-demo", filterSubject: "factory.demo.item" },
  factory: { stream: "CLOUD_IN", group: "factory-demo", filterSubject: "cloud.demo.command" },
}

export function parseConfig(env: Env): WorkerAppConfig {
  const site = requiredEnv(env, "KEYWAY_SITE", "cloud")
  if (!/^[a-z][a-z0-9-]*$/.test(site)) {
    throw new ConfigError(`KEYWAY_SITE must be lowercase letters, digits and dashes, got ${site}`)
  }
  const defaults = siteDefaults[site]
  const stream = env.KEYWAY_STREAM?.trim() || defaults?.stream
  const group = env.KEYWAY_GROUP?.trim() || defaults?.group
  if (!stream || !group) {
    throw new ConfigError(
      `KEYWAY_STREAM and KEYWAY_GROUP are required for site ${site} (defaults exist only for ${Object.keys(siteDefaults).join(", ")})`,
    )
  }
  // nats.js refuses such a name before any request leaves, with an error the start's wait
  // takes for a passing one: `KEYWAY_GROUP=cloud.billing` waited for its stream for ever.
  for (const [name, value] of [
    ["KEYWAY_STREAM", stream],
    ["KEYWAY_GROUP", group],
  ] as const) {
    if (!/^[A-Za-z0-9_-]+$/.test(value)) {
      throw new ConfigError(
        `${name} must be letters, digits, - and _ (a JetStream name), got ${JSON.stringify(value)}`,
      )
    }
  }
  // The demo's filter belongs to the demo's stream and group: given to a group named
  // explicitly, its new durable would see only demo events, and for good (a durable's filter
  // is not changed afterwards). But this worker runs the demo's handlers only, and a group
  // without a filter takes every event of its stream: each of another topic was dead at once
  // as having no handler, holding its key under the default policy (block), with no word at
  // start. So such a group names its subjects itself.
  const isDemoGroup = stream === defaults?.stream && group === defaults?.group
  const filterSubject =
    env.KEYWAY_FILTER_SUBJECT?.trim() || (isDemoGroup ? defaults.filterSubject : undefined)
  if (!filterSubject) {
    throw new ConfigError(
      `KEYWAY_FILTER_SUBJECT is required for group ${group} on stream ${stream}: this worker handles the demo's events only (${Object.keys(demoHandlers).join(", ")}), and without a filter every other event of the stream would go dead as having no handler. Set it to the demo events' subject on that stream (such as factory.demo.item)${defaults ? `, or leave KEYWAY_STREAM and KEYWAY_GROUP unset for site ${site}'s demo group (${defaults.group} on ${defaults.stream})` : ""}`,
    )
  }
  return {
    metricsPort: metricsPortEnv(env),
    site,
    databaseUrl: postgresUrlEnv(env),
    ...natsClientEnv(env),
    redisUrl: redisUrlEnv(env),
    stream,
    group,
    filterSubject,
    // Bounded: each slot may hold a key's tasks and a connection's worth of work.
    concurrency: intEnv(env, "WORKER_CONCURRENCY", 64, { max: 10_000 }),
    pgPoolSize: intEnv(env, "WORKER_PG_POOL_SIZE", 20, { max: 1000 }),
    ...telemetryEnv(env, "keyway-worker"),
  }
}
