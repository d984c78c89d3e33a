import { randomBytes } from "node:crypto"
import { decodeEnvelope, type EventEnvelope } from "@keyway/schemas"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { sweepTestStreams } from "./internal/leftovers.ts"

let swept = false

/**
 * A stream `<SITE>` on `<site>.>` of its own for one test, so tests share the machine's NATS
 * without colliding. Its two-minute duplicate window matches the relay's re-publish span.
 */
export async function createTestStream(nc: NatsConnection) {
  const site = `t${randomBytes(4).toString("hex")}`
  const name = site.toUpperCase()
  const jsm = await jetstreamManager(nc)
  if (!swept) {
    swept = true
    await sweepTestStreams(jsm).catch(() => {})
  }
  await jsm.streams.add({
    name,
    subjects: [`${site}.>`],
    duplicate_window: 120e9,
  })
  return {
    site,
    name,
    async delete() {
      await (await jetstreamManager(nc)).streams.delete(name).catch(() => {})
    },
  }
}

export async function streamCount(nc: NatsConnection, name: string): Promise<number> {
  return (await (await jetstreamManager(nc)).streams.info(name)).state.messages
}

/** Every message of the stream, decoded, in stream order. */
export async function readStream(nc: NatsConnection, name: string): Promise<EventEnvelope[]> {
  const total = await streamCount(nc, name)
  const out: EventEnvelope[] = []
  if (total === 0) return out
  const consumer = await jetstream(nc).consumers.get(name)
  while (out.length < total) {
    const batch = await consumer.fetch({ max_messages: 1000, expires: 2000 })
    for await (const m of batch) out.push(decodeEnvelope(m.data))
  }
  return out
}
