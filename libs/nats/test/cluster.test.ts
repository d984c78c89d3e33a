// The 3-node cloud cluster (issue 4, must-show 5), started from nats/cluster/hub-*.conf: an
// R3 stream keeps taking publishes and a consumer keeps draining while the stream's leader
// is killed. Publishes carry a message id and are retried with the same id after a timeout
// or a 503 during the election (reference/nats-2.9.md rule 12), so the stream must end
// with each message exactly once.
import assert from "node:assert/strict"
import { readFile } from "node:fs/promises"
import { after, before, describe, test } from "node:test"
import { type ConfigNatsServerHandle, freePort, startNatsFromConfig } from "@keyway/testkit"
import { AckPolicy, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { applyStreams, connectNats, inboxPrefixFor, loadStreamDefinitions } from "../src/index.ts"
import { assertNoSecrets, configFile, makePasswords, passwordEnv, type User } from "./support.ts"

const MESSAGES = 3000
const pause = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function distinctPorts(n: number): Promise<number[]> {
  const ports = new Set<number>()
  while (ports.size < n) ports.add(await freePort())
  return [...ports]
}

describe("3-node cloud cluster", () => {
  const passwords = makePasswords()
  const nodes: ConfigNatsServerHandle[] = []
  const open: NatsConnection[] = []
  let urls: string[] = []
  const connect = async (user: User) => {
    const nc = await connectNats({
      servers: urls,
      user,
      pass: passwords[user],
      inboxPrefix: inboxPrefixFor(user),
    })
    open.push(nc)
    return nc
  }

  before(async () => {
    const ports = await distinctPorts(12)
    const clusterPorts = ports.slice(0, 3)
    const routes = JSON.stringify(clusterPorts.map((p) => `nats-route://127.0.0.1:${p}`))
    const started = await Promise.all(
      [1, 2, 3].map((i) =>
        startNatsFromConfig({
          configPath: configFile(`cluster/hub-${i}.conf`),
          env: {
            ...passwordEnv(passwords),
            KEYWAY_NATS_PORT: String(ports[2 + i]!),
            KEYWAY_NATS_HTTP_PORT: String(ports[5 + i]!),
            KEYWAY_LEAF_PORT: String(ports[8 + i]!),
            KEYWAY_LEAF_ADVERTISE: `127.0.0.1:${ports[8 + i]!}`,
            KEYWAY_CLUSTER_PORT: String(clusterPorts[i - 1]!),
            KEYWAY_CLUSTER_ROUTES: routes,
          },
        }),
      ),
    )
    nodes.push(...started)
    urls = nodes.map((n) => n.url)
  })
  after(async () => {
    for (const nc of open) await nc.close().catch(() => {})
    const logs = await Promise.all(nodes.map((n) => readFile(n.logPath, "utf8")))
    for (const n of nodes) await n[Symbol.asyncDispose]()
    assertNoSecrets(logs.join("\n"), passwords)
  })

  test("an R3 stream keeps accepting publishes and a consumer keeps draining while the stream leader is killed", async () => {
    const admin = await connect("cloud-admin")
    const cloud = (await loadStreamDefinitions(configFile("streams/cluster/cloud.json"))).find(
      (s) => s.name === "CLOUD",
    )!
    // Until the cluster has elected its meta leader, JetStream API requests time out.
    let jsm: JetStreamManager
    for (let attempt = 0; ; attempt++) {
      try {
        jsm = await jetstreamManager(admin, { timeout: 2000 })
        await applyStreams(jsm, [cloud])
        break
      } catch (err) {
        if (attempt > 60) throw err
        await pause(500)
      }
    }
    await jsm.consumers.add("CLOUD", {
      durable_name: "drain",
      ack_policy: AckPolicy.Explicit,
      ack_wait: 2e9,
    })

    // The consumer: cloud-worker, fetching in a loop that survives the failover.
    const worker = await connect("cloud-worker")
    const received = new Set<string>()
    let draining = true
    const drain = (async () => {
      const consumer = await jetstream(worker).consumers.get("CLOUD", "drain")
      while (draining) {
        try {
          const batch = await consumer.fetch({ max_messages: 200, expires: 1000 })
          for await (const m of batch) {
            received.add(m.headers!.get("Nats-Msg-Id"))
            m.ack()
          }
        } catch {
          await pause(200)
        }
      }
    })()

    // The publisher: cloud-relay, 32 in flight, each retried with its own id until acked.
    const relay = await connect("cloud-relay")
    const js = jetstream(relay)
    let next = 0
    let acked = 0
    let retries = 0
    let ackedAfterKill = 0
    let killed = false
    const publisher = async () => {
      while (next < MESSAGES) {
        const i = next++
        for (;;) {
          try {
            await js.publish("cloud.demo.item", `{"i":${i}}`, {
              msgID: `cloud:${i}`,
              timeout: 2000,
            })
            acked++
            if (killed) ackedAfterKill++
            break
          } catch {
            retries++
            await pause(100)
          }
        }
        // Spread the publishes out so the kill lands in the middle of the flow.
        if (i % 50 === 0) await pause(10)
      }
    }
    const publishing = Promise.all(Array.from({ length: 32 }, publisher))

    while (acked < MESSAGES / 3) await pause(20)
    const receivedBeforeKill = received.size
    const leaderName = (await jsm.streams.info("CLOUD")).cluster!.leader!
    const leader = nodes[Number(leaderName.replace("hub-", "")) - 1]!
    await leader.kill()
    killed = true
    await publishing
    console.log(
      `cluster: leader ${leaderName} killed after ${receivedBeforeKill} received; ` +
        `${ackedAfterKill} publishes acked after the kill, ${retries} retried`,
    )
    assert.ok(ackedAfterKill > 0, "publishes were accepted after the kill")

    for (let i = 0; received.size < MESSAGES && i < 600; i++) await pause(100)
    draining = false
    await drain
    assert.ok(received.size > receivedBeforeKill, "the consumer drained after the kill")
    assert.equal(received.size, MESSAGES, "the consumer received every message")
    const info = await jsm.streams.info("CLOUD")
    assert.equal(info.state.messages, MESSAGES, "each message once in the stream")
    assert.notEqual(info.cluster!.leader, leaderName, "a new leader took over")
  })
})
