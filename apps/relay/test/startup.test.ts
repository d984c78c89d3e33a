// The relay process started before NATS: it waits, logging why, then applies its streams
// and publishes what the outbox holds; and a bad stream definition stops it at once.
import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import { mkdtemp, rm, writeFile } from "node:fs/promises"
import { type AddressInfo, createServer, type Server } from "node:net"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import { connectNats } from "@keyway/nats"
import { enqueue } from "@keyway/outbox"
import {
  createTcpProxy,
  createTestDatabase,
  spawnTs,
  startNatsServer,
  type TestDatabase,
  waitFor,
} from "@keyway/testkit"
import { jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))
const NATS_URL = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
let t: TestDatabase
let nc: NatsConnection
let dir: string

before(async () => {
  t = await createTestDatabase()
  nc = await connectNats({ servers: NATS_URL })
  dir = await mkdtemp(join(tmpdir(), "keyway-relay-test-"))
})
after(async () => {
  await nc?.close()
  await t?.drop()
  await rm(dir, { recursive: true, force: true })
})

async function streamsFile(definition: Record<string, unknown>) {
  const path = join(dir, `${randomBytes(4).toString("hex")}.json`)
  await writeFile(path, JSON.stringify({ streams: [definition] }))
  return path
}

test("a relay waits for NATS, then applies its streams and publishes the backlog", async () => {
  const site = `t${randomBytes(4).toString("hex")}`
  const stream = site.toUpperCase()
  const natsUrl = new URL(NATS_URL)
  await using proxy = await createTcpProxy({ host: natsUrl.hostname, port: Number(natsUrl.port) })
  proxy.cut()
  await t.db
    .transaction()
    .execute((trx) => enqueue(trx, { type: "demo.item.changed.v1", key: "k", payload: { n: 1 } }))
  const relay = spawnTs(main, {
    KEYWAY_SITE: site,
    DATABASE_URL: t.url,
    NATS_URL: `nats://127.0.0.1:${proxy.port}`,
    KEYWAY_STREAMS_FILE: await streamsFile({ name: stream, subjects: [`${site}.>`] }),
  })
  const printed = () => `it printed ${relay.lines.join("\n")}`
  const jsm = await jetstreamManager(nc)
  try {
    await waitFor(() => relay.json().filter((l) => l.message === "waiting for NATS").length >= 2, {
      timeoutMs: 30_000,
      message: () => `two waits for NATS; ${printed()}`,
    })
    assert.equal(relay.exitCode, null, "still running while NATS is away")
    proxy.restore()
    await waitFor(
      async () => (await jsm.streams.info(stream).catch(() => undefined))?.state.messages === 1,
      { timeoutMs: 30_000, message: () => `the stream holds the event; ${printed()}` },
    )
  } finally {
    relay.kill("SIGTERM")
    await relay.exited()
    await jsm.streams.delete(stream).catch(() => {})
  }
  assert.equal(relay.exitCode, 0, printed())
})

test("a stream definition NATS refuses stops the relay at start instead of waiting", async () => {
  // A private server: a refused definition is only safe to try where nothing else lives.
  await using server = await startNatsServer()
  const own = await connectNats({ servers: server.url })
  const site = `t${randomBytes(4).toString("hex")}`
  try {
    await (await jetstreamManager(own)).streams.add({ name: "TAKEN", subjects: [`${site}.>`] })
  } finally {
    await own.close()
  }
  const relay = spawnTs(main, {
    KEYWAY_SITE: site,
    DATABASE_URL: t.url,
    NATS_URL: server.url,
    // Its subjects belong to another stream: JetStream answers 400.
    KEYWAY_STREAMS_FILE: await streamsFile({ name: site.toUpperCase(), subjects: [`${site}.>`] }),
  })
  const { code } = await relay.exited()
  assert.equal(code, 1)
  const refusal = relay.json().find((l) => l.level === "error")
  assert.match(String(refusal?.message), /its stream definitions cannot be applied/)
  assert.match(String(refusal?.error), /subjects overlap/)
  assert.equal(
    relay.json().some((l) => l.message === "waiting for JetStream (applying streams)"),
    false,
    "refused for good, not waited on",
  )
})

test("a metrics port in use stops the relay at start with one JSON line in its log format", async () => {
  // Held on all addresses, as the relay's metrics server asks for it.
  const holder: Server = createServer()
  await new Promise<void>((resolve) => holder.listen(0, "0.0.0.0", resolve))
  try {
    const relay = spawnTs(main, {
      KEYWAY_SITE: `t${randomBytes(4).toString("hex")}`,
      DATABASE_URL: t.url,
      NATS_URL,
      METRICS_PORT: String((holder.address() as AddressInfo).port),
    })
    const { code } = await relay.exited()
    const printed = relay.lines.join("\n")
    assert.equal(code, 1, printed)
    const failed = relay.json().filter((l) => l.message === "relay failed to start")
    assert.equal(failed.length, 1, printed)
    assert.equal(failed[0]!.level, "error")
    assert.match(String(failed[0]!.error), /EADDRINUSE/)
  } finally {
    await new Promise((resolve) => holder.close(resolve))
  }
})
