// The leaf-link benchmark (issue 4): how fast a backlog of factory events crosses to the
// cloud once a link outage ends, next to the raw rate of publishing the same events into a
// cloud stream directly. Both sites run from the repository's own configs (nats/hub.conf,
// nats/leaf.conf) with their users and permissions, the link through a TCP proxy that is
// cut while the backlog builds up.
//
// The backlog is published straight into FACTORY (pipelined js.publish with msgID, as the
// relay does) rather than through the outbox: the outbox's cost is the relay benchmark's
// subject, and 100,000 commits would take minutes without telling anything about the link.
import { randomBytes } from "node:crypto"
import {
  applyStreams,
  connectNats,
  inboxPrefixFor,
  leafRemoteUrl,
  loadStreamDefinitions,
} from "@keyway/nats"
import { decodeEnvelope, encodeEnvelope } from "@keyway/schemas"
import { createTcpProxy, freePort, startNatsFromConfig } from "@keyway/testkit"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { benchKnob, printTable, round } from "./stats.ts"

const EVENTS = benchKnob("BENCH_LINK_EVENTS", 100_000)
const KEYS = 1000
const WINDOW = 512
const CATCHUP_LIMIT_MS = 600_000
const natsDir = new URL("../../nats/", import.meta.url).pathname

const users = [
  "cloud-relay",
  "factory-relay",
  "cloud-admin",
  "factory-admin",
  "leaf-factory",
] as const
type User = (typeof users)[number]
const envName = (u: string) => `KEYWAY_PASS_${u.toUpperCase().replaceAll("-", "_")}`

/** Publishes every payload with its id, at most WINDOW PubAcks outstanding; returns msg/s. */
async function publishAll(nc: NatsConnection, subject: string, events: readonly Uint8Array[]) {
  const js = jetstream(nc)
  let next = 0
  const started = performance.now()
  await Promise.all(
    Array.from({ length: WINDOW }, async () => {
      while (next < events.length) {
        const i = next++
        for (;;) {
          try {
            await js.publish(subject, events[i]!, { msgID: `factory:${i + 1}` })
            break
          } catch {
            // A timeout under load: the same id again is deduplicated if the first landed.
          }
        }
      }
    }),
  )
  return events.length / ((performance.now() - started) / 1000)
}

export async function run() {
  const passwords = Object.fromEntries(
    users.map((u) => [u, `p${randomBytes(12).toString("hex")}`]),
  ) as Record<User, string>
  const passwordEnv = Object.fromEntries(users.map((u) => [envName(u), passwords[u]]))
  const hubLeafPort = await freePort()
  const proxy = await createTcpProxy({ host: "127.0.0.1", port: hubLeafPort })
  const hub = await startNatsFromConfig({
    configPath: `${natsDir}hub.conf`,
    env: {
      ...passwordEnv,
      KEYWAY_PASS_CLOUD_WORKER: "unused",
      KEYWAY_LEAF_PORT: String(hubLeafPort),
      KEYWAY_LEAF_ADVERTISE: `127.0.0.1:${proxy.port}`,
    },
  })
  const leaf = await startNatsFromConfig({
    configPath: `${natsDir}leaf.conf`,
    env: {
      ...passwordEnv,
      KEYWAY_PASS_FACTORY_WORKER: "unused",
      KEYWAY_LEAF_REMOTE_URL: leafRemoteUrl(
        `nats-leaf://127.0.0.1:${proxy.port}`,
        "leaf-factory",
        passwords["leaf-factory"],
      ),
    },
  })
  const connect = (server: string, user: User) =>
    connectNats({ servers: server, user, pass: passwords[user], inboxPrefix: inboxPrefixFor(user) })
  const connections: NatsConnection[] = []
  try {
    const cloudAdmin = await connect(hub.url, "cloud-admin")
    const factoryAdmin = await connect(leaf.url, "factory-admin")
    const factoryRelay = await connect(leaf.url, "factory-relay")
    const cloudRelay = await connect(hub.url, "cloud-relay")
    connections.push(cloudAdmin, factoryAdmin, factoryRelay, cloudRelay)
    const cloudJsm = await jetstreamManager(cloudAdmin)
    await applyStreams(cloudJsm, await loadStreamDefinitions(`${natsDir}streams/cloud.json`))
    await applyStreams(
      await jetstreamManager(factoryAdmin),
      await loadStreamDefinitions(`${natsDir}streams/factory.json`),
    )
    const inCloud = async () => (await cloudJsm.streams.info("FACTORY_IN")).state.messages

    const createdAt = new Date().toISOString()
    const events = Array.from({ length: EVENTS }, (_, i) =>
      encodeEnvelope({
        id: `factory:${i + 1}`,
        site: "factory",
        seq: i + 1,
        topic: "demo.item",
        key: `k${i % KEYS}`,
        ver: Math.floor(i / KEYS) + 1,
        type: "demo.item.changed.v1",
        payload: { n: i },
        createdAt,
      }),
    )

    proxy.cut()
    const fillRate = await publishAll(factoryRelay, "factory.demo.item", events)
    if ((await inCloud()) !== 0) throw new Error("events crossed while the link was cut")

    const restoredAt = performance.now()
    proxy.restore()
    let firstSeenAt: number | undefined
    for (;;) {
      const n = await inCloud()
      if (n > 0) firstSeenAt ??= performance.now()
      if (n >= EVENTS) break
      if (performance.now() - restoredAt > CATCHUP_LIMIT_MS) break
      await new Promise((r) => setTimeout(r, 20))
    }
    const doneAt = performance.now()
    const catchupRate = EVENTS / ((doneAt - restoredAt) / 1000)
    const flowRate = EVENTS / ((doneAt - (firstSeenAt ?? restoredAt)) / 1000)

    // The same events, published into the cloud's own stream with nothing in between.
    const directRate = await publishAll(cloudRelay, "cloud.demo.item", events)

    // Every id of FACTORY_IN, read back in full.
    const seen = new Map<string, number>()
    const consumer = await jetstream(cloudAdmin).consumers.get("FACTORY_IN")
    const total = await inCloud()
    let read = 0
    while (read < total) {
      const batch = await consumer.fetch({ max_messages: 5000, expires: 2000 })
      for await (const m of batch) {
        read++
        const id = decodeEnvelope(m.data).id
        seen.set(id, (seen.get(id) ?? 0) + 1)
      }
    }
    let lost = 0
    for (let i = 1; i <= EVENTS; i++) if (!seen.has(`factory:${i}`)) lost++
    const duplicated = read - seen.size

    printTable([
      ["measure", "events/s"],
      ["backlog published into FACTORY (link cut)", round(fillRate, 0)],
      ["catch-up into FACTORY_IN, from restore", round(catchupRate, 0)],
      ["  from the first copied event (reconnect excluded)", round(flowRate, 0)],
      ["direct publish into CLOUD", round(directRate, 0)],
      ["catch-up / direct", `${round((100 * catchupRate) / directRate, 0)} %`],
      ["events / lost / duplicated", `${EVENTS} / ${lost} / ${duplicated}`],
    ])
    console.log(
      JSON.stringify({
        bench: "link",
        catchup_per_s: round(catchupRate, 0),
        direct_publish_per_s: round(directRate, 0),
        events: EVENTS,
        lost,
        duplicated,
      }),
    )
  } finally {
    for (const nc of connections) await nc.close().catch(() => {})
    await leaf[Symbol.asyncDispose]()
    await proxy.close()
    await hub[Symbol.asyncDispose]()
  }
}
