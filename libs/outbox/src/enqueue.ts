import { type EventType, findEventType, InvalidEventError, nameProblem } from "@keyway/schemas"
import { context, propagation } from "@opentelemetry/api"
import { type Kysely, sql } from "kysely"

/** What a writer hands to {@link enqueue}. The topic comes from the event type. */
export interface OutboxEvent<P = unknown> {
  /** A registered event type name, e.g. `demo.item.changed.v1`. */
  type: string
  /** The ordering key within the type's topic (a label MAC, an order id, …). */
  key: string
  payload: P
}

/** One enqueued event, as it will be published once the transaction commits. */
export interface EnqueuedEvent {
  seq: number
  topic: string
  key: string
  ver: number
  type: string
}

export interface EnqueueOptions {
  /**
   * The largest payload accepted, in bytes of its JSON. Default {@link DEFAULT_MAX_PAYLOAD_BYTES}.
   * For a NATS server whose max_payload is below the default 1 MiB: its max_payload less 8 KiB,
   * the room the envelope and the message headers take; at max_payload itself an event near
   * the limit is accepted here and can never be published.
   */
  maxPayloadBytes?: number
}

export class EnqueueError extends Error {
  override name = "EnqueueError"
}

/**
 * NATS refuses a message larger than its server's max_payload (1 MiB unless configured),
 * so an event over it could never leave the outbox: refused here, where the writer still
 * sees the error and its transaction rolls back. 8 KiB below 1 MiB leaves room for the
 * envelope around the payload and the message headers.
 */
export const DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024 - 8 * 1024

// What JSON.stringify writes for a NUL and for half of a surrogate pair (a whole pair it writes
// as is): Postgres' jsonb stores neither, and refused the whole transaction with a bare
// 22P05 or 22P02 naming no event. An escape starts at a backslash that is not itself escaped.
const UNSTORABLE = /(?<!\\)(?:\\\\)*\\u(?:0000|d[89a-f][0-9a-f]{2})/i

/** The path of the first string in `value` (a key or a value) that jsonb cannot store. */
function unstorablePath(value: unknown, path = "payload"): string | undefined {
  const bad = (s: string) => s.includes("\u0000") || !s.isWellFormed()
  if (typeof value === "string") return bad(value) ? path : undefined
  if (value === null || typeof value !== "object") return undefined
  for (const [k, v] of Object.entries(value)) {
    const at = `${path}${Array.isArray(value) ? `[${k}]` : `.${k}`}`
    if (bad(k)) return at
    const found = unstorablePath(v, at)
    if (found) return found
  }
  return undefined
}

function check(
  event: OutboxEvent,
  index: number,
  maxPayloadBytes: number,
  /** The stored trace context's bytes: the relay sends them as the message's headers. */
  traceBytes: number,
): { def: EventType; json: string } {
  const where = `event #${index + 1}`
  if (event === null || typeof event !== "object")
    throw new EnqueueError(`${where} is not an object`)
  const def = findEventType(event.type)
  if (!def) throw new EnqueueError(`${where}: unknown event type ${JSON.stringify(event.type)}`)
  if (typeof event.key !== "string") {
    throw new EnqueueError(`${where} (${event.type}): key must be a string`)
  }
  // The consumers' envelope check: a key written here that they refused would be lost.
  const badKey = nameProblem(event.key)
  if (badKey) throw new EnqueueError(`${where} (${event.type}): key ${badKey}`)
  // InvalidEventError names the type and every bad field; said here which event of the
  // call it is, one among hundreds of the same type perhaps.
  let payload: unknown
  try {
    payload = def.check(event.payload)
  } catch (err) {
    if (!(err instanceof InvalidEventError)) throw err
    throw new InvalidEventError(err.type, err.reason, {
      cause: err,
      at: `#${index + 1} (key ${event.key})`,
    })
  }
  const wrongKey = def.wrongKey(event.key, payload)
  if (wrongKey) {
    throw new InvalidEventError(def.type, wrongKey, { at: `#${index + 1} (key ${event.key})` })
  }
  const json = JSON.stringify(event.payload)
  if (json.includes("\\u") && UNSTORABLE.test(json)) {
    throw new EnqueueError(
      `${where} (${event.type}, key ${event.key}): ${unstorablePath(event.payload)} holds a NUL character or half of a surrogate pair, which Postgres cannot store`,
    )
  }
  // Byte length only when it could matter: UTF-8 is at most 3 bytes per UTF-16 unit.
  if (json.length * 3 + traceBytes > maxPayloadBytes) {
    const bytes = Buffer.byteLength(json)
    if (bytes + traceBytes > maxPayloadBytes) {
      // The trace context counts too: W3C baggage, which a caller's request brings, may reach
      // 8 KiB, and a message over max_payload with it held its key for good at the relay.
      const trace =
        traceBytes > 0 ? ` and ${traceBytes} of trace context (W3C baggage included)` : ""
      throw new EnqueueError(
        `${where} (${event.type}, key ${event.key}): payload is ${bytes} bytes of JSON${trace}, over the ${maxPayloadBytes} allowed (a NATS message may not exceed the server's max_payload)`,
      )
    }
  }
  return { def, json }
}

/** The active span's W3C trace context as the outbox's `trace` column holds it, or null. */
function activeTraceContext(): string | null {
  const carrier: Record<string, string> = {}
  propagation.inject(context.active(), carrier)
  return carrier.traceparent ? JSON.stringify(carrier) : null
}

/**
 * Adds events to the outbox inside the caller's transaction, so they exist if and only if
 * that transaction commits (DESIGN.md invariant 1).
 *
 * Each event gets the next global `seq` and the next version of its (topic, key); several
 * events of one key get consecutive versions in the order given. Everything is validated
 * before anything is written: a bad event throws and the caller's transaction, rolled back,
 * leaves nothing. The relay is woken by a NOTIFY that Postgres delivers at commit.
 *
 * Its statement is a round trip of its own. A writer whose event does not need the result of
 * its domain statements can issue them together in `runPipelinedTransaction` (`@keyway/db`),
 * and the two share one round trip:
 *
 * ```ts
 * await runPipelinedTransaction(db, (trx) =>
 *   Promise.all([trx.insertInto("order").values(order).execute(), enqueue(trx, event)]),
 * )
 * ```
 *
 * That shortens a transaction, not the machine's work: `BENCH_WRITERS=2 just bench relay`
 * made 13% more commits pipelined (3,733 against 3,291 per second); with the default 8
 * writers, which saturate two cores, both patterns make about as many. A bad event, or a
 * failed domain statement, still rolls back everything sent alongside it.
 */
export async function enqueue(
  trx: Kysely<any>,
  events: OutboxEvent | readonly OutboxEvent[],
  options: EnqueueOptions = {},
): Promise<EnqueuedEvent[]> {
  // Outside a transaction each statement would commit on its own, so an event could
  // outlive the domain rows it describes: exactly what the outbox exists to prevent.
  if (!trx.isTransaction) {
    throw new EnqueueError(
      "enqueue must run inside a transaction: call it with the trx of db.transaction().execute(async (trx) => …)",
    )
  }
  const list = Array.isArray(events) ? events : [events as OutboxEvent]
  if (list.length === 0) return []
  const maxPayloadBytes = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES
  // NaN (an unset variable read as a number) made every size check false: any payload went
  // in, and one past the server's max_payload held its key in the relay for good.
  if (!Number.isSafeInteger(maxPayloadBytes) || maxPayloadBytes < 1) {
    throw new EnqueueError(
      `maxPayloadBytes must be a whole number of at least 1, not ${maxPayloadBytes}`,
    )
  }
  const trace = activeTraceContext()
  const traceBytes = trace === null ? 0 : Buffer.byteLength(trace)
  const checked = list.map((event, i) => ({
    event,
    ...check(event, i, maxPayloadBytes, traceBytes),
  }))
  if (checked.length === 1) {
    const { event, def, json } = checked[0]!
    const [row] = await enqueueOne(trx, def, event, json, trace)
    // Number(): int8 comes back as a string from a Kysely whose pool createDb did not make.
    return [
      {
        seq: Number(row!.seq),
        ver: Number(row!.ver),
        topic: def.topic,
        key: event.key,
        type: def.type,
      },
    ]
  }
  // The distinct (topic, key) pairs, sorted: keyway.enqueue() locks their heads in this
  // order, so writers touching overlapping keys never deadlock.
  const pairIndex = new Map<string, number>()
  const pairs = [...new Set(checked.map(({ event, def }) => `${def.topic}\u0000${event.key}`))]
    .sort()
    .map((joined, i) => {
      pairIndex.set(joined, i + 1)
      const [topic, key] = joined.split("\u0000") as [string, string]
      return { topic, key, count: 0 }
    })
  const pairOf: number[] = []
  const nth: number[] = []
  for (const { event, def } of checked) {
    const p = pairIndex.get(`${def.topic}\u0000${event.key}`)!
    pairOf.push(p)
    nth.push(++pairs[p - 1]!.count)
  }
  const result = await sql<{ seq: number; ver: number }>`
    select seq, ver from keyway.enqueue(
      ${pairs.map((p) => p.topic)}::text[], ${pairs.map((p) => p.key)}::text[],
      ${pairs.map((p) => p.count)}::int[], ${pairOf}::int[], ${nth}::int[],
      ${checked.map(({ def }) => def.type)}::text[],
      ${checked.map(({ json }) => json)}::jsonb[],
      ${trace}::jsonb
    )
  `.execute(trx)
  // Rows come back in no particular order; the i-th event holds the i-th smallest seq.
  const assigned = result.rows
    .map((r) => ({ seq: Number(r.seq), ver: Number(r.ver) }))
    .sort((a, b) => a.seq - b.seq)
  return checked.map(({ event, def }, i) => ({
    seq: assigned[i]!.seq,
    ver: assigned[i]!.ver,
    topic: def.topic,
    key: event.key,
    type: def.type,
  }))
}

/**
 * One event, the common case (a domain change and the event that announces it), as one
 * statement instead of a call to keyway.enqueue(): the same two steps, the key head's bump
 * and then the seq, without PL/pgSQL's per-call cost or the array parameters.
 * Measured (`bench/src/relay.ts` pattern, 8 writers, medians of 6 interleaved 4 s runs):
 * 4,950 -> 5,850 commits/s against 10,080 bare.
 *
 * The order of the two steps holds within the statement: the insert below reads its one row
 * from `head`, which exists only once the upsert holds the key head's row lock, and only
 * then computes nextval() for it. A writer that waited on the lock gets a seq above the
 * one it waited for, so within a key seq order is version order (DESIGN.md §3).
 * `wake` is joined so that it runs: Postgres skips a WITH query that nothing reads.
 */
function enqueueOne(
  trx: Kysely<any>,
  def: EventType,
  event: OutboxEvent,
  json: string,
  trace: string | null,
) {
  return sql<{ seq: number; ver: number }>`
    with head as (
      insert into keyway.outbox_key_head as h (topic, key, ver)
      values (${def.topic}, ${event.key}, 1)
      on conflict (topic, key) do update set ver = h.ver + 1
      returning h.ver
    ),
    wake as (
      select pg_notify('keyway_outbox', '') from keyway.relay_state where id = 1 and listening
    )
    insert into keyway.outbox as o (seq, topic, key, ver, type, payload, trace)
    select nextval('keyway.outbox_seq'), ${def.topic}, ${event.key}, head.ver, ${def.type},
           ${json}::jsonb, ${trace}::jsonb
      from head left join wake on true
    returning o.seq, o.ver
  `
    .execute(trx)
    .then((r) => r.rows)
}
