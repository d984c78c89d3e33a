// `up`'s last step for both sites: demo traffic handled both ways, as each site's demo_effect
// table counts it.
import { describeError } from "@keyway/app-config"
import { type Kysely, sql } from "kysely"
import { waitUntil } from "./wait-until.ts"

export interface CrossingSite {
  /** Names the site in an error: its database's name, say. */
  name: string
  db: Kysely<any>
}

/** Undefined table: the worker creates demo_effect when it starts, which may be a moment from now. */
const UNDEFINED_TABLE = "42P01"

async function countDemoEffects({ name, db }: CrossingSite): Promise<number> {
  try {
    const r = await sql<{ n: number }>`select count(*)::int as n from demo_effect`.execute(db)
    return r.rows[0]!.n
  } catch (err) {
    if ((err as { code?: string }).code === UNDEFINED_TABLE) return 0
    // Anything else (a refused password, Postgres gone, the database dropped) will not mend
    // by waiting: said at once, with its cause.
    throw new Error(`cannot count ${name}'s demo_effect: ${describeError(err)}`, { cause: err })
  }
}

/**
 * Waits until every site's demo_effect has rows it did not have when the wait began: what
 * "the demo works" means to someone watching. Counts from an earlier run (data stays in
 * .run/) do not count. Returns how many new rows each site had when the wait ended.
 */
export async function waitForCrossing(
  sites: readonly CrossingSite[],
  timeoutMs: number,
): Promise<number[]> {
  const before = await Promise.all(sites.map(countDemoEffects))
  let added: number[] = []
  await waitUntil(
    "cross-site demo traffic",
    async () => {
      const now = await Promise.all(sites.map(countDemoEffects))
      added = now.map((n, i) => n - before[i]!)
      return added.every((n) => n > 0)
    },
    timeoutMs,
  )
  return added
}
