import { decodeEnvelope, type EventEnvelope, encodeEnvelope } from "@keyway/schemas"
import {
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  type PubAck,
  type StoredMsg,
} from "@nats-io/jetstream"
import {
  InvalidArgumentError,
  headers as natsHeaders,
  PermissionViolationError,
  RequestError,
} from "@nats-io/transport-node"
import { context, propagation, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api"
import { errorMessage } from "./error-message.ts"
import type { OutboxRow, PublishedRow } from "./outbox-row.ts"

const tracer = trace.getTracer("@keyway/outbox")

export interface PublishBatchOptions {
  site: string
  subjectPrefix: string
  /** Most publishes awaiting their PubAck at once. */
  window: number
  timeoutMs: number
  /**
   * Sent in the order given, which the stream then stores them in (see publishInOrder),
   * rather than each key on its own: for rows sent again after a loss (claimBatch's `resent`).
   */
  inOrder?: boolean
}

export interface PublishBatchResult {
  published: PublishedRow[]
  /**
   * Rows NATS refused in a way that a retry soon would only repeat (see {@link refusal}), or
   * whose id the stream holds for another event (see {@link notThisEvent}), with what the
   * refusal holds back and why. Rows after one in the same key were not sent;
   * nor were later keys of a held topic. The others went on.
   */
  refused: { row: OutboxRow; holds: "key" | "topic"; reason: string }[]
  /** The first other failure; the batch stopped taking keys at it. */
  error?: unknown
}

// nats-server's JSStreamMessageExceedsMaximumErr: larger than the stream's max_msg_size.
const STREAM_MESSAGE_TOO_LARGE = 10054

/**
 * What a failed publish says about the rows behind it, or undefined for a failure that may
 * pass for the whole connection (a timeout, a lost connection): the batch stops there.
 *
 * - "key": this event will never fit (the server's max_payload, which nats.js checks before
 *   sending, or the stream's max_msg_size). Its key's later versions wait behind it; the
 *   other keys of its topic are not concerned.
 * - "topic": the server answered for the subject: no stream takes it (no responders), its
 *   stream refused the message (full with discard new, sealed, out of storage), or the
 *   relay's NATS user may not publish to it. Every key of the topic would get the same
 *   answer; the other topics would not, and stopping the batch at it would hold the whole
 *   outbox behind one topic's missing stream or permission.
 */
export function refusal(
  err: unknown,
  subject: string,
): { holds: "key" | "topic"; reason: string } | undefined {
  if (err instanceof InvalidArgumentError && /max_payload/.test(err.message)) {
    return { holds: "key", reason: `larger than the server's max_payload (${err.message})` }
  }
  if (err instanceof JetStreamApiError && err.code === STREAM_MESSAGE_TOO_LARGE) {
    return { holds: "key", reason: `larger than the stream's max_msg_size (${err.message})` }
  }
  // nats.js reports a publish that no stream answers as "jetstream is not enabled", with the
  // server's no-responders status as its cause.
  const cause = (err as Error | undefined)?.cause
  if (cause instanceof RequestError && cause.isNoResponders()) {
    return { holds: "topic", reason: "no stream takes the subject (no responders)" }
  }
  if (err instanceof JetStreamApiError) {
    return { holds: "topic", reason: `the stream refused it (${err.code}: ${err.message})` }
  }
  // Only a refusal to publish to the event's own subject. nats.js fails every request in
  // flight with a PermissionViolationError when the reply inbox's subscription is refused
  // too; that is the connection's fault, not any topic's.
  const denied = [err, cause].find(
    (e): e is PermissionViolationError =>
      e instanceof PermissionViolationError && e.operation === "publish" && e.subject === subject,
  )
  if (denied) {
    return {
      holds: "topic",
      reason: `this relay's NATS user may not publish to the subject (${denied.message})`,
    }
  }
  return undefined
}

export function subjectOf(prefix: string, topic: string): string {
  return `${prefix}.${topic}`
}

function envelopeOf(row: OutboxRow, site: string): EventEnvelope {
  return {
    id: `${site}:${row.seq}`,
    site,
    seq: row.seq,
    topic: row.topic,
    key: row.key,
    ver: row.ver,
    type: row.type,
    payload: row.payload,
    createdAt: row.created_at.toISOString(),
  }
}

const managers = new WeakMap<JetStreamClient, Promise<JetStreamManager>>()

/**
 * Why a duplicate PubAck does not mean that the row is published, or undefined when it does.
 *
 * A duplicate is the stream saying it holds a message under the row's Nats-Msg-Id already.
 * For a row marked unpublished to be sent again (a re-publish after a lost connection) the
 * relay knows where: the stream_seq it marked. For any other row, after a crash between
 * publish and mark, the message is this very event, and the row is published. But after the
 * outbox's database is restored from a backup, or fails over to a replica that lagged, its
 * sequence gives out seqs again, and the message under `<site>:<seq>` is an earlier event.
 * Marking the row published then loses the new event without a word. So the stored message
 * is read back (a rare request: crashes and restores only) and compared with the row.
 */
async function notThisEvent(
  js: JetStreamClient,
  ack: PubAck,
  row: OutboxRow,
  site: string,
): Promise<string | undefined> {
  if (!ack.duplicate || row.stream_seq === ack.seq) return undefined
  let managing = managers.get(js)
  if (!managing) {
    managing = js.jetstreamManager(false)
    managers.set(js, managing)
  }
  let stored: StoredMsg | null
  try {
    stored = await (await managing).streams.getMessage(ack.stream, { seq: ack.seq })
  } catch (err) {
    // A user without the right would fail every such read alike: its key is held, with
    // what to grant, and the other keys go on.
    const readBack = `$JS.API.STREAM.MSG.GET.${ack.stream}`
    // This request's own refusal only: one of the reply inbox is the connection's (refusal()).
    const denied = [err, (err as Error | undefined)?.cause].some(
      (e) =>
        e instanceof PermissionViolationError &&
        e.operation === "publish" &&
        e.subject === readBack,
    )
    if (denied) {
      return `the stream holds its id ${site}:${row.seq} from an earlier publish, and this relay's NATS user may not read that message back to tell whether it is this event (${errorMessage(err)}): allow it ${readBack}`
    }
    // Any other failed read says nothing about the topic or the key (refusal() would take a
    // JetStreamApiError for the stream's answer to the publish): the batch stops, and the
    // row is tried again like after a timeout.
    throw new Error(`reading back message ${ack.seq} of ${ack.stream}: ${errorMessage(err)}`)
  }
  const restored =
    "its outbox gave the seq out twice: its database restored from a backup, or failed over to a replica that lagged?"
  if (stored === null) {
    // Gone from the stream (limits, a purge) while its id is still in the duplicate window.
    // Held until the window has passed, when the publish stores it: a copy at worst, which
    // consumers drop by event id.
    return `the stream holds its id ${site}:${row.seq} from an earlier publish, whose message (${ack.stream} ${ack.seq}) is gone, so it cannot be told apart from another event: if it is not this one, ${restored}`
  }
  let earlier: EventEnvelope
  try {
    earlier = decodeEnvelope(stored.data)
  } catch (err) {
    return `its id ${site}:${row.seq} is taken in ${ack.stream} (at ${ack.seq}) by a message that is not an event (${errorMessage(err)}): ${restored}`
  }
  const mine = envelopeOf(row, site)
  const same =
    earlier.topic === mine.topic &&
    earlier.key === mine.key &&
    earlier.ver === mine.ver &&
    earlier.type === mine.type &&
    earlier.createdAt === mine.createdAt &&
    JSON.stringify(earlier.payload) === JSON.stringify(mine.payload)
  if (same) return undefined
  return `its id ${site}:${row.seq} is taken in ${ack.stream} (at ${ack.seq}) by another event (${earlier.topic}/${earlier.key} v${earlier.ver}, ${earlier.type}, created ${earlier.createdAt}): ${restored}`
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
    const ack = await js.publish(subject, encodeEnvelope(envelopeOf(row, o.site)), {
      msgID: id,
      headers: h,
      timeout: o.timeoutMs,
    })
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
 * may pass (NATS down, say) also stops the batch from starting more keys; a refusal stops
 * its key, or its topic, only.
 */
export async function publishBatch(
  js: JetStreamClient,
  rows: readonly OutboxRow[],
  options: PublishBatchOptions,
): Promise<PublishBatchResult> {
  if (options.inOrder) return publishInOrder(js, rows, options)
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
  const refusedTopics = new Set<string>()
  let error: unknown
  let next = 0
  const worker = async () => {
    while (error === undefined && next < queue.length) {
      const chain = queue[next++]!
      for (const row of chain) {
        // Left for the relay's next claim of the topic, which holds it back meanwhile.
        if (refusedTopics.has(row.topic)) break
        try {
          const ack = await publishOne(js, row, options)
          const taken = await notThisEvent(js, ack, row, options.site)
          if (taken !== undefined) {
            refused.push({ row, holds: "key", reason: taken })
            break
          }
          published.push({ seq: row.seq, streamSeq: ack.seq, duplicate: ack.duplicate })
        } catch (err) {
          const r = refusal(err, subjectOf(options.subjectPrefix, row.topic))
          if (r === undefined) error ??= err
          else if (r.holds === "key") refused.push({ row, ...r })
          else if (!refusedTopics.has(row.topic)) {
            refusedTopics.add(row.topic)
            refused.push({ row, ...r })
          }
          break
        }
      }
    }
  }
  const workers = Math.max(1, Math.min(options.window, queue.length))
  await Promise.all(Array.from({ length: workers }, worker))
  return error === undefined ? { published, refused } : { published, refused, error }
}

/**
 * Publishes `rows` in their order, with up to `window` awaiting their PubAck. A connection's
 * messages reach the server in the order they were written, and nats.js writes each publish
 * before its first await, so the stream stores them in this order as long as each is taken.
 * The first refusal or failure ends the sending (the rows already sent are answered): a row
 * sent past it would come before it in the stream, which is the order this exists to keep.
 */
async function publishInOrder(
  js: JetStreamClient,
  rows: readonly OutboxRow[],
  options: PublishBatchOptions,
): Promise<PublishBatchResult> {
  const published: PublishedRow[] = []
  const refused: PublishBatchResult["refused"] = []
  let error: unknown
  const stopped = () => error !== undefined || refused.length > 0
  const inFlight = new Set<Promise<void>>()
  const send = async (row: OutboxRow) => {
    try {
      const ack = await publishOne(js, row, options)
      const taken = await notThisEvent(js, ack, row, options.site)
      if (taken !== undefined) refused.push({ row, holds: "key", reason: taken })
      else published.push({ seq: row.seq, streamSeq: ack.seq, duplicate: ack.duplicate })
    } catch (err) {
      const r = refusal(err, subjectOf(options.subjectPrefix, row.topic))
      if (r === undefined) error ??= err
      else refused.push({ row, ...r })
    }
  }
  for (const row of rows) {
    while (inFlight.size >= Math.max(1, options.window)) await Promise.race(inFlight)
    if (stopped()) break
    const sending = send(row)
    inFlight.add(sending)
    void sending.finally(() => inFlight.delete(sending))
  }
  await Promise.all(inFlight)
  return error === undefined ? { published, refused } : { published, refused, error }
}
