import {
  type DatabaseConnection,
  type Driver,
  type Kysely,
  type PostgresDialect,
  sql,
  Transaction,
} from "kysely"

// Kysely runs a transaction's statements one at a time, whoever issues them: its
// SingleConnectionProvider holds each statement until the one before it has answered. Right
// for code that awaits each statement in turn, and it keeps a careless Promise.all from
// interleaving statements on one connection. But a transaction whose statements are
// independent (a consumer's completion batch: the local effects of tens of keys' handlers)
// then pays one round trip per statement, and on a busy machine a round trip is a millisecond
// or more. The pool's clients run in pg's pipeline mode, so statements issued together are
// written together and Postgres answers them in order; this builds the Transaction Kysely
// would, minus that serialisation.

interface PipelineParts {
  dialect: PostgresDialect
  // Runs BEGIN, COMMIT and ROLLBACK on a connection, and fills Transaction's props; never
  // initialised and never asked for a connection: those come from the Kysely instance's own
  // driver, which initialises, logs, releases and is destroyed with the instance.
  driver: Driver
}

// Keyed by the instance's dialect adapter: one per Kysely that createDb makes, and shared by
// every instance derived from it (withPlugin, withSchema, withTables), which use its pool.
const pipelined = new WeakMap<object, PipelineParts>()

/** Called by createDb for each Kysely it makes, whose pool runs in pipeline mode. */
export function enablePipelinedTransactions(db: Kysely<any>, dialect: PostgresDialect): void {
  pipelined.set(db.getExecutor().adapter, { dialect, driver: dialect.createDriver() })
}

/**
 * Runs `work` in a transaction whose statements go to Postgres as soon as they are issued, so
 * statements issued without awaiting each other share one round trip. Postgres still runs
 * them one by one in the order sent; only the waiting between them goes. So statements that
 * interleave must not depend on each other: one's read and later write can have another's
 * write land in between, in the same transaction, where no row lock keeps them apart.
 *
 * A failed statement aborts the transaction, and those sent after it fail too (Postgres'
 * "current transaction is aborted", or "prepared statement does not exist" for one whose
 * named statement was to be created by a failed one). The transaction then rolls back and
 * the first failure is thrown, even if `work` caught it: Postgres would turn the COMMIT into
 * a rollback without an error. It ends when `work` settles, after the statements still in
 * flight have answered; a statement issued after that fails.
 *
 * A Kysely not made by createDb, nor derived from one (withPlugin, withSchema, …), gets
 * Kysely's own transaction, one round trip per statement, and one more at the end to check
 * that no statement failed: a failure the work swallowed is then thrown as Postgres reports
 * it on the next statement ("current transaction is aborted", 25P02), not as the cause.
 */
export async function runPipelinedTransaction<DB, T>(
  db: Kysely<DB>,
  work: (trx: Transaction<DB>) => Promise<T>,
): Promise<T> {
  // A transaction shares its Kysely's adapter, but BEGIN on its connection would nest, and
  // COMMIT end the caller's transaction: Kysely's own refusal says so.
  const parts = db.isTransaction ? undefined : pipelined.get(db.getExecutor().adapter)
  if (!parts) {
    return db.transaction().execute(async (trx) => {
      const result = await work(trx)
      // COMMIT in an aborted transaction rolls back without an error; a statement does not.
      await sql`select 1`.execute(trx)
      return result
    })
  }
  const { dialect, driver } = parts
  // getExecutor is marked internal in Kysely's docs but is how its own TransactionBuilder
  // starts; the executor gives the instance's connection, plugins and query compiler.
  const executor = db.getExecutor()
  return executor.provideConnection(async (connection) => {
    let open = true
    const inFlight = new Set<Promise<unknown>>()
    // First in the order sent, not in the order settled: a named statement's failure settles
    // a turn after an unnamed one's (the client catches it on the way), and Postgres' answers
    // to a pipeline arrive together, so the knock-on "transaction is aborted" of a statement
    // sent later could settle first.
    let sent = 0
    let firstFailure: { error: unknown; n: number } | undefined
    // The statements' own errors, to tell them from an error of the work's.
    const failures = new WeakSet<object>()
    const trx = new Transaction<DB>({
      config: { dialect },
      dialect,
      driver,
      executor: executor.withConnectionProvider({
        provideConnection: <R>(consume: (c: DatabaseConnection) => Promise<R>) => {
          // Once the work has settled, a statement would run after COMMIT, outside the
          // transaction, or on a connection back in the pool inside somebody else's.
          if (!open) return Promise.reject(new Error("the transaction has already ended"))
          const n = sent++
          const statement = consume(connection)
          inFlight.add(statement)
          statement.then(
            () => inFlight.delete(statement),
            (error) => {
              inFlight.delete(statement)
              if (!firstFailure || n < firstFailure.n) firstFailure = { error, n }
              if (typeof error === "object" && error !== null) failures.add(error)
            },
          )
          return statement
        },
      }),
    })
    // The failure to report is the statement's. A ROLLBACK fails only on a connection already
    // lost, and its error ("not queryable", no code) would hide the cause (57P01, 08006) that
    // a caller decides on; pg's pool drops such a connection when it comes back.
    const rollback = () => driver.rollbackTransaction(connection).catch(() => {})
    await driver.beginTransaction(connection, {})
    let result: T
    try {
      result = await work(trx)
    } catch (err) {
      open = false
      await Promise.allSettled(inFlight)
      await rollback()
      // The work may reject with a knock-on failure ("current transaction is aborted") of a
      // statement sent after the one at fault: Promise.all rejects with whichever failure
      // reaches it first, and a helper with awaits of its own (enqueue) passes its failure on
      // later than a bare statement fails. The cause is what a caller decides on (23505,
      // 40P01). An error of the work's own making is its to report.
      if (firstFailure && typeof err === "object" && err !== null && failures.has(err)) {
        throw firstFailure.error
      }
      throw err
    }
    open = false
    await Promise.allSettled(inFlight)
    if (firstFailure) {
      await rollback()
      throw firstFailure.error
    }
    await driver.commitTransaction(connection)
    return result
  })
}
