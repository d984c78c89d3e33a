import { Kysely, PostgresDialect } from "kysely"
import pg from "pg"
import { PreparingClient } from "./preparing-client.ts"
import { enablePipelinedTransactions } from "./run-pipelined-transaction.ts"

export interface DbConfig {
  connectionString: string
  /** Pool size. Writers that commit in parallel want one connection each. */
  max?: number
  /** Shows in pg_stat_activity, which is how an operator tells Keyway's sessions apart. */
  applicationName?: string
}

/**
 * Type parsers for Keyway's connections. pg returns int8 (bigint) as a string by default;
 * Keyway's bigints are sequence numbers and versions, far below 2^53, compared as numbers.
 * Set per connection rather than globally, so importing Keyway never changes how an
 * application's own pg connections parse.
 */
export const pgTypes = {
  getTypeParser(oid: number, format?: "text" | "binary") {
    if (oid === pg.types.builtins.INT8) return (value: string) => Number(value)
    return pg.types.getTypeParser(oid, format)
  },
} as pg.CustomTypesConfig

/**
 * For every long-lived Keyway connection, so that a peer that vanishes without a reset (its
 * host dead, a link dropping packets) is noticed in about 25 s rather than the operating
 * system's default of two hours and more. The server's side is what frees a dead relay's
 * advisory lock for a standby; ours, what fails a statement waiting on a dead connection.
 * The server's side is set per session, once connected, rather than as a startup `options`
 * parameter: that would replace PGOPTIONS and a connection string's own options, and
 * PgBouncer refuses it. (Both are ignored on Unix sockets, where no peer can vanish.)
 *
 * Keepalives alone are not enough on the server's side: Linux sends no probe while data it
 * sent is unacknowledged, and then only the retransmission limit applies (tcp_retries2, about
 * 15 minutes). The server sends to a relay all the time (a NOTIFY per commit, the answers to
 * its polls), so a link that died at a typical moment left the lock held that long: a review
 * cut a link in a network namespace while a NOTIFY was on its way, and the backend still
 * held its lock 243 s later. tcp_user_timeout bounds unacknowledged data at the same 25 s.
 */
export const keepaliveSettings = { keepAlive: true, keepAliveInitialDelayMillis: 10_000 } as const
export const keepaliveSql =
  "set tcp_keepalives_idle = 10; set tcp_keepalives_interval = 5; set tcp_keepalives_count = 3; set tcp_user_timeout = 25000"

/** Without `connect_timeout` in the connection string. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000

/**
 * How long a Keyway connection may take to connect and log in, for pg's
 * `connectionTimeoutMillis`. pg's own default is no bound at all: against a host that drops
 * packets each attempt lasts the kernel's SYN retries (about 2 min on Linux), and against a
 * server or proxy that accepts the connection and then says nothing (stalled, overloaded) it
 * lasts for ever. A process starting then waits without a word, and a pool's next statement
 * waits on a connection that never comes.
 *
 * The connection string's `connect_timeout`, read as libpq reads it (whole seconds; 0 or less
 * for no bound; 1 counts as 2), overrides the default. pg itself ignores it, so without this
 * an operator's setting would silently do nothing. (PGCONNECT_TIMEOUT is not read: libraries
 * take their settings from their caller, never from the environment.)
 */
export function connectTimeoutMillis(connectionString: string): number {
  let setting: string | null = null
  try {
    setting = new URL(connectionString).searchParams.get("connect_timeout")
  } catch {
    // Not a URL (a socket path, say): it has no parameters to read.
  }
  if (setting === null || setting === "") {
    return DEFAULT_CONNECT_TIMEOUT_MS
  }
  if (!/^\s*[-+]?\d+\s*$/.test(setting)) {
    throw new Error(
      `connect_timeout must be a whole number of seconds (0 for no limit), not ${JSON.stringify(setting)}`,
    )
  }
  const seconds = Number(setting)
  // Past 2^31 - 1 ms Node's timers fire at once: a bound that large means none.
  return seconds <= 0 || seconds * 1000 > 2 ** 31 - 1 ? 0 : Math.max(seconds, 2) * 1000
}

/**
 * A Kysely instance over a pg pool whose connections prepare the statements they run often
 * (see PreparingClient) and can run pipelined transactions (see runPipelinedTransaction).
 * The caller owns it and calls `destroy()`.
 */
export function createDb<DB = any>(config: DbConfig): Kysely<DB> {
  // On each client, not the pool: pg-pool would also apply its connectionTimeoutMillis to
  // statements waiting for a free client, and under load that wait is no fault.
  const connectTimeout = connectTimeoutMillis(config.connectionString)
  class Client extends PreparingClient {
    constructor(clientConfig?: pg.ClientConfig) {
      super({ ...clientConfig, connectionTimeoutMillis: connectTimeout })
    }
  }
  const pool = new pg.Pool({
    connectionString: config.connectionString,
    max: config.max ?? 10,
    application_name: config.applicationName ?? "keyway",
    types: pgTypes,
    ...keepaliveSettings,
    Client,
    // Changes nothing for statements sent one at a time, which is all Kysely's own paths do
    // (a transaction waits for each answer; outside one each statement takes its own client).
    // runPipelinedTransaction is what sends several at once. pg refuses cursors in this mode
    // (pg-cursor, pg-query-stream, the `rows` option), so this pool cannot serve Kysely's
    // stream(); and were query_timeout ever set, a timeout would close the connection.
    pipeline: true,
  })
  // An idle client that loses its server emits 'error' on the pool; without a listener
  // that would crash the process. The next query gets a fresh connection.
  pool.on("error", () => {})
  // Queued on the new client ahead of whatever it was connected for; a failure here shows
  // again on that statement, on the same connection.
  pool.on("connect", (client) => void client.query(keepaliveSql).catch(() => {}))
  const dialect = new PostgresDialect({ pool })
  const db = new Kysely<DB>({ dialect })
  enablePipelinedTransactions(db, dialect)
  return db
}
