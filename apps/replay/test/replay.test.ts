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

/** A private server, to stop and start, with stream R on `r.>`, and a connection to it. */
async function privateServer() {
  const server = await startNatsServer()
  const conn = await connectNats({ servers: server.url })
  await (await jetstreamManager(conn)).streams.add({ name: "R", subjects: ["r.>"] })
  return {
    server,
    conn,
    js: jetstream(conn),
    async [Symbol.asyncDispose]() {
      await conn.close()
      await server[Symbol.asyncDispose]()
    },
  }
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

test("--follow on one subject waits past the other subjects' messages, and prints the next", async () => {
  // The filtered consumer's delivered stream sequence moves past r.b, which it never sends:
  // taken for messages lost in flight, the read failed after four empty fetches.
  const own = await createTestStream(nc)
  try {
    const js = jetstream(nc)
    await js.publish(`${own.site}.a`, "1")
    await js.publish(`${own.site}.b`, "2")
    const seqs: number[] = []
    const stop = new AbortController()
    let failed: unknown
    const reading = replay(
      js,
      { stream: own.name, subject: `${own.site}.a`, follow: true, signal: stop.signal },
      (line) => seqs.push(line.streamSeq),
    ).catch((err) => {
      failed = err
      return -1
    })
    // Six empty fetches of a second each: the old read had given up after four.
    await sleep(6500)
    assert.equal(failed, undefined)
    await js.publish(`${own.site}.a`, "3")
    await waitFor(async () => seqs.length === 2, { timeoutMs: 5000, message: "seq 3 printed" })
    stop.abort()
    assert.equal(await reading, 2)
    assert.deepEqual(seqs, [1, 3])
  } finally {
    await own.delete()
  }
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
    await using p = await privateServer()
    const { server, conn, js } = p
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
  })
}

test("a new consumer waits for a server that is down, and gives up when the read is interrupted", async () => {
  await using p = await privateServer()
  const { server, conn, js } = p
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
  // A try that opens after the interrupt (a slow answer, here made slow on purpose) has
  // created its consumer on the server by then: deleted, not left there for 5 minutes.
  await server.start()
  const slowAborter = new AbortController()
  setTimeout(() => slowAborter.abort(), 300)
  let lateOpen: Promise<unknown> | undefined
  const slowOpen = () => {
    const opening = sleep(1000).then(() => js.consumers.get("R", {}))
    lateOpen = opening
    return opening
  }
  assert.equal(await untilBack(slowOpen, slowAborter.signal), undefined)
  // Opened now, after the interrupt: its consumer was on the server.
  await lateOpen
  const jsm = await jetstreamManager(conn)
  const consumers = async () => {
    const names: string[] = []
    for await (const c of jsm.consumers.list("R")) names.push(c.name)
    return names
  }
  await waitFor(async () => (await consumers()).length === 0, {
    timeoutMs: 5000,
    message: "no consumer left behind",
  })
})

test("a server without JetStream (yet) is waited for too: nats.js calls that no responders", async () => {
  await using server = await startNatsServer({ jetstream: false })
  const conn = await connectNats({ servers: server.url })
  try {
    const aborter = new AbortController()
    setTimeout(() => aborter.abort(), 1500)
    let tries = 0
    const waited = await untilBack(() => {
      tries++
      return jetstream(conn).consumers.get("R", {})
    }, aborter.signal)
    assert.equal(waited, undefined, "interrupted, not failed")
    assert.ok(tries >= 2, `tried again (${tries} tries)`)
  } finally {
    await conn.close()
  }
})

for (const [how, end] of [
  ["a clean shutdown", (s: NatsServerHandle) => s.stop()],
  ["a crash", (s: NatsServerHandle) => s.kill()],
] as const) {
  // Bounded: the failure this guards against is a read that never ends.
  test(`an interrupt ends a read waiting for a server gone in ${how}`, {
    timeout: 30_000,
  }, async () => {
    await using p = await privateServer()
    const { server, js } = p
    for (let i = 1; i <= 5; i++) await js.publish("r.x", `m${i}`)
    const seqs: number[] = []
    const aborter = new AbortController()
    const reading = replay(js, { stream: "R", follow: true, signal: aborter.signal }, (line) =>
      seqs.push(line.streamSeq),
    )
    await waitFor(async () => seqs.length === 5, { timeoutMs: 10_000, message: "5 read" })
    await end(server)
    await sleep(1000)
    aborter.abort()
    // The server stays away: the read must end on the interrupt alone.
    assert.equal(await reading, 5)
  })
}

test("--follow goes on through one clean restart after another, with nothing between", async () => {
  await using p = await privateServer()
  const { server, js } = p
  await js.publish("r.x", "m1")
  const seqs: number[] = []
  const aborter = new AbortController()
  const reading = replay(js, { stream: "R", follow: true, signal: aborter.signal }, (line) =>
    seqs.push(line.streamSeq),
  )
  await waitFor(async () => seqs.length === 1, { timeoutMs: 10_000, message: "1 read" })
  for (let restart = 0; restart < 5; restart++) {
    await server.stop()
    await server.start()
    await sleep(1500)
  }
  await waitFor(
    async () =>
      js.publish("r.x", "m2").then(
        () => true,
        () => false,
      ),
    { timeoutMs: 10_000, message: "the server takes a publish" },
  )
  await waitFor(async () => seqs.length === 2, {
    timeoutMs: 15_000,
    message: `the read went on after five restarts (${seqs.length} of 2)`,
  })
  aborter.abort()
  assert.equal(await reading, 2)
  assert.deepEqual(seqs, [1, 2])
})

test("--from-seq past the stream's end with --follow prints from that seq on, nothing before", async () => {
  const own = await createTestStream(nc)
  try {
    const js = jetstream(nc)
    for (let i = 1; i <= 3; i++) await js.publish(`${own.site}.a`, `${i}`)
    const seqs: number[] = []
    const stop = new AbortController()
    // The server starts a consumer asked for seq 6 at seq 4, the stream's next.
    const reading = replay(
      js,
      { stream: own.name, fromSeq: 6, follow: true, signal: stop.signal },
      (line) => seqs.push(line.streamSeq),
    )
    // Its consumer made first, while the stream ends at 3.
    const jsm = await jetstreamManager(nc)
    await waitFor(async () => (await jsm.consumers.list(own.name).next()).length > 0, {
      timeoutMs: 5000,
      message: "the read's consumer",
    })
    for (let i = 4; i <= 7; i++) await js.publish(`${own.site}.a`, `${i}`)
    await waitFor(async () => seqs.length === 2, { timeoutMs: 5000, message: "seqs 6 and 7" })
    stop.abort()
    assert.equal(await reading, 2)
    assert.deepEqual(seqs, [6, 7])
  } finally {
    await own.delete()
  }
})

test("a message that is not an event is printed with its bytes: text if UTF-8, else base64, cut and sized", async () => {
  const own = await createTestStream(nc)
  try {
    const js = jetstream(nc)
    const binary = Uint8Array.from([0x0a, 0x03, 0xff, 0xfe, 0x00, 0x80])
    const x = (n: number) => "x".repeat(n)
    // Around the 1,000-byte cut: a 2-byte character across it; a 4-byte one ending at it;
    // one cut after 3 of its 4 bytes; plain ASCII.
    const texts = [`${x(999)}é and more`, `${x(996)}😀 and more`, `${x(997)}😀 and more`, x(1200)]
    // Latin-1, its first byte that is no UTF-8 past the cut: not text.
    const latin1 = Buffer.concat([Buffer.from(x(1100)), Buffer.from([0xe9, 0x20])])
    await js.publish(`${own.site}.a`, binary)
    for (const t of texts) await js.publish(`${own.site}.a`, t)
    await js.publish(`${own.site}.a`, latin1)
    const lines: ReplayLine[] = []
    await replay(js, { stream: own.name }, (line) => lines.push(line))
    const [bin, ...rest] = lines.map((l) => {
      const { streamSeq: _s, time: _t, subject: _u, ...body } = l
      return body
    })
    assert.deepEqual(bin, {
      error: "message body is not UTF-8",
      dataBase64: Buffer.from(binary).toString("base64"),
      size: 6,
      truncated: false,
    })
    const asText = (data: string, size: number) => ({
      error: "message body is not JSON",
      data,
      size,
      truncated: true,
    })
    assert.deepEqual(rest.slice(0, 4), [
      asText(x(999), Buffer.byteLength(texts[0]!)),
      asText(`${x(996)}😀`, Buffer.byteLength(texts[1]!)),
      asText(x(997), Buffer.byteLength(texts[2]!)),
      asText(x(1000), 1200),
    ])
    assert.deepEqual(rest[4], {
      error: "message body is not UTF-8",
      dataBase64: Buffer.from(x(1000)).toString("base64"),
      size: 1102,
      truncated: true,
    })
  } finally {
    await own.delete()
  }
})
