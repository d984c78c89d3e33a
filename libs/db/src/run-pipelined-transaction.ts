import {
  type DatabaseConnection,
  DefaultQueryExecutor,
  type DialectAdapter,
  type Driver,
  type Kysely,
  type PostgresDialect,
  type QueryCompiler,
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
// would, from its public parts, minus that serialisation.

interface PipelineParts {
  dialect: PostgresDialect
  driver: Driver
  // Stateless between queries (compiling is synchronous), so shared, as Kysely shares its own.
  compiler: QueryCompiler
  adapter: DialectAdapter
}

const pipelined = new WeakMap<Kysely<any>, PipelineParts>()

/** Called by createDb for each Kysely it makes: those run pipelined transactions. */
export function enablePipelinedTransactions(db: Kysely<any>, dialect: PostgresDialect): void {
  const driver = dialect.createDriver()
  // PostgresDriver.init only takes the pool from the config: no I/O, so it can run here and
  // the pool stays shared with (and is ended by) the Kysely instance's own driver.
  void driver.init()
  pipelined.set(db, {
    dialect,
    driver,
    compiler: dialect.createQueryCompiler(),
    adapter: dialect.createAdapter(),
  })
}

/**
 * Runs `work` in a transaction whose statements go to Postgres as soon as they are issued, so
 * statements issued without awaiting each other share one round trip. Postgres still runs
 * them one by one in the order sent; only the waiting between them goes.
 *
 * The work must await every statement it starts before it returns (Promise.allSettled where
 * several run at once): the transaction commits when the work's promise settles. One failing
 * statement aborts the transaction, and the statements sent after it fail too, with
 * Postgres' "current transaction is aborted".
 *
 * A Kysely not made by createDb (or derived from one, with withPlugin and the like) gets an
 * ordinary transaction: the same result, one round trip per statement.
 */
export async function runPipelinedTransaction<DB, T>(
  db: Kysely<DB>,
  work: (trx: Transaction<DB>) => Promise<T>,
): Promise<T> {
  const parts = pipelined.get(db)
  if (!parts) return db.transaction().execute(work)
  const { dialect, driver, compiler, adapter } = parts
  const connection = await driver.acquireConnection()
  // A handler that kept the transaction past its end would otherwise run statements on a
  // connection back in the pool, inside somebody else's transaction.
  let open = true
  const executor = new DefaultQueryExecutor(compiler, adapter, {
    provideConnection: <R>(consume: (c: DatabaseConnection) => Promise<R>) => {
      if (!open) return Promise.reject(new Error("the transaction has already ended"))
      return consume(connection)
    },
  })
  const trx = new Transaction<DB>({ config: { dialect }, dialect, driver, executor })
  try {
    await driver.beginTransaction(connection, {})
    try {
      const result = await work(trx)
      await driver.commitTransaction(connection)
      return result
    } catch (err) {
      await driver.rollbackTransaction(connection)
      throw err
    }
  } finally {
    open = false
    await driver.releaseConnection(connection)
  }
}
