// The demo's handlers: each records one effect row in the transaction that marks its event
// done, so `just status` can count what crossed and check the per-key order from the rows.
import type { Handler, HandlerContext, KeyedEvent } from "@keyway/keyed-consumer"
import { DemoCommandSent, DemoItemChanged } from "@keyway/schemas"
import { type Kysely, sql } from "kysely"

/**
 * The effect table: one row per event (its id unique), `runs` the times it was handled, and
 * `id` the order in which a key's events were first handled. A second run is counted, not
 * refused: an operator's redrive runs done events again on purpose, and refused (a unique
 * violation), each such event failed until it died and, under the default policy `block`,
 * held its key for good. Outside a redrive, runs > 1 is an exactly-once failure.
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
    // After the table: a worker's start adds it to a table an older release made.
    await sql`alter table demo_effect add column if not exists runs int not null default 1`.execute(
      db,
    )
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
        on conflict (event_id) do update set runs = demo_effect.runs + 1
      `.execute(trx),
    { interleave: true },
  )
}

export const demoHandlers: Record<string, Handler> = {
  [DemoItemChanged.type]: recordEffect,
  [DemoCommandSent.type]: recordEffect,
}
