import { spawnSync } from "node:child_process"
import { createHash, randomBytes } from "node:crypto"
import { readdir, readFile } from "node:fs/promises"
import { join } from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import { fileURLToPath } from "node:url"
import { createDb, migrateToLatest, migrationsDir } from "@keyway/db"
import type { Kysely } from "kysely"
import pg from "pg"
import { runOnExit } from "./internal/exit-cleanup.ts"
import { sweepOldTemplates, sweepTestDatabases } from "./internal/leftovers.ts"

export interface TestDatabaseOptions {
  /** Start of the database name; lowercase letters, digits and `_`. Defaults to "keyway_test". */
  prefix?: string
  /**
   * Any database on the server, used for CREATE and DROP DATABASE. Defaults to
   * `KEYWAY_TEST_PG_URL`, then `postgres://postgres@127.0.0.1:5432/postgres`.
   */
  baseUrl?: string
  /** Connections in `db`'s pool; defaults to 4. */
  poolSize?: number
  /** Defaults to the repository's `sql/` folder. */
  migrationsDir?: string
  /**
   * A database whose default collation is this ICU locale (e.g. `en-US`) instead of the
   * server's. The machine's databases are C.UTF-8, where the database's order is byte order;
   * the compose image's Postgres sorts en_US ('a' < 'B', where byte order has 'B' < 'a').
   * For tests of the order in which statements lock keys. Its template is built on first use.
   */
  icuLocale?: string
}

export interface TestDatabase {
  readonly name: string
  readonly url: string
  /** The template it was cloned from: `keyway_tpl_<hash of the migrations>[_icu_<locale>]`. */
  readonly template: string
  /** Owned by the TestDatabase: drop() destroys it. */
  readonly db: Kysely<any>
  /**
   * Closes the pool and drops the database, kicking out any session still in it. Returns
   * even while a connection of `db` is still checked out (a transaction a failed test left
   * open): its session ends, and its statements fail.
   */
  drop(): Promise<void>
  [Symbol.asyncDispose](): Promise<void>
}

const defaultBaseUrl = "postgres://postgres@127.0.0.1:5432/postgres"
const applicationName = "keyway-testkit"
// Every process that may build the template takes this lock first (an arbitrary constant;
// advisory lock keys are scoped to the maintenance database all of them connect to).
const templateLockKey = 0x6b657977
const cloneAttempts = 6
// How long drop() lets the pool finish closing once the database is gone.
const poolCloseGraceMs = 2000
let swept = false

/**
 * A new, empty, migrated database. It is a copy of a template database built once per
 * version of the migrations, so a test file pays for copying it (about 140 ms for the 8 MB
 * of a fresh database) instead of running every migration.
 */
export async function createTestDatabase(options: TestDatabaseOptions = {}): Promise<TestDatabase> {
  // testkit runs only in tests, so the environment may be read here; this is the one place.
  const baseUrl = options.baseUrl ?? process.env.KEYWAY_TEST_PG_URL ?? defaultBaseUrl
  const prefix = options.prefix ?? "keyway_test"
  const name = `${prefix}_${process.pid}_${randomBytes(4).toString("hex")}`
  quoteIdent(name)
  if (name.length > 63) throw new Error(`database name "${name}" is longer than 63 bytes`)

  const dir = options.migrationsDir ?? migrationsDir
  const locale = options.icuLocale
  if (locale !== undefined && !/^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$/.test(locale)) {
    throw new Error(`icuLocale ${JSON.stringify(locale)} is not a locale tag such as en-US`)
  }
  const hash = await hashMigrations(dir)
  const template = `keyway_tpl_${hash}${
    locale === undefined ? "" : `_icu_${locale.toLowerCase().replaceAll("-", "_")}`
  }`
  // CREATE DATABASE takes another collation only from template0.
  const createClause =
    locale === undefined
      ? ""
      : ` template template0 locale_provider icu icu_locale '${locale}' locale 'C.UTF-8'`
  await withClient(baseUrl, async (client) => {
    if (!swept) {
      swept = true
      const host = new URL(baseUrl).hostname
      const local = ["", "127.0.0.1", "localhost", "[::1]"].includes(host)
      await sweepTestDatabases(client, local).catch(() => {})
      await client.query("select pg_advisory_lock($1)", [templateLockKey])
      try {
        await sweepOldTemplates(client, local, hash).catch(() => {})
      } finally {
        await client.query("select pg_advisory_unlock($1)", [templateLockKey])
      }
    }
    await ensureTemplate(client, baseUrl, template, dir, createClause)
    await cloneTemplate(client, template, name).catch(async (err) => {
      // 3D000: dropped since, by another checkout's sweep of old templates: made again.
      if ((err as { code?: string }).code !== "3D000") throw err
      await ensureTemplate(client, baseUrl, template, dir, createClause)
      await cloneTemplate(client, template, name)
    })
  })

  const url = databaseUrl(baseUrl, name)
  const db = createDb({ connectionString: url, max: options.poolSize ?? 4, applicationName })
  // A test file that crashes never calls drop(); psql is the only way to drop the database
  // from the synchronous exit hook. Best effort: without psql the database stays.
  const forget = runOnExit(() => {
    spawnSync(
      "psql",
      [baseUrl, "-qc", `drop database if exists ${quoteIdent(name)} with (force)`],
      {
        stdio: "ignore",
        timeout: 5000,
      },
    )
  })
  let dropped: Promise<void> | undefined
  const drop = () => {
    dropped ??= (async () => {
      // The pool's end waits for every connection checked out to come back. A test that failed
      // half-way may hold one for good (a transaction parked at a gate nobody opens), so
      // waiting for the pool before the drop hung the file until the runner's timeout. Begun
      // first, the end still closes the idle connections cleanly and refuses new checkouts;
      // the forced drop then ends the sessions still in use, which fails the statements
      // waiting on them and hands their connections back.
      const closed = db.destroy()
      // Left unawaited when the drop fails.
      closed.catch(() => {})
      await withClient(baseUrl, (client) =>
        client.query(`drop database if exists ${quoteIdent(name)} with (force)`),
      )
      forget()
      // A connection held by code that never releases it keeps the end pending for ever,
      // though its session is gone and its socket closed: nothing is left to wait for.
      await settleWithin(closed, poolCloseGraceMs)
    })()
    return dropped
  }
  return { name, url, template, db, drop, [Symbol.asyncDispose]: drop }
}

// The migrator writes bookkeeping of its own into the template (the applied texts' checksums,
// since sql/ had 0015 files): a change to it makes a new template too, or databases cloned
// from one an older migrator built would lack what the newer one checks.
const migratorSource = fileURLToPath(new URL("migrate.ts", import.meta.resolve("@keyway/db")))

/**
 * Names and contents of every file in the migrations folder, and the migrator's source, so
 * any change to either makes a new template.
 */
async function hashMigrations(dir: string): Promise<string> {
  const hash = createHash("sha256")
    .update(await readFile(migratorSource))
    .update("\0")
  const entries = (await readdir(dir, { withFileTypes: true }))
    .filter((e) => e.isFile())
    .map((e) => e.name)
    .sort()
  for (const file of entries) {
    hash
      .update(file)
      .update("\0")
      .update(await readFile(join(dir, file)))
      .update("\0")
  }
  return hash.digest("hex").slice(0, 12)
}

async function isReadyTemplate(client: pg.Client, template: string): Promise<boolean> {
  const { rows } = await client.query<{ datistemplate: boolean }>(
    "select datistemplate from pg_database where datname = $1",
    [template],
  )
  return rows[0]?.datistemplate === true
}

/**
 * Several test files start at once in separate processes; the advisory lock makes one of
 * them build the template while the others wait. `datistemplate` is set only after the
 * migrations succeeded, so a database of that name without it is the remains of a build
 * that crashed, and is rebuilt.
 */
async function ensureTemplate(
  client: pg.Client,
  baseUrl: string,
  template: string,
  dir: string,
  createClause: string,
): Promise<void> {
  if (await isReadyTemplate(client, template)) return
  await client.query("select pg_advisory_lock($1)", [templateLockKey])
  try {
    if (await isReadyTemplate(client, template)) return
    const ident = quoteIdent(template)
    await client.query(`drop database if exists ${ident} with (force)`)
    await client.query(`create database ${ident}${createClause}`)
    try {
      const db = createDb({
        connectionString: databaseUrl(baseUrl, template),
        max: 1,
        applicationName: `${applicationName}-template`,
      })
      try {
        await migrateToLatest(db, { dir })
      } finally {
        await db.destroy()
      }
      // CREATE DATABASE … TEMPLATE fails while anyone is connected to the template. Refusing
      // connections keeps stray sessions (a psql left open) out for good; the terminate
      // catches our own pool's backend if it is still on its way out.
      await client.query(`alter database ${ident} with allow_connections false`)
      await client.query(
        "select pg_terminate_backend(pid) from pg_stat_activity where datname = $1",
        [template],
      )
      await client.query(`alter database ${ident} with is_template true`)
    } catch (err) {
      await client.query(`drop database if exists ${ident} with (force)`).catch(() => {})
      throw err
    }
  } finally {
    await client.query("select pg_advisory_unlock($1)", [templateLockKey])
  }
}

async function cloneTemplate(client: pg.Client, template: string, name: string): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await client.query(`create database ${quoteIdent(name)} template ${quoteIdent(template)}`)
      return
    } catch (err) {
      // 55006 object_in_use: "source database … is being accessed by other users". Postgres
      // already waits 5 s for such sessions before saying so; a backend still exiting is the
      // only case that clears up by retrying.
      if ((err as { code?: string }).code !== "55006" || attempt >= cloneAttempts) throw err
      await sleep(100 * attempt)
    }
  }
}

async function settleWithin(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  await Promise.race([
    promise.catch(() => {}),
    new Promise<void>((resolve) => {
      timer = setTimeout(resolve, ms)
    }),
  ])
  clearTimeout(timer)
}

async function withClient<T>(url: string, use: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url, application_name: applicationName })
  // Without a listener a server-side disconnect would crash the process; the pending query
  // rejects anyway.
  client.on("error", () => {})
  await client.connect()
  try {
    return await use(client)
  } finally {
    await client.end()
  }
}

function databaseUrl(baseUrl: string, name: string): string {
  const url = new URL(baseUrl)
  url.pathname = `/${name}`
  return url.toString()
}

// Database names cannot be bound as parameters; only names that need no escaping get here.
function quoteIdent(name: string): string {
  if (!/^[a-z_][a-z0-9_]*$/.test(name)) {
    throw new Error(`"${name}" is not a valid database name (lowercase letters, digits and _)`)
  }
  return `"${name}"`
}
