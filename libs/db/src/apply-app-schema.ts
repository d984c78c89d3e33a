import { type Kysely, type RawBuilder, sql } from "kysely"

/**
 * Runs an app's own schema statements (`create … if not exists`, guarded `do` blocks) in one
 * transaction, as every process of the app does at start, with the tables in use.
 *
 * - Processes starting together take turns on `lockKey` (an advisory lock): concurrent
 *   `create … if not exists` of one table can still collide on the catalog's unique index.
 * - A statement that must lock a busy table waits behind whatever transaction holds it, and
 *   every reader and writer of the table queues behind that wait: it gives up after 5 s
 *   instead (lock_timeout), and the start's retry comes back to it. (The advisory lock waits
 *   under it too: processes starting together, one held up by a busy table, may take a
 *   retry each.)
 */
export async function applyAppSchema(
  db: Kysely<any>,
  lockKey: number,
  statements: RawBuilder<unknown>,
): Promise<void> {
  await db.transaction().execute(async (trx) => {
    await sql`set local lock_timeout = '5s'`.execute(trx)
    await sql`select pg_advisory_xact_lock(${lockKey})`.execute(trx)
    await statements.execute(trx)
  })
}
