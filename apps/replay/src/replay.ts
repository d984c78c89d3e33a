// Reads a stream's messages back, as a developer debugging a flow wants them: decoded, in
// stream order, from a point in the stream, without disturbing anything. An ordered consumer
// is the JetStream way to do that: ephemeral, in server memory, unacknowledged, deleted when
// the read ends (else the server drops it 5 minutes after); the groups' durables never see it.
import { isUtf8 } from "node:buffer"
import { randomBytes } from "node:crypto"
import { setTimeout as sleep } from "node:timers/promises"
import { decodeEnvelope } from "@keyway/schemas"
import {
  AckPolicy,
  type Consumer,
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  JetStreamError,
  type JsMsg,
} from "@nats-io/jetstream"
import { Match, RequestError, TimeoutError } from "@nats-io/transport-node"

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
  /** Told when the read waits for a server that shut down to come back. */
  onWait?: (reason: string) => void
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
  | {
      error: string
      /** Its bytes: as text when they are UTF-8, else in base64; at most the first 1,000. */
      data?: string
      dataBase64?: string
      /** How many bytes it has. */
      size: number
      /** Whether `data` or `dataBase64` holds only the first of them. */
      truncated: boolean
    }
)

function toLine(m: JsMsg): ReplayLine {
  const head = { streamSeq: m.seq, time: m.time.toISOString(), subject: m.subject }
  try {
    const e = decodeEnvelope(m.data)
    // Header names are matched as HTTP's are, whatever case a publisher wrote.
    const traceparent = m.headers?.get("traceparent", Match.IgnoreCase) || undefined
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
    return { ...head, error: (err as Error).message, ...bytesOf(m.data) }
  }
}

const SHOWN_BYTES = 1000
const utf8 = new TextDecoder("utf-8")

/**
 * A body as it is: decoded leniently, bytes that are not UTF-8 (protobuf, gzip, Latin-1)
 * printed as U+FFFD, which gave neither the bytes back nor a sign that they were lost.
 */
function bytesOf(data: Uint8Array) {
  const shown = data.subarray(0, SHOWN_BYTES)
  const truncated = data.length > SHOWN_BYTES
  // The whole body decides, not its first bytes: a Latin-1 body whose first non-ASCII byte
  // came past the cut read as text.
  if (!isUtf8(data)) {
    return { dataBase64: Buffer.from(shown).toString("base64"), size: data.length, truncated }
  }
  // A cut may split a character: its start is dropped, not turned into U+FFFD.
  return { data: utf8.decode(truncated ? whole(shown) : shown), size: data.length, truncated }
}

/** `bytes` without a UTF-8 character cut at its end (at most 3 bytes of one). */
function whole(bytes: Uint8Array): Uint8Array {
  for (let back = 1; back <= Math.min(3, bytes.length); back++) {
    const b = bytes[bytes.length - back]!
    if ((b & 0xc0) === 0x80) continue // a continuation byte: look further back
    // A lead byte: keep it only if its character is complete.
    const need = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1
    return need > back ? bytes.subarray(0, bytes.length - back) : bytes
  }
  return bytes
}

/** What a read has done so far, kept across the consumers it may take. */
interface Progress {
  printed: number
  /** The last stream sequence delivered, printed or not. */
  lastSeq?: number
  /** The server-side consumer that delivered it, and its delivery count then. */
  lastDelivery?: { consumer: string; seq: number }
}

/**
 * Prints (through `print`) the stream's messages in order; returns how many were printed.
 * Without `follow`, it ends at the last message the stream held when it started.
 *
 * The ordered consumer lives in the server's memory only: the server drops it after 5
 * minutes without a pull (a reader paused on a full pipe, `| less`), or with its own restart.
 * The read then goes on with a new one from the message after the last delivered, so it
 * neither stops nor repeats. A server that shuts down (a restart for an upgrade, say) is
 * waited for, as the connection waits for it, until `signal` aborts.
 */
export async function replay(
  js: JetStreamClient,
  options: ReplayOptions,
  print: (line: ReplayLine) => void,
): Promise<number> {
  const start =
    options.fromSeq ??
    (options.since !== undefined
      ? await firstSeqSince(js, options.stream, options.since)
      : undefined)
  const open = (startSeq = start) =>
    js.consumers.get(options.stream, {
      ...(options.subject ? { filter_subjects: options.subject } : {}),
      ...(startSeq !== undefined
        ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: startSeq }
        : { deliver_policy: DeliverPolicy.All }),
    })
  const progress: Progress = { printed: 0 }
  let consumer = await open()
  /** A new consumer from the message after the last delivered; with none yet, the start. */
  const reopen = () => open(progress.lastSeq === undefined ? undefined : progress.lastSeq + 1)
  // Consumers lost in a row with nothing delivered between: past a few, it is not the server
  // tidying up but something deleting them as fast as they come.
  let lostInARow = 0
  try {
    for (;;) {
      const before = progress.lastSeq
      try {
        return await readAll(consumer, options, print, progress)
      } catch (err) {
        // Found gone by a pull request (the API's "not found"), or while one waited (a 409);
        // or messages it sent were lost on the way.
        const gone =
          err instanceof LostInFlight ||
          (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound) ||
          (err instanceof JetStreamError &&
            (err as { code?: number }).code === 409 &&
            /consumer deleted/i.test(err.message))
        if (isShutdown(err)) {
          // Its consumers go with it: nothing to delete, and a delete would wait for the
          // server. The connection reconnects on its own; the new consumer waits for that.
          options.onWait?.("the server is shutting down; waiting for it to come back")
          const next = await untilBack(reopen, options.signal)
          if (next === undefined) return progress.printed
          consumer = next
          // Not a loss of the kind counted below: the new consumer may even have been made
          // by the server on its way down, and be found gone once it is back.
          lostInARow = 0
          continue
        }
        if (!gone) throw err
        lostInARow = progress.lastSeq === before ? lostInARow + 1 : 1
        if (lostInARow > 3) throw err
        await consumer.delete().catch(() => {})
        consumer = await reopen()
      }
    }
  } finally {
    // Bounded: with the server away, the request would wait its whole timeout, and an
    // interrupted read with it. The server drops an ordered consumer by itself in 5 minutes.
    await Promise.race([consumer.delete().catch(() => {}), sleep(1000, undefined, { ref: false })])
  }
}

/**
 * The answer a pull gets when its server shuts down cleanly; a crash instead shows as a
 * missed heartbeat, which nats.js's ordered consumer mends by itself.
 */
const isShutdown = (err: unknown) =>
  err instanceof JetStreamError &&
  (err as { code?: number }).code === 409 &&
  /server shutdown/i.test(err.message)

/**
 * Tries `open` until the server answers, or undefined once `signal` aborts. Only what the
 * wait explains is tried again: no answer (a request times out while the server is down, and
 * finds no responders while its JetStream starts). An answer (the stream is gone, say) or a
 * closed connection ends the read.
 */
export async function untilBack(
  open: () => Promise<Consumer>,
  signal: AbortSignal | undefined,
): Promise<Consumer | undefined> {
  for (;;) {
    if (signal?.aborted) return undefined
    try {
      // A try waits up to 5 s for a server that is down: the interrupt does not wait for it.
      // The ordered consumer creates its server-side consumer as it opens, so one that opens
      // after the interrupt is deleted.
      return await unlessAborted(open(), signal, (late) => late.delete())
    } catch (err) {
      if (!unanswered(err)) throw err
    }
    await sleep(500, undefined, { signal }).catch(() => {})
  }
}

const noResponders = (err: unknown) => err instanceof RequestError && err.isNoResponders()

/**
 * A request that got no answer: timed out, or found no responders (nats.js reports that on
 * an API request as "JetStream not enabled", with the RequestError as its cause).
 */
const unanswered = (err: unknown) =>
  err instanceof TimeoutError || noResponders(err) || noResponders((err as Error)?.cause)

/**
 * `promise`, or undefined as soon as `signal` aborts; what the promise brings after that is
 * handed to `discard`.
 */
async function unlessAborted<T>(
  promise: Promise<T>,
  signal: AbortSignal | undefined,
  discard: (late: T) => unknown,
): Promise<T | undefined> {
  if (!signal) return promise
  let onAbort = () => {}
  const aborted = new Promise<undefined>((resolve) => {
    onAbort = () => resolve(undefined)
  })
  if (signal.aborted) onAbort()
  else signal.addEventListener("abort", onAbort, { once: true })
  try {
    const value = await Promise.race([promise, aborted])
    if (signal.aborted) {
      promise.then(discard).catch(() => {})
      return undefined
    }
    return value
  } finally {
    signal.removeEventListener("abort", onAbort)
  }
}

/**
 * The sequence of the stream's first message stored at or after `since` (the next one to be
 * stored, if none is). The ordered consumer is never given a time: when nats.js replaces its
 * server-side consumer after a gap in delivery (a reconnect after the server dropped a slow
 * reader, say), it keeps opt_start_time beside the new start sequence, which nats-server 2.9
 * refuses (10094), and the read stalled for good. The server works the time out: a consumer
 * created to start there reports the sequence before its first message as delivered.
 */
async function firstSeqSince(js: JetStreamClient, stream: string, since: Date): Promise<number> {
  const jsm = await js.jetstreamManager()
  const probe = await jsm.consumers.add(stream, {
    // Named, so that it is created on the API subject a user's permissions name
    // (CONSUMER.CREATE.<stream>.<name>), as the ordered consumer's is.
    name: `replay_since_${randomBytes(6).toString("hex")}`,
    deliver_policy: DeliverPolicy.StartTime,
    opt_start_time: since.toISOString(),
    ack_policy: AckPolicy.None,
    mem_storage: true,
    // Gone by itself (after a minute, in nanoseconds) should the delete below not reach it.
    inactive_threshold: 60e9,
  })
  await jsm.consumers.delete(stream, probe.name).catch(() => {})
  return probe.delivered.stream_seq + 1
}

async function readAll(
  consumer: Consumer,
  options: ReplayOptions,
  print: (line: ReplayLine) => void,
  progress: Progress,
): Promise<number> {
  for (;;) {
    if (options.signal?.aborted) return progress.printed
    // Short waits: without `follow` a fetch that finds nothing means the filtered view is
    // exhausted (each message also says how many follow it, which ends the read at once);
    // with it, an interrupt is seen within a second.
    // While the server is away, the fetch waits for it (the ordered consumer making a new
    // server-side consumer), and so does the batch's iteration: an interrupt ends both.
    const batch = await unlessAborted(
      consumer.fetch({ max_messages: 256, expires: 1000 }),
      options.signal,
      (late) => late.stop(),
    )
    if (batch === undefined) return progress.printed
    const stopBatch = () => batch.stop()
    options.signal?.addEventListener("abort", stopBatch, { once: true })
    let got = 0
    try {
      for await (const m of batch) {
        got++
        // Aborted (an interrupt, or the reader of the output gone): print nothing more.
        if (options.signal?.aborted) return progress.printed
        if (options.toSeq !== undefined && m.seq > options.toSeq) return progress.printed
        progress.lastSeq = m.seq
        progress.lastDelivery = { consumer: m.info.consumer, seq: m.info.deliverySequence }
        const line = toLine(m)
        // A start past the stream's last message is taken by the server as its next one (the
        // first, on a stream never written): `--from-seq 1000 --follow` on one at 500 printed
        // 501-999.
        const asked = options.fromSeq === undefined || m.seq >= options.fromSeq
        if (asked && (options.key === undefined || ("key" in line && line.key === options.key))) {
          print(line)
          progress.printed++
          if (options.limit !== undefined && progress.printed >= options.limit) {
            return progress.printed
          }
        }
        if (options.toSeq !== undefined && m.seq >= options.toSeq) return progress.printed
        if (!options.follow && m.info.pending === 0) return progress.printed
      }
    } finally {
      options.signal?.removeEventListener("abort", stopBatch)
    }
    if (options.signal?.aborted) return progress.printed
    if (got === 0) {
      // Messages the server sent on a connection it then dropped (a reader paused past its
      // write deadline) are lost in flight. nats.js's ordered consumer notices only when a
      // later message arrives: with none coming, a read with --follow waited for ever short of
      // them, and one without ended short of them, both without a word.
      // Counted in deliveries, not stream sequences: a filtered consumer's delivered stream
      // sequence also moves past the other subjects' messages it steps over, and reading one
      // subject of a busy stream was taken for a loss at every empty fetch.
      const info = await consumer.info()
      const received = progress.lastDelivery?.consumer === info.name ? progress.lastDelivery.seq : 0
      if (info.delivered.consumer_seq > received) throw new LostInFlight(info.name)
    }
    if (got === 0 && !options.follow) return progress.printed
  }
}

/** The server delivered messages past the last one this read received. */
class LostInFlight extends Error {
  constructor(consumer: string) {
    super(
      `consumer ${consumer} delivered messages that never arrived, and its replacements lost theirs too`,
    )
  }
}
