import { readdir, readFile } from "node:fs/promises"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { type Kysely, type Migration, type MigrationProvider, Migrator, sql } from "kysely"

/** The repository's `sql/` folder: numbered migrations, `NNNN_slug.sql`. */
export const migrationsDir = fileURLToPath(new URL("../../../sql", import.meta.url))

export interface MigrateOptions {
  /** Defaults to {@link migrationsDir}. */
  dir?: string
}

// Migrations are plain SQL files so that they read as what runs in Postgres. Kysely's
// Migrator supplies the bookkeeping table, the lock against concurrent runs and one
// transaction per migration; this provider only turns files into Migration objects.
class SqlFileMigrationProvider implements MigrationProvider {
  constructor(private readonly dir: string) {}

  async getMigrations(): Promise<Record<string, Migration>> {
    const files = (await readdir(this.dir)).filter((f) => /^\d{4}_[a-z0-9_-]+\.sql$/.test(f)).sort()
    const migrations: Record<string, Migration> = {}
    for (const file of files) {
      const text = await readFile(join(this.dir, file), "utf8")
      migrations[file.replace(/\.sql$/, "")] = {
        up: async (db) => {
          await sql.raw(text).execute(db)
        },
      }
    }
    return migrations
  }
}

export class MigrationError extends Error {
  override name = "MigrationError"
}

const migratorFor = (db: Kysely<any>, options: MigrateOptions) =>
  new Migrator({
    db,
    provider: new SqlFileMigrationProvider(options.dir ?? migrationsDir),
    migrationTableSchema: "public",
  })

/** Applies every migration not yet applied, each in its own transaction. */
export async function migrateToLatest(
  db: Kysely<any>,
  options: MigrateOptions = {},
): Promise<string[]> {
  const { error, results } = await migratorFor(db, options).migrateToLatest()
  const failed = results?.find((r) => r.status === "Error")
  if (error) {
    throw new MigrationError(
      `migration ${failed?.migrationName ?? "(unknown)"} failed: ${(error as Error).message ?? error}`,
      { cause: error },
    )
  }
  return (results ?? []).filter((r) => r.status === "Success").map((r) => r.migrationName)
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
 * code ships with. The processes check at start: code newer than its schema would call SQL
 * functions that are not there, or, worse, older versions of them that do something else
 * (a consumer on a schema without 0010 would mark a parked task done and lose it from the
 * dead-letter list). A schema newer than the code is fine: migrations keep what running code
 * calls until every process has moved on.
 */
export async function assertMigrated(db: Kysely<any>, options: MigrateOptions = {}): Promise<void> {
  const pending = await pendingMigrations(db, options)
  if (pending.length > 0) {
    throw new MigrationError(
      `the database lacks ${pending.length} migration(s) this code needs (${pending.join(", ")}): apply them with \`just migrate\` (DATABASE_URL naming this database)`,
    )
  }
}
