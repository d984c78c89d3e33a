import { readdir, readFile, readlink, rm, stat } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import type { JetStreamManager } from "@nats-io/jetstream"
import type pg from "pg"

// What a test file killed outright (kill -9, or the runner's time limit on a file that hangs)
// leaves behind: its exit hooks never ran. Private servers keep running with their temp dirs,
// test databases stay, and streams stay on the shared NATS. The next test process sweeps them,
// once, each kind where testkit first makes one.

/** Whether a process with this pid exists on this machine. */
export function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM"
  }
}

/** Temp dirs are named `keyway-<what>-<pid of their test process>-XXXXXX`. */
export const tempDirPrefix = (what: string) => `keyway-${what}-${process.pid}-`
const TEMP_DIR = /^keyway-[a-z]+-(\d+)-/

// Only the servers testkit starts are killed: a shell cd'd into a leftover dir, or a `tail -f`
// of its log, is somebody's, not the dead test's.
const SERVERS = new Set(["nats-server", "redis-server"])

/**
 * Removes the temp dirs of test processes that are gone, after killing the servers of this
 * user that still run from them (a server's command line names its config or data dir, or
 * it runs in it). Returns the dirs removed.
 */
export async function sweepTempDirs(root = tmpdir()): Promise<string[]> {
  const names = await readdir(root).catch(() => [] as string[])
  const dead = names
    .filter((n) => {
      const m = TEMP_DIR.exec(n)
      return m !== null && !isRunning(Number(m[1]))
    })
    .map((n) => join(root, n))
  if (dead.length === 0) return []
  const within = (path: string) => dead.some((d) => path === d || path.startsWith(`${d}/`))
  for (const entry of await readdir("/proc").catch(() => [] as string[])) {
    if (!/^\d+$/.test(entry)) continue
    const comm = (await readFile(`/proc/${entry}/comm`, "utf8").catch(() => "")).trim()
    if (!SERVERS.has(comm)) continue
    if ((await stat(`/proc/${entry}`).catch(() => undefined))?.uid !== process.getuid?.()) continue
    // Its working directory too: redis-server writes its title over its arguments.
    const cwd = await readlink(`/proc/${entry}/cwd`).catch(() => "")
    const args = (await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "")).split("\0")
    if (within(cwd) || args.some(within)) {
      try {
        process.kill(Number(entry), "SIGKILL")
      } catch {
        // Gone meanwhile.
      }
    }
  }
  for (const dir of dead) await rm(dir, { recursive: true, force: true })
  return dead
}

/** Test databases are named `<prefix>_<pid of their test process>_<8 hex>`. */
const TEST_DATABASE = /^keyway_[a-z0-9_]*?_(\d+)_[0-9a-f]{8}$/

/**
 * Drops the test databases of test processes that are gone, and made over `olderThanMs`
 * ago (default 30 min). Only on this machine's Postgres: elsewhere a pid tells nothing. The
 * age guards what the pid cannot see: a test in another pid namespace (a container) sharing
 * this Postgres. No test file lives 10 minutes (the runner stops it). Returns the databases
 * dropped.
 */
export async function sweepTestDatabases(
  client: pg.Client,
  local: boolean,
  olderThanMs = 30 * 60_000,
): Promise<string[]> {
  if (!local) return []
  // A database's age is its directory's: PG_VERSION is written once, when it is made.
  const r = await client.query<{ datname: string }>(
    `select datname from pg_database
      where datname like 'keyway\\_%' and not datistemplate
        and (pg_stat_file('base/' || oid || '/PG_VERSION')).modification
            < now() - make_interval(secs => $1 / 1000.0)`,
    [olderThanMs],
  )
  const dead = r.rows
    .map((row) => row.datname)
    .filter((name) => {
      const m = TEST_DATABASE.exec(name)
      return m !== null && !isRunning(Number(m[1]))
    })
  for (const name of dead) {
    await client.query(`drop database if exists "${name}" with (force)`).catch(() => {}) // another process sweeping the same one
  }
  return dead
}

/**
 * Drops the template databases (`keyway_tpl_<hash>[_icu_…]`) of other migrations than
 * `hash` that were made over `olderThanMs` ago (default a day): every change to sql/ or the
 * migrator makes new ones, and the old ones stayed on the shared Postgres for good. Not
 * younger ones: a test run of another checkout may be using one now, and dropping each
 * other's templates, two runs would rebuild them in turn. One with a session on it is left.
 * The caller holds the lock that template builds take, so that a build does
 * not meet one half dropped. Only on this machine's Postgres. Returns those dropped.
 */
export async function sweepOldTemplates(
  client: pg.Client,
  local: boolean,
  hash: string,
  options: { olderThanMs?: number; family?: string } = {},
): Promise<string[]> {
  if (!local) return []
  // The family is a test's own, so that a sweep of any age leaves the real templates alone.
  const family = options.family ?? "keyway_tpl"
  if (!/^[a-z_]+$/.test(family)) throw new Error(`not a template family: ${family}`)
  const like = (s: string) => s.replaceAll("_", "\\_")
  const r = await client.query<{ datname: string }>(
    `select datname from pg_database
      where datname like $2 || '%'
        and datname <> $3 and datname not like $4 || '%'
        and (pg_stat_file('base/' || oid || '/PG_VERSION')).modification
            < now() - make_interval(secs => $1 / 1000.0)`,
    [
      options.olderThanMs ?? 24 * 3600_000,
      like(`${family}_`),
      `${family}_${hash}`,
      like(`${family}_${hash}_`),
    ],
  )
  const dropped: string[] = []
  for (const { datname } of r.rows) {
    if (!/^[a-z0-9_]+$/.test(datname)) continue
    try {
      // A template cannot be dropped. Without FORCE a drop is refused while anyone is
      // connected to it, and waits for a clone in progress to finish.
      await client.query(`alter database "${datname}" is_template false`)
      await client.query(`drop database if exists "${datname}"`)
      dropped.push(datname)
    } catch {
      // In use, or swept by another process meanwhile: left a template, as it was.
      await client.query(`alter database "${datname}" is_template true`).catch(() => {})
    }
  }
  return dropped
}

/**
 * Test streams are named `T<8 hex>` (createTestStream, which the benches use too, and the
 * outbox tests' sites); `BENCH<6 hex>` are the benches' from before they used it.
 */
const TEST_STREAM = /^(T[0-9A-F]{8}|BENCH[0-9A-F]{6})$/

/**
 * Deletes test streams older than `olderThanMs` (default 2 h; no test file runs 10 minutes
 * without being stopped). Streams carry no pid, so age is the sign. Returns their names.
 */
export async function sweepTestStreams(
  jsm: JetStreamManager,
  options: { olderThanMs?: number; names?: RegExp } = {},
): Promise<string[]> {
  const cutoff = Date.now() - (options.olderThanMs ?? 2 * 3600_000)
  const names = options.names ?? TEST_STREAM
  const stale: string[] = []
  for await (const info of jsm.streams.list()) {
    if (names.test(info.config.name) && Date.parse(info.created) < cutoff) {
      stale.push(info.config.name)
    }
  }
  for (const name of stale) await jsm.streams.delete(name).catch(() => {})
  return stale
}
