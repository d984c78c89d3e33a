import { randomBytes } from "node:crypto"
import type { HandlerContext, KeyedEvent } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { type EventEnvelope, encodeEnvelope } from "@keyway/schemas"
import { jetstream } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { type Kysely, sql } from "kysely"

export const SHARED_NATS = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
export const SHARED_REDIS = process.env.KEYWAY_TEST_REDIS_URL ?? "redis://127.0.0.1:6379"

export const unique = (prefix: string) => `${prefix}${randomBytes(4).toString("hex")}`

/** The table the tests' handlers write their effects to, through the handler's transaction. */
export async function createEffectTable(db: Kysely<any>) {
  await sql`
    create table effect (
      id bigserial primary key, topic text not null, key text not null, ver bigint not null,
      event_id text not null, worker text not null, payload jsonb
    )
  `.execute(db)
}

/** A handler that records each event as one effect row, committed with "done". */
export function recordEffect(worker: string) {
  return async (event: KeyedEvent, ctx: HandlerContext) => {
    await ctx.complete((trx) =>
      sql`insert into effect (topic, key, ver, event_id, worker, payload)
          values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, ${worker},
                  ${JSON.stringify(event.payload)})`.execute(trx),
    )
  }
}

/** The group's rejects (messages refused at ingest), in stream order. */
export async function rejects(db: Kysely<any>) {
  return db
    .selectFrom("keyway.inbox_reject")
    .select(["stream_seq", "reason"])
    .orderBy("stream_seq")
    .execute() as Promise<{ stream_seq: string | number; reason: string }[]>
}

export async function effects(db: Kysely<any>) {
  const r = await sql<{ id: number; key: string; ver: number; event_id: string; worker: string }>`
    select id, key, ver, event_id, worker from effect order by id
  `.execute(db)
  return r.rows
}

// Counted, not drawn: a random seq per event (as before) repeated, among the 10,000 events of
// the retention test, about once in 20 runs, and a repeated Nats-Msg-Id is dropped by the
// stream as a duplicate, leaving a gap that no test expects.
let lastSeq = Math.floor(Math.random() * 1e9)

/**
 * Publishes one event as a relay would. `raw` overrides envelope fields after the fact, for
 * what a relay never sends (a bad createdAt, an overlong id) but another publisher might.
 */
export async function publishEvent(
  nc: NatsConnection,
  site: string,
  e: {
    key: string
    ver: number
    payload: unknown
    type?: string
    topic?: string
    seq?: number
    raw?: Partial<EventEnvelope>
  },
) {
  const topic = e.topic ?? "demo.item"
  const seq = e.seq ?? ++lastSeq
  const envelope: EventEnvelope = {
    id: `${site}:${seq}`,
    site,
    seq,
    topic,
    key: e.key,
    ver: e.ver,
    type: e.type ?? "demo.item.changed.v1",
    payload: e.payload,
    createdAt: new Date().toISOString(),
    ...e.raw,
  }
  await jetstream(nc).publish(`${site}.${topic}`, encodeEnvelope(envelope), { msgID: envelope.id })
}

export async function withNats<T>(fn: (nc: NatsConnection) => Promise<T>): Promise<T> {
  const nc = await connectNats({ servers: SHARED_NATS })
  try {
    return await fn(nc)
  } finally {
    await nc.close()
  }
}

/** Asserts effects hold each key's versions exactly once, in version order. */
export function checkEffects(rows: Awaited<ReturnType<typeof effects>>) {
  const byKey = new Map<string, number[]>()
  for (const r of rows) {
    const list = byKey.get(r.key) ?? []
    list.push(r.ver)
    byKey.set(r.key, list)
  }
  const problems: string[] = []
  for (const [key, vers] of byKey) {
    vers.forEach((v, i) => {
      if (v !== i + 1) problems.push(`${key}: effect #${i + 1} is v${v}`)
    })
  }
  return { byKey, problems }
}
