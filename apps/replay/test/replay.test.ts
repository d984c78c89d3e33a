// replay() on its own, where the test can reach the server-side consumer under it.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { connectNats } from "@keyway/nats"
import { createTestStream } from "@keyway/testkit"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { type ReplayLine, replay } from "../src/replay.ts"

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
