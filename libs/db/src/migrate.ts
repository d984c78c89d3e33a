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

/** Applies every migration not yet applied, each in its own transaction. */
export async function migrateToLatest(
  db: Kysely<any>,
  options: MigrateOptions = {},
): Promise<string[]> {
  const migrator = new Migrator({
    db,
    provider: new SqlFileMigrationProvider(options.dir ?? migrationsDir),
    migrationTableSchema: "public",
  })
  const { error, results } = await migrator.migrateToLatest()
  const failed = results?.find((r) => r.status === "Error")
  if (error) {
    throw new MigrationError(
      `migration ${failed?.migrationName ?? "(unknown)"} failed: ${(error as Error).message ?? error}`,
      { cause: error },
    )
  }
  return (results ?? []).filter((r) => r.status === "Success").map((r) => r.migrationName)
}
