import pg from "pg"
import { connectTimeoutMillis } from "./create-db.ts"

/**
 * Creates the database named in `connectionString` if it does not exist, connecting to the
 * server's `postgres` database to do so. For first runs on a new machine.
 */
export async function ensureDatabase(connectionString: string): Promise<boolean> {
  const url = new URL(connectionString)
  const name = decodeURIComponent(url.pathname.slice(1))
  if (!name) throw new Error(`no database name in ${url.protocol}//${url.host}/`)
  url.pathname = "/postgres"
  const client = new pg.Client({
    connectionString: url.toString(),
    connectionTimeoutMillis: connectTimeoutMillis(connectionString),
  })
  // Failures reach the caller through the queries; pg's 'error' event would be uncaught.
  client.on("error", () => {})
  await client.connect()
  const exists = async () =>
    ((await client.query("select 1 from pg_database where datname = $1", [name])).rowCount ?? 0) > 0
  try {
    if (await exists()) return false
    await client.query(`create database "${name.replaceAll('"', '""')}"`)
    return true
  } catch (err) {
    // Two processes starting at once: the loser finds the database created by the winner.
    // Its error is seldom 42P04 ("already exists"): Postgres' check for the name is made
    // before the catalogue row is written, so the loser usually fails on the catalogue's
    // unique index (23505) instead, or on whatever comes next. Asked again, the catalogue
    // says which.
    if (await exists().catch(() => false)) return false
    throw err
  } finally {
    await client.end()
  }
}
