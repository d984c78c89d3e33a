// The demo's handlers: each records one effect row in the transaction that marks its event
// done, so `just status` can count what crossed and check the per-key order from the rows.
import { applyAppSchema } from "@keyway/db"
import type { Handler, HandlerContext, KeyedEvent } from "@keyway/keyed-consumer"
import { DemoCommandSent, DemoItemChanged } from "@keyway/schemas"
import { type Kysely, sql } from "kysely"

/**
 * The advisory lock workers starting together take turns on (applyAppSchema): "kwdm", next to
 * the relay's "keyw", migrate's "kwmi" and the ESL apps' "esl1"/"esl2".
 */
const LOCK_KEY = 0x6b77646d
const LOCK_NOT_AVAILABLE = "55P03"

/**
 * The effect table: one row per event (its id unique), `runs` the times it was handled, and
 * `id` the order in which a key's events were first handled. A second run is counted, not
 * refused: an operator's redrive runs done events again on purpose, and refused (a unique
 * violation), each such event failed until it died and, under the default policy `block`,
 * held its key for good. Outside a redrive, runs > 1 is an exactly-once failure.
 *
 * Every worker start runs this while the other workers insert into the table. `create table
 * if not exists` of a table that exists takes no lock on it, but `alter table … add column if
 * not exists` takes ACCESS EXCLUSIVE before it looks for the column: behind any open
 * transaction on the table it waited without a word, and every running worker's insert
 * queued behind it. So the column is added only where it is missing (a table an older
 * release made), and applyAppSchema bounds that wait, which the start's retry comes back to.
 */
export async function ensureDemoEffectTable(db: Kysely<any>): Promise<void> {
  try {
    await applyAppSchema(
      db,
      LOCK_KEY,
      sql`
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
        );
        -- Added here rather than in the create: one definition, for new tables and old alike.
        do $$
        begin
          if not exists (select from pg_attribute
                          where attrelid = to_regclass('demo_effect')
                            and attname = 'runs' and not attisdropped) then
            alter table demo_effect add column runs int not null default 1;
          end if;
        end
        $$;
      `,
    )
  } catch (err) {
    // Postgres' own words name neither the table nor what to look at.
    if ((err as { code?: string }).code === LOCK_NOT_AVAILABLE) {
      throw new Error(
        "demo_effect's schema step gave up on a lock after the lock timeout: a transaction holds the table (its runs column is missing, and adding it must wait for that), or another starting worker holds the schema step's turn; see pg_locks",
        { cause: err },
      )
    }
    throw err
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
