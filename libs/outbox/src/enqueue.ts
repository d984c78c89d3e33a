import { type EventType, findEventType } from "@keyway/schemas"
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

export class EnqueueError extends Error {
  override name = "EnqueueError"
}

// Keys end up in logs, the inbox and admin commands; a bound and no control characters keep
// them printable and indexable. Everything else about a key is the domain's business.
const MAX_KEY_LENGTH = 256
// biome-ignore lint/suspicious/noControlCharactersInRegex: rejecting control characters is the point
const CONTROL = /[\u0000-\u001f\u007f]/

function check(event: OutboxEvent, index: number): { def: EventType } {
  const where = `event #${index + 1}`
  if (event === null || typeof event !== "object")
    throw new EnqueueError(`${where} is not an object`)
  const def = findEventType(event.type)
  if (!def) throw new EnqueueError(`${where}: unknown event type ${JSON.stringify(event.type)}`)
  if (typeof event.key !== "string" || event.key.length === 0) {
    throw new EnqueueError(`${where} (${event.type}): key must be a non-empty string`)
  }
  if (event.key.length > MAX_KEY_LENGTH || CONTROL.test(event.key)) {
    throw new EnqueueError(
      `${where} (${event.type}): key must be at most ${MAX_KEY_LENGTH} printable characters`,
    )
  }
  // Throws InvalidEventError naming the type and every bad field.
  def.decode(event.payload)
  return { def }
}

function activeTraceContext(): Record<string, string> | null {
  const carrier: Record<string, string> = {}
  propagation.inject(context.active(), carrier)
  return carrier.traceparent ? carrier : null
}

/**
 * Adds events to the outbox inside the caller's transaction, so they exist if and only if
 * that transaction commits (DESIGN.md invariant 1).
 *
 * Each event gets the next global `seq` and the next version of its (topic, key); several
 * events of one key get consecutive versions in the order given. Everything is validated
 * before anything is written: a bad event throws and the caller's transaction, rolled back,
 * leaves nothing. The relay is woken by a NOTIFY that Postgres delivers at commit.
 */
export async function enqueue(
  trx: Kysely<any>,
  events: OutboxEvent | readonly OutboxEvent[],
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
  const checked = list.map((event, i) => ({ event, def: check(event, i).def }))
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
  const trace = activeTraceContext()
  const result = await sql<{ seq: number; ver: number }>`
    select seq, ver from keyway.enqueue(
      ${pairs.map((p) => p.topic)}::text[], ${pairs.map((p) => p.key)}::text[],
      ${pairs.map((p) => p.count)}::int[], ${pairOf}::int[], ${nth}::int[],
      ${checked.map(({ def }) => def.type)}::text[],
      ${checked.map(({ event }) => JSON.stringify(event.payload))}::jsonb[],
      ${trace === null ? null : JSON.stringify(trace)}::jsonb
    )
  `.execute(trx)
  // Rows come back in no particular order; the i-th event holds the i-th smallest seq.
  const assigned = result.rows.sort((a, b) => a.seq - b.seq)
  return checked.map(({ event, def }, i) => ({
    seq: assigned[i]!.seq,
    ver: assigned[i]!.ver,
    topic: def.topic,
    key: event.key,
    type: def.type,
  }))
}
