import { encodeEnvelope } from "@keyway/schemas"
import { JetStreamApiError, type JetStreamClient } from "@nats-io/jetstream"
import { InvalidArgumentError, headers as natsHeaders } from "@nats-io/transport-node"
import { context, propagation, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api"
import type { OutboxRow, PublishedRow } from "./outbox-row.ts"

const tracer = trace.getTracer("@keyway/outbox")

export interface PublishBatchOptions {
  site: string
  subjectPrefix: string
  /** Most publishes awaiting their PubAck at once. */
  window: number
  timeoutMs: number
}

export interface PublishBatchResult {
  published: PublishedRow[]
  /**
   * Rows NATS refuses whatever the retry (see {@link refusedForGood}), with the reason. Rows
   * after one in the same key were not sent; other keys went on.
   */
  refused: { row: OutboxRow; reason: string }[]
  /** The first other failure; the batch stopped taking keys at it. */
  error?: unknown
}

// nats-server's JSStreamMessageExceedsMaximumErr: larger than the stream's max_msg_size.
const STREAM_MESSAGE_TOO_LARGE = 10054

/**
 * Why NATS will never take this message as it is, or undefined for a failure that may pass
 * (a timeout, a lost connection, a stream not there yet). Only the size limits qualify: the
 * server's max_payload, which nats.js checks before sending, and the stream's max_msg_size.
 * Retrying those only repeats the refusal, and stopping the batch at them would hold up
 * every other key behind one event.
 */
export function refusedForGood(err: unknown): string | undefined {
  if (err instanceof InvalidArgumentError && /max_payload/.test(err.message)) {
    return `larger than the server's max_payload (${err.message})`
  }
  if (err instanceof JetStreamApiError && err.code === STREAM_MESSAGE_TOO_LARGE) {
    return `larger than the stream's max_msg_size (${err.message})`
  }
  return undefined
}

export function subjectOf(prefix: string, topic: string): string {
  return `${prefix}.${topic}`
}

async function publishOne(js: JetStreamClient, row: OutboxRow, o: PublishBatchOptions) {
  const id = `${o.site}:${row.seq}`
  const subject = subjectOf(o.subjectPrefix, row.topic)
  const h = natsHeaders()
  // The writer's stored context is the parent of the producer span, so the trace runs
  // writer → relay → consumers as one. Without an SDK the stored context is passed on as is.
  if (row.trace) for (const [k, v] of Object.entries(row.trace)) h.set(k, v)
  const parent = row.trace ? propagation.extract(context.active(), row.trace) : context.active()
  const span = tracer.startSpan(
    `send ${subject}`,
    {
      kind: SpanKind.PRODUCER,
      attributes: {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.destination.name": subject,
        "messaging.message.id": id,
      },
    },
    parent,
  )
  propagation.inject(trace.setSpan(parent, span), h, {
    set: (carrier, key, value) => carrier.set(key, value),
  })
  try {
    // Nats-Msg-Id only, never Nats-Expected-* headers: 2.9.10 re-checks those on sourced
    // copies and the source retries forever (reference/nats-2.9.md rule 1).
    const ack = await js.publish(
      subject,
      encodeEnvelope({
        id,
        site: o.site,
        seq: row.seq,
        topic: row.topic,
        key: row.key,
        ver: row.ver,
        type: row.type,
        payload: row.payload,
        createdAt: row.created_at.toISOString(),
      }),
      { msgID: id, headers: h, timeout: o.timeoutMs },
    )
    return ack
  } catch (err) {
    span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message })
    throw err
  } finally {
    span.end()
  }
}

/**
 * Publishes a claimed batch: keys in parallel, at most `window` PubAcks outstanding, and
 * within one key strictly one after the other in version order, so the stream holds each
 * key's events in version order. When a publish fails its key stops there: sending version
 * n+1 after n failed would put them in the stream out of order on the retry. A failure that
 * may pass (NATS down, say) also stops the batch from starting more keys; a refusal for good
 * stops its key only.
 */
export async function publishBatch(
  js: JetStreamClient,
  rows: readonly OutboxRow[],
  options: PublishBatchOptions,
): Promise<PublishBatchResult> {
  const chains = new Map<string, OutboxRow[]>()
  for (const row of rows) {
    const k = `${row.topic}\u001f${row.key}`
    const chain = chains.get(k)
    if (chain) chain.push(row)
    else chains.set(k, [row])
  }
  const queue = [...chains.values()]
  const published: PublishedRow[] = []
  const refused: PublishBatchResult["refused"] = []
  let error: unknown
  let next = 0
  const worker = async () => {
    while (error === undefined && next < queue.length) {
      const chain = queue[next++]!
      for (const row of chain) {
        try {
          const ack = await publishOne(js, row, options)
          published.push({ seq: row.seq, streamSeq: ack.seq, duplicate: ack.duplicate })
        } catch (err) {
          const reason = refusedForGood(err)
          if (reason === undefined) error ??= err
          else refused.push({ row, reason })
          break
        }
      }
    }
  }
  const workers = Math.max(1, Math.min(options.window, queue.length))
  await Promise.all(Array.from({ length: workers }, worker))
  return error === undefined ? { published, refused } : { published, refused, error }
}
