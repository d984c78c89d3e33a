// The demo's handlers: each records one effect row in the transaction that marks its event
// done, so `just status` can count what crossed and check the per-key order from the rows.
import type { Handler, HandlerContext, KeyedEvent } from "@keyway/keyed-consumer"
import { DemoCommandSent, DemoItemChanged } from "@keyway/schemas"
import { type Kysely, sql } from "kysely"

/**
 * The effect table. The unique event id turns a second effect for one event (an
 * exactly-once failure) into an error instead of a silent extra row; `id` gives the order
 * in which a key's events were handled.
 */
export async function ensureDemoEffectTable(db: Kysely<any>): Promise<void> {
  try {
    await sql`
      create table if not exists demo_effect (
        id bigint generated always as identity primary key,
        event_id text not null unique,
        topic text not null,
        key text not null,
        ver bigint not null,
        type text not null,
        n bigint not null,
        created_at timestamptz not null,
        handled_at timestamptz not null default now()
      )
    `.execute(db)
  } catch (err) {
    // Two workers starting at once: "if not exists" is not atomic in Postgres, and the
    // loser of the race sees the winner's type or relation.
    const code = (err as { code?: string }).code
    if (code !== "23505" && code !== "42P07") throw err
  }
}

async function recordEffect(event: KeyedEvent<{ n: number }>, ctx: HandlerContext) {
  // One insert that stands alone: it may share round trips with other keys' effects.
  await ctx.complete(
    (trx) =>
      sql`
        insert into demo_effect (event_id, topic, key, ver, type, n, created_at)
        values (${event.id}, ${event.topic}, ${event.key}, ${event.ver}, ${event.type},
                ${event.payload.n}, ${event.createdAt})
      `.execute(trx),
    { interleave: true },
  )
}

export const demoHandlers: Record<string, Handler> = {
  [DemoItemChanged.type]: recordEffect,
  [DemoCommandSent.type]: recordEffect,
}
