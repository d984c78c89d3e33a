// What `just up` runs for each site on one machine: ports, databases, users and the pm2
// process list. Pure data and functions, so the compose test can hold ops/compose/ to the
// same numbers and names instead of a second copy of them.
import { createHash } from "node:crypto"
import { readFileSync } from "node:fs"
import { dirname, join, resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { inboxPrefixFor, leafRemoteUrl } from "@keyway/nats"

export type SiteName = "cloud" | "factory"
export const SITE_NAMES: readonly SiteName[] = ["cloud", "factory"]

export interface SitePlan {
  site: SiteName
  /** Relative to the repository root. */
  natsConfig: string
  natsPort: number
  natsHttpPort: number
  /** The hub's leafnode listener; only the cloud has one. */
  leafPort?: number
  redisPort: number
  database: string
  streamsFile: string
  /** The streams this site holds: its origin stream and its copy of the other site's. */
  streams: { origin: string; inbound: string }
  relayUser: string
  worker: { user: string; group: string; stream: string; filterSubject: string }
  /** Streams, consumers and tooling (`just up`, `replay --site`): the site's JetStream API. */
  adminUser: string
}

// Ports agreed with nats/README.md; none clashes with the machine's shared servers
// (4222, 6379, 5432), so `just up` runs next to them and next to the tests.
export const SITES: Record<SiteName, SitePlan> = {
  cloud: {
    site: "cloud",
    natsConfig: "nats/hub.conf",
    natsPort: 14222,
    natsHttpPort: 18222,
    leafPort: 17422,
    redisPort: 16379,
    database: "keyway_cloud",
    streamsFile: "nats/streams/cloud.json",
    streams: { origin: "CLOUD", inbound: "FACTORY_IN" },
    relayUser: "cloud-relay",
    adminUser: "cloud-admin",
    worker: {
      user: "cloud-worker",
      group: "cloud-demo",
      stream: "FACTORY_IN",
      filterSubject: "factory.demo.item",
    },
  },
  factory: {
    site: "factory",
    natsConfig: "nats/leaf.conf",
    natsPort: 24222,
    natsHttpPort: 28222,
    redisPort: 26379,
    database: "keyway_factory",
    streamsFile: "nats/streams/factory.json",
    streams: { origin: "FACTORY", inbound: "CLOUD_IN" },
    relayUser: "factory-relay",
    adminUser: "factory-admin",
    worker: {
      user: "factory-worker",
      group: "factory-demo",
      stream: "CLOUD_IN",
      filterSubject: "cloud.demo.command",
    },
  },
}

/** The factory's leaf link: the cloud checks its password, the factory dials with it. */
export const LEAF_USER = "leaf-factory"

/**
 * The NATS users whose passwords a site's hosts hold: its own, and the leaf link's. Each site
 * has its own secrets file of these (secrets.ts), so a factory host never holds a cloud
 * password other than the link's, which its leaf has to present anyway.
 */
export function siteUsers(plan: SitePlan): string[] {
  return [plan.relayUser, plan.worker.user, plan.adminUser, LEAF_USER]
}

/** Every NATS user of both sites. */
export const NATS_USERS: readonly string[] = [
  ...new Set(SITE_NAMES.flatMap((site) => siteUsers(SITES[site]))),
]

/** `cloud-relay` → `KEYWAY_PASS_CLOUD_RELAY`, the variable the NATS configs read. */
export function passwordVariable(user: string): string {
  return `KEYWAY_PASS_${user.toUpperCase().replaceAll("-", "_")}`
}

/** Each user reads replies only under its own prefix (nats/accounts/*.conf). */
export const inboxPrefix = inboxPrefixFor

/** The hub's leafnode URL without credentials, as the factory is told it. */
export function hubLeafUrl(): string {
  return `nats-leaf://127.0.0.1:${SITES.cloud.leafPort}`
}

export function siteNatsUrl(plan: SitePlan): string {
  return `nats://127.0.0.1:${plan.natsPort}`
}

/** How tooling connects to a site's NATS: as its admin user, with that user's inbox prefix. */
export function siteAdminNats(plan: SitePlan, adminPassword: string) {
  return {
    servers: [siteNatsUrl(plan)],
    user: plan.adminUser,
    pass: adminPassword,
    inboxPrefix: inboxPrefix(plan.adminUser),
  }
}

export function siteRedisUrl(plan: SitePlan): string {
  return `redis://127.0.0.1:${plan.redisPort}`
}

/** The site's database on the given Postgres server URL (its path is replaced). */
export function siteDatabaseUrl(plan: SitePlan, postgresUrl: string): string {
  const url = new URL(postgresUrl)
  url.pathname = `/${plan.database}`
  return url.toString()
}

/**
 * A config file and every file it `include`s (nats-server and redis-server both write
 * `include <path>`), by path, each with its text less `#` comments and blank lines.
 */
function configTexts(configPath: string): Map<string, string> {
  const texts = new Map<string, string>()
  const visit = (path: string) => {
    const text = readFileSync(path, "utf8")
      .split("\n")
      .map((line) => line.replace(/#.*$/, "").trim())
      .filter(Boolean)
      .join("\n")
    texts.set(path, text)
    for (const m of text.matchAll(/^\s*include\s+["']?([^"'\s]+)["']?/gm)) {
      visit(resolve(dirname(path), m[1]!))
    }
  }
  visit(configPath)
  return texts
}

/**
 * The `$KEYWAY_…` variables a NATS config reads, following its `include`s. The launcher
 * hands each server exactly these, so a leaf never holds the hub's passwords, and a config
 * that starts to need a new variable fails here by name rather than in nats-server.
 */
export function natsConfigVariables(configPath: string): Set<string> {
  const found = new Set<string>()
  for (const text of configTexts(configPath).values()) {
    for (const m of text.matchAll(/\$(KEYWAY_[A-Z0-9_]+)/g)) found.add(m[1]!)
  }
  return found
}

export interface LaunchContext {
  root: string
  runDir: string
  /** Postgres server URL; the site's database name replaces its path. */
  postgresUrl: string
  /** Password by user name. */
  passwords: Record<string, string>
  nodeBinary: string
  natsServerBinary: string
  redisServerBinary: string
  /** Events per second of each site's demo writer. */
  demoRate: number
}

/** One pm2 process: `interpreter: "none"` runs the binary itself, with no pm2 wrapper. */
export interface ProcessSpec {
  name: string
  script: string
  args: string[]
  env: Record<string, string>
  /** Started in this order, stopped in reverse. */
  tier: "server" | "app"
  /** The ports a server listens on: another program on one of them would answer in its place. */
  ports?: number[]
  /** Config files the process reads once, at start, with the files they include. */
  configFiles?: string[]
}

/**
 * A digest of everything a process takes in at start: its command, its environment
 * (passwords included, so the digest is not shown) and its config files. `up` restarts a
 * running process whose digest differs from the plan's, the way compose recreates a service
 * whose definition changed: a password rotated in .run/secrets-*.env, a DEMO_RATE, an edited
 * nats/*.conf. Not the code: an app started before a `git pull` runs on until restarted.
 */
export function specDigest(spec: ProcessSpec): string {
  const hash = createHash("sha256")
  const env = Object.entries(spec.env).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
  hash.update(JSON.stringify([spec.script, spec.args, env]))
  for (const file of spec.configFiles ?? []) {
    for (const [path, text] of configTexts(file)) hash.update(JSON.stringify([path, text]))
  }
  return hash.digest("hex")
}

function natsEnv(plan: SitePlan, ctx: LaunchContext): Record<string, string> {
  const known: Record<string, string> = {
    // Both sites run on this machine: nothing of theirs listens beyond it.
    KEYWAY_NATS_HOST: "127.0.0.1",
    KEYWAY_NATS_PORT: String(plan.natsPort),
    KEYWAY_NATS_HTTP_PORT: String(plan.natsHttpPort),
    // Quoted: nats-server parses a variable's value as a config value, and a checkout path
    // with a space in it failed to parse, the server restarted by pm2 over and over.
    KEYWAY_NATS_STORE_DIR: JSON.stringify(join(ctx.runDir, plan.site, "jetstream")),
    KEYWAY_HUB_LEAF_URL: hubLeafUrl(),
    KEYWAY_LEAF_REMOTE_URL: leafRemoteUrl(hubLeafUrl(), LEAF_USER, ctx.passwords[LEAF_USER] ?? ""),
  }
  if (plan.leafPort) {
    known.KEYWAY_LEAF_PORT = String(plan.leafPort)
    // The address the hub tells leaves to reconnect to (nats/README.md): the same loopback
    // listener here, a public name behind NAT in ops/compose.
    known.KEYWAY_LEAF_ADVERTISE = `127.0.0.1:${plan.leafPort}`
  }
  for (const user of NATS_USERS) known[passwordVariable(user)] = ctx.passwords[user] ?? ""
  const env: Record<string, string> = {}
  for (const name of natsConfigVariables(join(ctx.root, plan.natsConfig))) {
    const value = known[name]
    if (value === undefined || value === "") {
      throw new Error(`${plan.natsConfig} reads $${name}, which just up does not provide`)
    }
    env[name] = value
  }
  return env
}

function natsClientEnv(plan: SitePlan, ctx: LaunchContext, user: string) {
  return {
    NATS_URL: siteNatsUrl(plan),
    NATS_USER: user,
    NATS_PASS: ctx.passwords[user] ?? "",
    NATS_INBOX_PREFIX: inboxPrefix(user),
  }
}

/** What runs for each site, as `<site>-<role>`: the processes siteProcesses starts. */
export const SITE_ROLES = ["nats", "redis", "relay", "worker", "demo"] as const

/** The processes of one site, servers first. Names are `<site>-<role>` ({@link SITE_ROLES}). */
export function siteProcesses(plan: SitePlan, ctx: LaunchContext): ProcessSpec[] {
  const site = plan.site
  const databaseUrl = siteDatabaseUrl(plan, ctx.postgresUrl)
  const ts = (entry: string) => ["--import", "tsx", join(ctx.root, entry)]
  return [
    {
      name: `${site}-nats`,
      script: ctx.natsServerBinary,
      args: ["-c", join(ctx.root, plan.natsConfig)],
      env: natsEnv(plan, ctx),
      configFiles: [join(ctx.root, plan.natsConfig)],
      tier: "server",
      ports: [plan.natsPort, plan.natsHttpPort, ...(plan.leafPort ? [plan.leafPort] : [])],
    },
    {
      name: `${site}-redis`,
      script: ctx.redisServerBinary,
      // AOF without RDB snapshots: locks and wake-ups survive a restart of Redis; `save ""`
      // keeps the server from forking for snapshots on a small machine. A process title
      // would be written over the environment, which is how orphans.ts knows the process.
      args: [
        "--set-proc-title",
        "no",
        "--port",
        String(plan.redisPort),
        "--bind",
        "127.0.0.1",
        "--dir",
        join(ctx.runDir, site, "redis"),
        "--appendonly",
        "yes",
        "--save",
        "",
      ],
      env: {},
      tier: "server",
      ports: [plan.redisPort],
    },
    {
      name: `${site}-relay`,
      script: ctx.nodeBinary,
      args: ts("apps/relay/src/main.ts"),
      env: {
        KEYWAY_SITE: site,
        DATABASE_URL: databaseUrl,
        OTEL_SERVICE_NAME: `keyway-relay-${site}`,
        ...natsClientEnv(plan, ctx, plan.relayUser),
      },
      tier: "app",
    },
    {
      name: `${site}-worker`,
      script: ctx.nodeBinary,
      args: ts("apps/worker/src/main.ts"),
      env: {
        KEYWAY_SITE: site,
        DATABASE_URL: databaseUrl,
        REDIS_URL: siteRedisUrl(plan),
        KEYWAY_STREAM: plan.worker.stream,
        KEYWAY_GROUP: plan.worker.group,
        KEYWAY_FILTER_SUBJECT: plan.worker.filterSubject,
        OTEL_SERVICE_NAME: `keyway-worker-${site}`,
        ...natsClientEnv(plan, ctx, plan.worker.user),
      },
      tier: "app",
    },
    {
      name: `${site}-demo`,
      script: ctx.nodeBinary,
      args: ts("apps/demo/src/writer.ts"),
      env: {
        KEYWAY_SITE: site,
        DATABASE_URL: databaseUrl,
        DEMO_RATE: String(ctx.demoRate),
        OTEL_SERVICE_NAME: `keyway-demo-${site}`,
      },
      tier: "app",
    },
  ]
}

/**
 * The repository root, from this file's place in it. Not the URL's pathname: that keeps its
 * percent-escapes, and a checkout under `/tmp/a b` became `/tmp/a%20b`, a tree that `up`
 * wrote its secrets into before failing to read the NATS config there.
 */
export function repositoryRoot(moduleUrl = import.meta.url): string {
  return resolve(dirname(fileURLToPath(moduleUrl)), "../../..")
}
