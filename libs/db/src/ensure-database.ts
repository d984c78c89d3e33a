import pg from "pg"
import { connectTimeoutMillis } from "./create-db.ts"

/** A client of `connectionString`, not connected; its failures reach the caller's calls. */
function clientOf(connectionString: string): pg.Client {
  const client = new pg.Client({
    connectionString,
    connectionTimeoutMillis: connectTimeoutMillis(connectionString),
  })
  // Failures reach the caller through connect() and the queries; pg's 'error' event would be
  // uncaught.
  client.on("error", () => {})
  return client
}

/** Whether the database can be opened: false if it does not exist; other failures thrown. */
async function opens(connectionString: string): Promise<boolean> {
  const client = clientOf(connectionString)
  try {
    await client.connect()
    return true
  } catch (err) {
    if ((err as { code?: unknown }).code === "3D000") return false
    throw err
  } finally {
    await client.end().catch(() => {})
  }
}

/**
 * Creates the database named in `connectionString` if it does not exist, connecting to the
 * server's `postgres` database to do so. For first runs on a new machine.
 */
export async function ensureDatabase(connectionString: string): Promise<boolean> {
  const url = new URL(connectionString)
  // Decoded as pg decodes it (decodeURI, which leaves %23 as it is): decodeURIComponent made
  // `keyway%23a` a database "keyway#a", which no client of the same URL opened.
  const name = decodeURI(url.pathname.slice(1))
  if (!name) throw new Error(`no database name in ${url.protocol}//${url.host}/`)
  // The database itself first: a role may open its own database and not `postgres` (pg_hba,
  // REVOKE CONNECT, a hosted server), and an existing one needs nothing of `postgres`.
  if (await opens(connectionString)) return false
  url.pathname = "/postgres"
  const client = clientOf(url.toString())
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
