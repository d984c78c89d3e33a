import pg from "pg"

// Postgres parses, analyses and plans every statement sent unnamed, which is what pg does for
// every query unless told a name. For the short statements Keyway runs thousands of times a
// second (a function call with array parameters, a one-row insert) that work is a large part
// of the server's time: pgbench, 8 clients, BEGIN + insert + keyway.enqueue() + COMMIT, went
// from ~3,100 to ~4,700 tx/s with named statements. So the client names a statement once it
// has seen the same text a few times, as pgjdbc (prepareThreshold) and postgres.js do.
const PREPARE_AFTER = 3
// Each named statement holds a plan in the server session for as long as the connection
// lives; past this many names given, a connection goes on unnamed rather than evicting (pg
// has no DEALLOCATE bookkeeping to keep its own cache in step).
const MAX_PREPARED = 256
// Texts counted towards PREPARE_AFTER. Queries whose text varies (an insert of n rows) would
// otherwise grow the counts without bound.
const MAX_COUNTED = 2048

// Errors after which a named statement may not be usable again, though the same text sent
// afresh would be. A prepared statement keeps its plan's result type (0A000, "cached plan
// must not change result type") and the parameter types Postgres inferred when it was
// prepared: a function's argument type changed by DROP and CREATE (42883), or a column's type
// altered (42804), fail on every call under the old name. 26000: the statement is not there,
// e.g. prepared in a transaction that had already failed. No code at all: pg failed the
// statement on this side, where a parameter it cannot serialise (a BigInt in a jsonb value)
// makes it send Close for the name while still taking the name for prepared.
const STALE = new Set(["0A000", "26000", "42883", "42804", "42P18"])

/**
 * A pg Client that prepares statements it runs often and, in pg's pipeline mode, sends the
 * statements issued while one is in flight in a single write. Only parameterised text queries
 * are named: those are what Kysely sends. A statement the schema changed under (a table altered,
 * a function made again with other types, while the connection lives) fails once; the client
 * then stops using that name (STALE), so the next call re-prepares.
 */
export class PreparingClient extends pg.Client {
  #counts = new Map<string, number>()
  #names = new Map<string, string>()
  // How often each text's name was dropped (at most MAX_PREPARED texts ever had one).
  #drops = new Map<string, number>()
  #nextName = 0

  constructor(config?: string | pg.ClientConfig) {
    super(config)
    // A connection that drops (Postgres restarted, its host gone) fails every statement sent
    // on it, and then pg emits 'error' on the client. pg-pool listens only while the client is
    // idle in the pool: on one checked out, an 'error' without a listener is an uncaught
    // exception that kills the process (node-postgres#3202). The statements' own failures are
    // what callers handle, and the pool drops a client that is no longer queryable when it
    // comes back, so the event itself needs nothing more.
    this.on("error", (err) => {
      // The first: the server's FATAL, before pg's own "Connection terminated" for the close.
      this.#lostWith ??= err
    })
  }

  // Why the connection died, for the statements that fail on it afterwards. When the server
  // ends the session while none of ours is in flight (pg_terminate_backend, an idle-in-
  // transaction timeout), its FATAL comes as this 'error' event, and the next statement fails
  // with pg's "not queryable" and no code: the cause (57P01, 25P03) would be lost.
  #lostWith: (Error & { code?: string }) | undefined

  #explained(err: unknown): unknown {
    const lost = this.#lostWith
    if (
      lost &&
      err instanceof Error &&
      (err as { code?: string }).code === undefined &&
      err.message.includes("not queryable")
    ) {
      err.message = `${err.message}: ${lost.message}`
      Object.assign(err, { code: lost.code, cause: lost })
    }
    return err
  }

  // pg's query() has a dozen overloads; this override only adds a name to one shape of call
  // (and may hold the socket's writes for this tick), hands everything else to pg unchanged,
  // and adds the cause to a "not queryable" failure.
  override query(config: any, values?: any, callback?: any): any {
    if (this.#pipelined) this.#coalesceWrites()
    if (typeof config === "string" && Array.isArray(values) && values.length > 0 && !callback) {
      const name = this.#nameFor(config)
      if (name !== undefined) {
        return super.query({ name, text: config, values }).catch((failure: unknown) => {
          const err = this.#explained(failure)
          // The statement under this name may be gone or stale; the next calls prepare the
          // text afresh under a new name. The old one stays in the session (pg cannot close it
          // mid-transaction). The same error can also be the statement's own (a function
          // body that fails as it runs, on some inputs or all), which no new name mends: so
          // each drop of a text makes it wait four times longer before it is named again, and
          // a text failing for ever leaves a few statements behind, not one per failure,
          // while a second schema change still mends itself.
          const code = (err as { code?: string }).code
          if ((code === undefined || STALE.has(code)) && this.#names.get(config) === name) {
            this.#names.delete(config)
            this.#drops.set(config, (this.#drops.get(config) ?? 0) + 1)
          }
          throw err
        })
      }
    }
    const result: unknown = super.query(config, values, callback)
    // pg fails a statement "not queryable" only on a client already lost when it is issued,
    // and #lostWith is set as pg marks it so: the others go through without a promise more.
    return this.#lostWith && result instanceof Promise
      ? result.catch((err: unknown) => {
          throw this.#explained(err)
        })
      : result
  }

  // pg corks its socket around each statement, so each one leaves in a write of its own: in
  // a pipelined transaction whose work issues 30 statements at once, 30 syscalls and as many
  // wake-ups of the backend. While a statement is on the wire, the next ones gain nothing by
  // leaving at once (the backend answers in order), so the socket stays corked until this turn
  // of the event loop has queued them all, and they leave in one write. cork() nests: pg's own
  // uncork leaves ours in place. A statement sent when none is in flight goes out at once.
  // A scratch bench (its script is in issue 3's session-13 note), 4 clients, each running
  // pipelined transactions of 30 `select $1`, one after another: 2,370 -> 3,200 tx/s, 0.66 ->
  // 0.52 ms of machine CPU per transaction; single statements one after another, unchanged
  // (43-45k/s, 35-36 µs each).
  #corked = false
  #coalesceWrites() {
    // Sent and unanswered: pg's active query, or, between an error and its ReadyForQuery, the
    // queue of those sent after it.
    const self = this as unknown as { _activeQuery: unknown; _sentQueryQueue?: unknown[] }
    if (this.#corked || !(self._activeQuery || (self._sentQueryQueue?.length ?? 0) > 0)) return
    const stream = (this as any).connection?.stream
    if (typeof stream?.cork !== "function") return
    this.#corked = true
    stream.cork()
    process.nextTick(() => {
      this.#corked = false
      stream.uncork()
    })
  }

  get #pipelined(): boolean {
    return (this as unknown as { pipeline?: boolean }).pipeline === true
  }

  #nameFor(text: string): string | undefined {
    const known = this.#names.get(text)
    if (known !== undefined) return known
    // Every name ever given counts: a dropped one may still be prepared in the session.
    if (this.#nextName >= MAX_PREPARED) return undefined
    const seen = (this.#counts.get(text) ?? 0) + 1
    if (seen < PREPARE_AFTER * 4 ** (this.#drops.get(text) ?? 0)) {
      if (this.#counts.size >= MAX_COUNTED) this.#counts.clear()
      this.#counts.set(text, seen)
      return undefined
    }
    this.#counts.delete(text)
    const name = `keyway_${this.#nextName++}`
    this.#names.set(text, name)
    return name
  }
}
