// replay() on its own, where the test can reach the server-side consumer under it.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { connectNats } from "@keyway/nats"
import { createTestStream, type NatsServerHandle, startNatsServer, waitFor } from "@keyway/testkit"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { type ReplayLine, replay, untilBack } from "../src/replay.ts"

const MESSAGES = 1000
let nc: NatsConnection
let stream: Awaited<ReturnType<typeof createTestStream>>

before(async () => {
  nc = await connectNats({ servers: process.env.NATS_URL ?? "nats://127.0.0.1:4222" })
  stream = await createTestStream(nc)
  const js = jetstream(nc)
  await Promise.all(
    Array.from({ length: MESSAGES }, (_, i) => js.publish(`${stream.site}.raw`, `m${i + 1}`)),
  )
})
after(async () => {
  await stream.delete()
  await nc.close()
})

/** Deletes the stream's consumers; returns how many this call deleted. */
const deleteConsumers = async () => {
  const jsm = await jetstreamManager(nc)
  const names: string[] = []
  for await (const c of jsm.consumers.list(stream.name)) names.push(c.name)
  // One listed may be gone by its delete: the read's ordered consumer replaces its
  // server-side consumer on its own between fetches (a CI run met that).
  const deleted = await Promise.all(
    names.map((name) =>
      jsm.consumers.delete(stream.name, name).catch((err: { code?: number }) => {
        if (err.code === 10014) return false
        throw err
      }),
    ),
  )
  return deleted.filter(Boolean).length
}
/** Deletes the read's consumer, whichever it is by then. */
const deleteTheConsumer = async () => {
  for (let attempt = 0; attempt < 20; attempt++) {
    const n = await deleteConsumers()
    if (n > 0) return n
  }
  return 0
}

test("a consumer dropped by the server mid-read is replaced: nothing missed, nothing twice", async () => {
  const seqs: number[] = []
  const deleting: Promise<number>[] = []
  const printed = await replay(jetstream(nc), { stream: stream.name }, (line: ReplayLine) => {
    seqs.push(line.streamSeq)
    // As the server does to a consumer not pulled from for 5 minutes, or on its restart.
    if (seqs.length === 100) deleting.push(deleteTheConsumer())
    if (seqs.length === 600) deleting.push(deleteConsumers())
  })
  // The second may find none: the client's ordered consumer replaces its server-side consumer
  // between fetches, on its own.
  assert.equal((await Promise.all(deleting))[0], 1, "the read's consumer deleted")
  assert.equal(printed, MESSAGES)
  assert.deepEqual(
    seqs,
    Array.from({ length: MESSAGES }, (_, i) => i + 1),
  )
  assert.equal(await deleteConsumers(), 0, "none left behind")
})

test("a read whose consumers keep vanishing fails with the server's reason", async () => {
  const vanishing = setInterval(() => void deleteConsumers().catch(() => {}), 5)
  try {
    await assert.rejects(
      replay(jetstream(nc), { stream: stream.name, follow: true }, () => {}),
      /consumer (not found|deleted)/,
    )
  } finally {
    clearInterval(vanishing)
  }
})

for (const [how, end] of [
  ["a clean shutdown", (s: NatsServerHandle) => s.stop()],
  ["a crash", (s: NatsServerHandle) => s.kill()],
] as const) {
  test(`--follow goes on through ${how} and restart of the server: nothing missed, nothing twice`, async () => {
    await using server = await startNatsServer()
    const conn = await connectNats({ servers: server.url })
    try {
      const js = jetstream(conn)
      await (await jetstreamManager(conn)).streams.add({ name: "R", subjects: ["r.>"] })
      const publish = async (from: number, to: number) => {
        for (let i = from; i <= to; i++) await js.publish("r.x", `m${i}`)
      }
      await publish(1, 20)
      const seqs: number[] = []
      const aborter = new AbortController()
      const reading = replay(js, { stream: "R", follow: true, signal: aborter.signal }, (line) =>
        seqs.push(line.streamSeq),
      )
      await waitFor(async () => seqs.length === 20, { timeoutMs: 10_000, message: "20 read" })
      await end(server)
      // Down for longer than a JetStream request waits (5 s): the read must wait it out.
      await sleep(6000)
      await server.start()
      await waitFor(async () => !conn.isClosed() && conn.info !== undefined, {
        timeoutMs: 10_000,
        message: "reconnected",
      })
      // Published once the client is back; a publish while it reconnects may time out.
      await waitFor(
        async () =>
          js.publish("r.x", "m21").then(
            () => true,
            () => false,
          ),
        { timeoutMs: 10_000, message: "the restarted server takes a publish" },
      )
      await publish(22, 40)
      await waitFor(async () => seqs.length >= 40, {
        timeoutMs: 15_000,
        message: `the read went on after the restart (${seqs.length} of 40)`,
      })
      aborter.abort()
      assert.equal(await reading, 40)
      assert.deepEqual(
        seqs,
        Array.from({ length: 40 }, (_, i) => i + 1),
      )
    } finally {
      await conn.close()
    }
  })
}

test("a new consumer waits for a server that is down, and gives up when the read is interrupted", async () => {
  await using server = await startNatsServer()
  const conn = await connectNats({ servers: server.url })
  try {
    const js = jetstream(conn)
    await (await jetstreamManager(conn)).streams.add({ name: "R", subjects: ["r.>"] })
    await server.stop()
    let tries = 0
    let trying = false
    const open = () => {
      tries++
      trying = true
      const opening = js.consumers.get("R", {})
      opening.then(
        () => (trying = false),
        () => (trying = false),
      )
      return opening
    }
    // Each try times out after 5 s while nothing answers; the server is back after 6.
    const restarting = sleep(6000).then(() => server.start())
    const consumer = await untilBack(open, undefined)
    await restarting
    assert.ok(tries >= 2, `tried again after a timeout (${tries} tries)`)
    assert.ok(consumer, "a consumer once the server is back")
    assert.equal((await consumer.info()).stream_name, "R")
    await consumer.delete()

    await server.stop()
    const aborter = new AbortController()
    setTimeout(() => aborter.abort(), 1000)
    assert.equal(await untilBack(open, aborter.signal), undefined)
    assert.ok(trying, "the interrupt ended the wait, not the try's timeout")
  } finally {
    await conn.close()
  }
})
