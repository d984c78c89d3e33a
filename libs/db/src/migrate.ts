import { createHash } from "node:crypto"
import { readdir, readFile } from "node:fs/promises"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { type Kysely, type Migration, type MigrationProvider, Migrator, sql } from "kysely"

/** The repository's `sql/` folder: numbered migrations, `NNNN_slug.sql`. */
export const migrationsDir = fileURLToPath(new URL("../../../sql", import.meta.url))

export interface MigrateOptions {
  /** Defaults to {@link migrationsDir}. */
  dir?: string
  /**
   * How long a migration may wait for a table lock before it gives way and tries again.
   * Default 2000 ms.
   */
  lockTimeoutMs?: number
  /** Tries before migrateToLatest gives up on a lock it cannot get. Default 30. */
  lockAttempts?: number
  /** The pause between those tries. Default 1000 ms. */
  lockRetryDelayMs?: number
  /**
   * What an operator should hear while the run waits (another run holds the run lock). Not
   * called for a run that goes ahead at once. Default: nothing said.
   */
  log?: (message: string) => void
}

// A migration that alters a table asks for a lock that conflicts with every read and write of
// it, and while it waits for a holder to finish (a worker's vacuum of the inbox, which can run
// for minutes, or any long transaction), Postgres queues every later statement on that table
// behind it: the workers of every group stop. Bounded by lock_timeout, the wait stalls them
// that long at most; then the migration rolls back, lets them through, and tries again.
const LOCK_NOT_AVAILABLE = "55P03"
const DEFAULT_LOCK_TIMEOUT_MS = 2000

const MIGRATION_FILE = /^\d{4}_[a-z0-9_-]+\.sql$/

interface MigrationFile {
  /** The file name without `.sql`: the name Kysely's bookkeeping records. */
  name: string
  file: string
  text: string
  /** Of the text with CRLF line ends read as LF: a checkout on Windows is the same text. */
  sha256: string
}

async function readMigrationFiles(dir: string): Promise<MigrationFile[]> {
  const all = await readdir(dir)
  // A migration named otherwise (`0015_Add_index.sql`, `0015_x.SQL`) would be left out
  // without a word, here and in every check that the database is up to date.
  const misnamed = all.filter((f) => /\.sql$/i.test(f) && !MIGRATION_FILE.test(f))
  if (misnamed.length > 0) {
    throw new MigrationError(
      `${dir}: ${misnamed.join(", ")} not named NNNN_slug.sql (four digits, then lower-case letters, digits, _ or -)`,
      { permanent: true },
    )
  }
  const files = all.filter((f) => MIGRATION_FILE.test(f)).sort()
  // Two branches that each added a migration 0018: a database that applied one refuses the
  // other as out of order, and nothing mends that. Refused here, before either runs.
  const byNumber = new Map<string, string[]>()
  for (const f of files) byNumber.set(f.slice(0, 4), [...(byNumber.get(f.slice(0, 4)) ?? []), f])
  const shared = [...byNumber.values()].filter((same) => same.length > 1)
  if (shared.length > 0) {
    throw new MigrationError(
      `${dir}: ${shared.map((same) => same.join(" and ")).join(", ")} share a number: renumber one after the other`,
      { permanent: true },
    )
  }
  return Promise.all(
    files.map(async (file) => {
      const text = await readFile(join(dir, file), "utf8")
      const sha256 = createHash("sha256").update(text.replace(/\r\n/g, "\n")).digest("hex")
      return { name: file.replace(/\.sql$/, ""), file, text, sha256 }
    }),
  )
}

// What each migration's text was when this database applied it. Kysely records names and
// times only, so an applied migration edited afterwards went unnoticed: the database reported
// "up to date" while it ran the earlier text (an earlier body of a function, say), and the
// code that expected the new one ran against it.
const CHECKSUMS = sql.table("public.keyway_migration_checksum")

// Migrations are plain SQL files so that they read as what runs in Postgres. Kysely's
// Migrator supplies the bookkeeping table, the lock against concurrent runs and the
// transaction each runs in; this provider only turns files into Migration objects.
class SqlFileMigrationProvider implements MigrationProvider {
  constructor(
    private readonly dir: string,
    private readonly lockTimeoutMs: number,
    /**
     * The files a run checked, when it has: read again at each step, a file that appeared
     * meanwhile (a checkout during `just migrate`), numbered below one just applied, was
     * applied after it.
     */
    private readonly files?: readonly MigrationFile[],
  ) {}

  async getMigrations(): Promise<Record<string, Migration>> {
    const migrations: Record<string, Migration> = {}
    for (const m of this.files ?? (await readMigrationFiles(this.dir))) {
      migrations[m.name] = {
        up: async (db) => {
          // Local to the migration's transaction; Kysely's own lock is taken before it.
          await sql`select set_config('lock_timeout', ${`${this.lockTimeoutMs}ms`}, true)`.execute(
            db,
          )
          await sql.raw(m.text).execute(db)
          // In the migration's transaction: recorded if and only if it is applied.
          await sql`insert into ${CHECKSUMS} (name, sha256) values (${m.name}, ${m.sha256})
                    on conflict (name) do update set sha256 = excluded.sha256`.execute(db)
        },
      }
    }
    return migrations
  }
}

/** Whether a table exists: the checks read bookkeeping only where there is some. */
async function tableExists(db: Kysely<any>, name: string): Promise<boolean> {
  const r = await sql<{ t: string | null }>`select to_regclass(${name})::text as t`.execute(db)
  return r.rows[0]!.t !== null
}

/**
 * Throws a MigrationError naming every migration whose file is not the text this database
 * applied. A migration the database applied and the folder lacks is not this check's: a
 * schema newer than the code is fine (see assertMigrated).
 */
async function assertUnchanged(db: Kysely<any>, files: readonly MigrationFile[], dir: string) {
  if (!(await tableExists(db, "public.keyway_migration_checksum"))) return
  const applied = await sql<{ name: string; sha256: string }>`
    select name, sha256 from ${CHECKSUMS}`.execute(db)
  const recorded = new Map(applied.rows.map((r) => [r.name, r.sha256]))
  const changed = files.filter((f) => (recorded.get(f.name) ?? f.sha256) !== f.sha256)
  if (changed.length === 0) return
  const which = changed
    .map(
      (f) =>
        `${f.file} (sha256 ${recorded.get(f.name)!.slice(0, 12)}… applied, ${f.sha256.slice(0, 12)}… now)`,
    )
    .join(", ")
  throw new MigrationError(
    `${which} in ${dir}: not the text this database applied. A migration is never edited once applied: restore it from git, and put the change in a new migration`,
    { permanent: true },
  )
}

export class MigrationError extends Error {
  override name = "MigrationError"
  /**
   * Waiting cannot mend it (retryUntilReady reads this): a migration folder that is wrong,
   * or a migration edited after it was applied. A database behind the code is not: `just
   * migrate` mends that while the processes wait.
   */
  readonly permanent: boolean
  constructor(message: string, options?: ErrorOptions & { permanent?: boolean }) {
    super(message, options)
    this.permanent = options?.permanent ?? false
  }
}

const migratorFor = (db: Kysely<any>, options: MigrateOptions, files?: readonly MigrationFile[]) =>
  new Migrator({
    db,
    provider: new SqlFileMigrationProvider(
      options.dir ?? migrationsDir,
      options.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS,
      files,
    ),
    migrationTableSchema: "public",
    // Kysely orders the applied migrations by the stamps their hosts' clocks gave them, and
    // took one host's clock running behind another's for migrations applied out of order:
    // every later run failed with "corrupted migrations", and the processes waited for a
    // `just migrate` that could not mend it. Names give the order here; assertNotDiverged
    // refuses a pending migration named before one already applied.
    allowUnorderedMigrations: true,
  })

// Safe to try again: the migration's transaction rolled back.
const RETRYABLE = new Set([LOCK_NOT_AVAILABLE, "40P01"]) // and deadlock_detected

// Held for a whole run. Kysely's own lock is taken and released per migrateUp(), so two runs
// at once would take turns, and each would find its pending list changed under it by the
// other. (An arbitrary constant, "kwmi".)
const RUN_LOCK = 0x6b776d69

/**
 * Applies every migration not yet applied, each in a transaction of its own, in order. One
 * that waits longer than `lockTimeoutMs` for a table lock (or meets a deadlock) rolls back
 * and is tried again, up to `lockAttempts` times; those before it stay applied, so a retry
 * does not redo them, nor take their locks again.
 */
export async function migrateToLatest(
  db: Kysely<any>,
  options: MigrateOptions = {},
): Promise<string[]> {
  return db.connection().execute(async (conn) => {
    // Tried first: a second `just migrate` (or `just up`) waiting on the lock said nothing
    // and looked hung, for as long as the first run took.
    const free = await sql<{ ok: boolean }>`select pg_try_advisory_lock(${RUN_LOCK}) as ok`.execute(
      conn,
    )
    if (!free.rows[0]!.ok) {
      options.log?.("another migrate holds the run lock; waiting")
      await sql`select pg_advisory_lock(${RUN_LOCK})`.execute(conn)
    }
    try {
      const dir = options.dir ?? migrationsDir
      const files = await readMigrationFiles(dir)
      await sql`create table if not exists ${CHECKSUMS} (
                  name text primary key, sha256 text not null)`.execute(conn)
      await assertUnchanged(conn, files, dir)
      // Migrations applied before their texts were recorded: what they are now is taken as
      // what was applied, and compared from here on.
      if (await tableExists(conn, "public.kysely_migration")) {
        await sql`insert into ${CHECKSUMS} (name, sha256)
                  select f.name, f.sha256
                    from unnest(${files.map((f) => f.name)}::text[],
                                ${files.map((f) => f.sha256)}::text[]) as f(name, sha256)
                   where f.name in (select name from public.kysely_migration)
                  on conflict (name) do nothing`.execute(conn)
      }
      // Nothing to apply: a database migrated by a newer checkout (bisecting, with its data
      // kept) is fine, as assertMigrated says. Kysely's migrateUp refused it, naming the newer
      // migrations as "missing".
      const pending = await pendingMigrations(conn, options)
      if (pending.length === 0) return []
      await assertNotDiverged(conn, files, pending)
      return await migrateOneByOne(conn, options, files)
    } finally {
      // On a connection that failed the run, the unlock fails too (and the session's end
      // frees the lock): the run's own error is the one to report.
      await sql`select pg_advisory_unlock(${RUN_LOCK})`.execute(conn).catch(() => {})
    }
  })
}

async function migrateOneByOne(
  conn: Kysely<any>,
  options: MigrateOptions,
  files: readonly MigrationFile[],
): Promise<string[]> {
  const migrator = migratorFor(conn, options, files)
  const attempts = options.lockAttempts ?? 30
  const applied: string[] = []
  let attempt = 1
  for (;;) {
    const { error, results } = await migrator.migrateUp()
    if (!error) {
      const done = (results ?? []).filter((r) => r.status === "Success")
      if (done.length === 0) return applied
      applied.push(...done.map((r) => r.migrationName))
      attempt = 1
      continue
    }
    // Only a migration's own statement is retried: an error before any ran (Kysely's own
    // lock, a folder that does not match the database) is reported as it is.
    const failed = results?.find((r) => r.status === "Error")?.migrationName
    const code = (error as { code?: string }).code
    const before = applied.length > 0 ? ` (applied before it: ${applied.join(", ")})` : ""
    if (failed === undefined) {
      throw new MigrationError(`migrations failed: ${(error as Error).message ?? error}${before}`, {
        cause: error,
      })
    }
    if (code !== undefined && RETRYABLE.has(code) && attempt < attempts) {
      attempt++
      await new Promise((r) => setTimeout(r, options.lockRetryDelayMs ?? 1000))
      continue
    }
    const why =
      code === LOCK_NOT_AVAILABLE
        ? `could not get a table lock within ${options.lockTimeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS} ms, ${attempt} times (a long transaction or a VACUUM holds one: see pg_locks)`
        : `${(error as Error).message ?? error}`
    throw new MigrationError(`migration ${failed} failed: ${why}${before}`, { cause: error })
  }
}

/**
 * Refuses, for good, a database whose history and this checkout's part ways: it applied a
 * migration this checkout does not have, or one sorting after a migration still pending
 * here (another branch's 0019 applied, this branch's 0019 not). Migrations apply in order
 * only, so no `just migrate` can mend it; told "apply with just migrate", the processes
 * waited for ever. A database a newer checkout migrated has nothing pending here and is
 * not refused: it is ahead, not apart.
 */
async function assertNotDiverged(
  db: Kysely<any>,
  files: readonly { name: string }[],
  pending: readonly string[],
): Promise<void> {
  if (!(await tableExists(db, "public.kysely_migration"))) return
  const known = new Set(files.map((f) => f.name))
  const applied = (
    await sql<{ name: string }>`select name from public.kysely_migration order by name`.execute(db)
  ).rows.map((r) => r.name)
  const foreign = applied.filter((name) => !known.has(name))
  const last = applied.at(-1)
  const behind = last === undefined ? [] : pending.filter((name) => name < last)
  if (foreign.length === 0 && behind.length === 0) return
  const applies =
    foreign.length > 0
      ? `it applied ${foreign.join(", ")}, which this checkout does not have`
      : `it applied up to ${last}, past ${behind.join(", ")}`
  throw new MigrationError(
    `the database's migrations and this checkout's part ways: ${applies}, while ${pending.join(", ")} ${pending.length > 1 ? "are" : "is"} pending here. Migrations apply in order only: if a migration was merged under a number below those already applied, renumber it above them; else migrate the database with the checkout that applied them, or restore it from before them`,
    { permanent: true },
  )
}

/** The migrations of `sql/` (or `options.dir`) that the database has not applied, in order. */
export async function pendingMigrations(
  db: Kysely<any>,
  options: MigrateOptions = {},
): Promise<string[]> {
  // Reads the bookkeeping table only if it exists: asking must not create it.
  const migrations = await migratorFor(db, options).getMigrations()
  return migrations.filter((m) => m.executedAt === undefined).map((m) => m.name)
}

/**
 * Throws a MigrationError naming what is missing unless the database has every migration this
 * code ships with, each as the text it applied. The processes check at start: code newer than its schema would call SQL
 * functions that are not there, or, worse, older versions of them that do something else
 * (a consumer on a schema without 0010 would mark a parked task done and lose it from the
 * dead-letter list). A schema newer than the code is fine: migrations keep what running code
 * calls until every process has moved on.
 */
export async function assertMigrated(db: Kysely<any>, options: MigrateOptions = {}): Promise<void> {
  const dir = options.dir ?? migrationsDir
  const files = await readMigrationFiles(dir)
  await assertUnchanged(db, files, dir)
  const pending = await pendingMigrations(db, options)
  if (pending.length > 0) {
    await assertNotDiverged(db, files, pending)
    throw new MigrationError(
      `the database lacks ${pending.length} migration(s) this code needs (${pending.join(", ")}): apply them with \`just migrate\` (DATABASE_URL naming this database)`,
    )
  }
}
