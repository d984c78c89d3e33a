// Reads a stream's messages back, as a developer debugging a flow wants them: decoded, in
// stream order, from a point in the stream, without disturbing anything. An ordered consumer
// is the JetStream way to do that: ephemeral, in server memory, unacknowledged, deleted when
// the read ends (else the server drops it 5 minutes after); the groups' durables never see it.
import { decodeEnvelope } from "@keyway/schemas"
import { type Consumer, DeliverPolicy, type JetStreamClient, type JsMsg } from "@nats-io/jetstream"

export interface ReplayOptions {
  stream: string
  /** One subject or wildcard, e.g. `factory.demo.item` or `factory.>` (nats-server 2.9 takes one). */
  subject?: string
  /** Only events of this key: read client side, since the key is not in the subject. */
  key?: string
  /** Where to start: a stream sequence, or a time. Neither: the stream's first message. */
  fromSeq?: number
  since?: Date
  /** The last stream sequence wanted. */
  toSeq?: number
  /** Stop after this many printed. */
  limit?: number
  /** Keep reading new messages as they come, until `signal` aborts. */
  follow?: boolean
  signal?: AbortSignal
}

/** One message as printed: the event, or why it is not one. */
export type ReplayLine = {
  streamSeq: number
  time: string
  subject: string
} & (
  | {
      id: string
      site: string
      topic: string
      key: string
      ver: number
      type: string
      createdAt: string
      traceparent?: string
      payload: unknown
    }
  | { error: string; data: string }
)

function toLine(m: JsMsg): ReplayLine {
  const head = { streamSeq: m.seq, time: m.time.toISOString(), subject: m.subject }
  try {
    const e = decodeEnvelope(m.data)
    const traceparent = m.headers?.get("traceparent") || undefined
    return {
      ...head,
      id: e.id,
      site: e.site,
      topic: e.topic,
      key: e.key,
      ver: e.ver,
      type: e.type,
      createdAt: e.createdAt,
      ...(traceparent ? { traceparent } : {}),
      payload: e.payload,
    }
  } catch (err) {
    // Printed, not skipped: a message that is not an event is often what one is looking for.
    return { ...head, error: (err as Error).message, data: m.string().slice(0, 1000) }
  }
}

/**
 * Prints (through `print`) the stream's messages in order; returns how many were printed.
 * Without `follow`, it ends at the last message the stream held when it started.
 */
export async function replay(
  js: JetStreamClient,
  options: ReplayOptions,
  print: (line: ReplayLine) => void,
): Promise<number> {
  const consumer = await js.consumers.get(options.stream, {
    ...(options.subject ? { filter_subjects: options.subject } : {}),
    ...(options.fromSeq !== undefined
      ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: options.fromSeq }
      : options.since !== undefined
        ? { deliver_policy: DeliverPolicy.StartTime, opt_start_time: options.since.toISOString() }
        : { deliver_policy: DeliverPolicy.All }),
  })
  try {
    return await readAll(consumer, options, print)
  } finally {
    await consumer.delete().catch(() => {})
  }
}

async function readAll(
  consumer: Consumer,
  options: ReplayOptions,
  print: (line: ReplayLine) => void,
): Promise<number> {
  let printed = 0
  for (;;) {
    if (options.signal?.aborted) return printed
    // Short waits: without `follow` a fetch that finds nothing means the filtered view is
    // exhausted (each message also says how many follow it, which ends the read at once);
    // with it, an interrupt is seen within a second.
    const batch = await consumer.fetch({
      max_messages: 256,
      expires: 1000,
    })
    let got = 0
    for await (const m of batch) {
      got++
      if (options.toSeq !== undefined && m.seq > options.toSeq) return printed
      const line = toLine(m)
      if (options.key === undefined || ("key" in line && line.key === options.key)) {
        print(line)
        printed++
        if (options.limit !== undefined && printed >= options.limit) return printed
      }
      if (options.toSeq !== undefined && m.seq >= options.toSeq) return printed
      if (!options.follow && m.info.pending === 0) return printed
    }
    if (got === 0 && !options.follow) return printed
  }
}
