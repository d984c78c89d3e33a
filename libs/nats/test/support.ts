import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import { readFile } from "node:fs/promises"
import { fileURLToPath } from "node:url"
import {
  createKeyedConsumer,
  type HandlerContext,
  type KeyedConsumer,
  type KeyedEvent,
} from "@keyway/keyed-consumer"
import { createRelay, enqueue, type Relay } from "@keyway/outbox"
import type { MetricsRegistry } from "@keyway/telemetry"
import {
  type ConfigNatsServerHandle,
  createTcpProxy,
  createTestDatabase,
  freePort,
  startNatsFromConfig,
  type TcpProxy,
  type TestDatabase,
} from "@keyway/testkit"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import type { Redis } from "ioredis"
import { type Kysely, sql } from "kysely"
import {
  applyStreams,
  connectNats,
  inboxPrefixFor,
  leafRemoteUrl,
  loadStreamDefinitions,
} from "../src/index.ts"

export const SHARED_REDIS = process.env.KEYWAY_TEST_REDIS_URL ?? "redis://127.0.0.1:6379"
export const natsDir = fileURLToPath(new URL("../../../nats/", import.meta.url))
export const configFile = (name: string) => `${natsDir}${name}`

export const users = [
  "cloud-relay",
  "cloud-worker",
  "factory-relay",
  "factory-worker",
  "leaf-factory",
  "cloud-admin",
  "factory-admin",
] as const
export type User = (typeof users)[number]

export const passwordVar = (user: string) =>
  `KEYWAY_PASS_${user.toUpperCase().replaceAll("-", "_")}`

/**
 * A fresh password per user and test file. Letters and digits only, starting with a letter:
 * 2.9.10 parses a variable's value as config, so "1e5" would become a number and "#" would
 * start a comment.
 */
export function makePasswords(): Record<User, string> {
  return Object.fromEntries(users.map((u) => [u, `p${randomBytes(12).toString("hex")}`])) as Record<
    User,
    string
  >
}

export const passwordEnv = (passwords: Record<User, string>) =>
  Object.fromEntries(users.map((u) => [passwordVar(u), passwords[u]]))

export interface Sites {
  passwords: Record<User, string>
  hub: ConfigNatsServerHandle
  leaf: ConfigNatsServerHandle
  /** Between leaf and hub when `proxy` was asked for. */
  proxy: TcpProxy | undefined
  /** Where leaf nodes reach the hub: `nats-leaf://host:port`, without credentials. */
  hubLeafUrl: string
  /** A connection as `user` to the cloud hub or the factory leaf, with the user's inbox prefix. */
  connect(site: "cloud" | "factory", user: User): Promise<NatsConnection>
  /** Every server log so far, for the secrets check. */
  logs(): Promise<string>
  close(): Promise<void>
}

/**
 * The cloud hub (nats/hub.conf) and the factory leaf (nats/leaf.conf) on free ports, their
 * streams applied from nats/streams/*.json as each site's admin, the link up.
 */
export async function startSites(options: { proxy?: boolean } = {}): Promise<Sites> {
  const passwords = makePasswords()
  // The proxy has to exist before the hub starts: the hub advertises it as its leafnode
  // address (KEYWAY_LEAF_ADVERTISE), or the leaf would reconnect around it.
  const hubLeafPort = await freePort()
  const proxy = options.proxy
    ? await createTcpProxy({ host: "127.0.0.1", port: hubLeafPort })
    : undefined
  const leafAddress = `127.0.0.1:${proxy?.port ?? hubLeafPort}`
  const hub = await startNatsFromConfig({
    configPath: configFile("hub.conf"),
    env: {
      ...passwordEnv(passwords),
      KEYWAY_LEAF_PORT: String(hubLeafPort),
      KEYWAY_LEAF_ADVERTISE: leafAddress,
    },
  })
  const hubLeafUrl = `nats-leaf://${leafAddress}`
  const leaf = await startNatsFromConfig({
    configPath: configFile("leaf.conf"),
    env: {
      ...passwordEnv(passwords),
      KEYWAY_LEAF_REMOTE_URL: leafRemoteUrl(hubLeafUrl, "leaf-factory", passwords["leaf-factory"]),
    },
  })
  const connect = (site: "cloud" | "factory", user: User) =>
    connectNats({
      servers: site === "cloud" ? hub.url : leaf.url,
      name: `test-${user}`,
      user,
      pass: passwords[user],
      inboxPrefix: inboxPrefixFor(user),
    })
  for (const site of ["cloud", "factory"] as const) {
    const nc = await connect(site, `${site}-admin`)
    await applyStreams(
      await jetstreamManager(nc),
      await loadStreamDefinitions(configFile(`streams/${site}.json`)),
    )
    await nc.close()
  }
  await waitForLeaf(hub)
  return {
    passwords,
    hub,
    leaf,
    proxy,
    hubLeafUrl,
    connect,
    logs: async () =>
      `${await readFile(hub.logPath, "utf8")}\n${await readFile(leaf.logPath, "utf8")}`,
    close: async () => {
      await leaf[Symbol.asyncDispose]()
      await proxy?.close()
      await hub[Symbol.asyncDispose]()
    },
  }
}

/** Until the hub's /leafz lists a leaf connection (or `count` of them). */
export async function waitForLeaf(
  hub: { httpPort: number },
  timeoutMs = 20_000,
  count = 1,
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const res = await fetch(`http://127.0.0.1:${hub.httpPort}/leafz`).catch(() => undefined)
    if (res?.ok && ((await res.json()) as { leafnodes: number }).leafnodes >= count) return
    if (Date.now() > deadline) throw new Error("the leaf link did not come up")
    await new Promise((r) => setTimeout(r, 100))
  }
}

/** The table the tests' handlers record their effects in, through the handler's transaction. */
export async function createEffectTable(db: Kysely<any>): Promise<void> {
  await sql`
    create table effect (
      id bigserial primary key, topic text not null, key text not null, ver bigint not null,
      event_id text not null, group_name text not null
    )
  `.execute(db)
}

export function recordEffect(group: string) {
  return async (event: KeyedEvent, ctx: HandlerContext) => {
    await ctx.complete((trx) =>
      sql`insert into effect (topic, key, ver, event_id, group_name)
          values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, ${group})`.execute(trx),
    )
  }
}

export async function effectCount(db: Kysely<any>, group: string): Promise<number> {
  const r = await sql<{ n: number }>`
    select count(*)::int as n from effect where group_name = ${group}
  `.execute(db)
  return r.rows[0]!.n
}

/**
 * Asserts the group's effects hold exactly `expectedIds`, each once, and each key's versions
 * 1..n in the order they were applied.
 */
export async function assertEffects(
  db: Kysely<any>,
  group: string,
  expectedIds: ReadonlySet<string>,
): Promise<void> {
  const r = await sql<{ topic: string; key: string; ver: string; event_id: string }>`
    select topic, key, ver, event_id from effect where group_name = ${group} order by id
  `.execute(db)
  const ids = r.rows.map((row) => row.event_id)
  assert.equal(new Set(ids).size, ids.length, `${group}: no event handled twice`)
  const missing = [...expectedIds].filter((id) => !ids.includes(id))
  assert.deepEqual(
    missing.slice(0, 10),
    [],
    `${group}: every event handled (${missing.length} missing)`,
  )
  assert.equal(ids.length, expectedIds.size, `${group}: nothing handled that was not sent`)
  const byKey = new Map<string, number[]>()
  for (const row of r.rows) {
    const k = `${row.topic}/${row.key}`
    const list = byKey.get(k) ?? []
    list.push(Number(row.ver))
    byKey.set(k, list)
  }
  for (const [k, vers] of byKey) {
    assert.deepEqual(
      vers,
      vers.map((_, i) => i + 1),
      `${group} ${k}: versions applied in order`,
    )
  }
}

/** Event ids the outbox assigned: `<site>:<seq>` for every row. */
export async function outboxIds(db: Kysely<any>, site: string): Promise<Set<string>> {
  const r = await sql<{ seq: string }>`select seq from keyway.outbox`.execute(db)
  return new Set(r.rows.map((row) => `${site}:${row.seq}`))
}

/** Collects what relays and consumers log, to search it for secrets. */
export function captureLogger(lines: string[]) {
  const put = (level: string) => (message: string, fields?: Record<string, unknown>) => {
    lines.push(JSON.stringify({ level, message, ...fields }))
  }
  return { info: put("info"), warn: put("warn"), error: put("error") }
}

export function assertNoSecrets(text: string, passwords: Record<User, string>): void {
  for (const [user, password] of Object.entries(passwords)) {
    assert.ok(!text.includes(password), `${user}'s password appears in the captured output`)
  }
}

export interface SiteApp {
  db: TestDatabase
  relay: Relay
  /** Enqueues `count` events spread over `keys` keys, `perTx` events per transaction. */
  write(count: number, o: { keys: number; perTx?: number; keyPrefix?: string }): Promise<void>
  ids(): Promise<Set<string>>
  close(): Promise<void>
}

const eventOf = (site: "cloud" | "factory", key: string, n: number) =>
  site === "factory"
    ? { type: "demo.item.changed.v1", key, payload: { n } }
    : { type: "demo.command.sent.v1", key, payload: { n, command: "restart" } }

/**
 * One site's application half: its own database and its outbox relay, connected as the
 * site's relay user. Factories write demo.item events, the cloud demo.command events.
 */
export async function startSiteApp(
  sites: Sites,
  site: "cloud" | "factory",
  log: string[],
): Promise<SiteApp> {
  const db = await createTestDatabase({ poolSize: 8 })
  await createEffectTable(db.db)
  const nc = await sites.connect(site, `${site}-relay`)
  const relay = createRelay({
    connectionString: db.url,
    jetstream: jetstream(nc),
    connection: nc,
    site,
    pollIntervalMs: 200,
    publishTimeoutMs: 2000,
    retryDelayMs: 200,
    logger: captureLogger(log),
  })
  await relay.start()
  let n = 0
  return {
    db,
    relay,
    async write(count, o) {
      const perTx = o.perTx ?? 10
      for (let done = 0; done < count; done += perTx) {
        const events = Array.from({ length: Math.min(perTx, count - done) }, () => {
          n++
          return eventOf(site, `${o.keyPrefix ?? "k"}${n % o.keys}`, n)
        })
        await db.db.transaction().execute((trx) => enqueue(trx, events))
      }
    },
    ids: () => outboxIds(db.db, site),
    async close() {
      await relay.stop()
      await nc.close()
      await db.drop()
    },
  }
}

/** A keyed consumer group at `site` on `stream`, connected as the site's worker user. */
export async function startConsumer(
  sites: Sites,
  site: "cloud" | "factory",
  stream: string,
  db: TestDatabase,
  redis: Redis,
  log: string[],
  metrics?: MetricsRegistry,
): Promise<{ group: string; consumer: KeyedConsumer; close(): Promise<void> }> {
  const nc = await sites.connect(site, `${site}-worker`)
  const group = `g${randomBytes(4).toString("hex")}`
  const handler = recordEffect(group)
  const consumer = createKeyedConsumer({
    group,
    stream,
    nats: nc,
    db: db.db,
    redis,
    handlers: { "demo.item.changed.v1": handler, "demo.command.sent.v1": handler },
    pollIntervalMs: 500,
    recoveryIntervalMs: 1000,
    logger: captureLogger(log),
    metrics,
  })
  await consumer.start()
  return {
    group,
    consumer,
    async close() {
      await consumer.stop()
      await nc.close()
    },
  }
}
