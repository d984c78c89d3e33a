import { Kysely, PostgresDialect } from "kysely"
import pg from "pg"

export interface DbConfig {
  connectionString: string
  /** Pool size. Writers that commit in parallel want one connection each. */
  max?: number
  /** Shows in pg_stat_activity, which is how an operator tells Keyway's sessions apart. */
  applicationName?: string
}

// int8 (bigint) and numeric come back as strings from pg by default. Keyway's bigints are
// sequence numbers and versions, far below 2^53, and callers compare them as numbers.
pg.types.setTypeParser(pg.types.builtins.INT8, (v) => Number(v))

/** A Kysely instance over a pg pool. The caller owns it and calls `destroy()`. */
export function createDb<DB = any>(config: DbConfig): Kysely<DB> {
  const pool = new pg.Pool({
    connectionString: config.connectionString,
    max: config.max ?? 10,
    application_name: config.applicationName ?? "keyway",
  })
  // An idle client that loses its server emits 'error' on the pool; without a listener
  // that would crash the process. The next query gets a fresh connection.
  pool.on("error", () => {})
  return new Kysely<DB>({ dialect: new PostgresDialect({ pool }) })
}
