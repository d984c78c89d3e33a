// Processes a dead pm2 daemon left behind. A daemon killed outright (kill -9, the OOM killer)
// takes none of its children with it: they run on, reparented, and a new daemon knows
// nothing of them. `just down` then stopped nothing, and `just up` started a second set
// beside the first, whose servers found their ports taken.
//
// pm2 writes each child's pid to PM2_HOME/pids/<name>-<id>.pid as it starts it, and gives
// the child that file's path in its environment (pm_pid_path). A process holding the pid
// whose environment names that very file is that child, or a descendant of it (which
// inherits the environment: tsx's esbuild service does, and ends with its parent): a pid
// given out again to anyone else belongs to a process with another environment, and a file
// copied (cp -r of a checkout) names a path the process holding its pid never saw. A child
// of the daemon running now is that daemon's, whatever the files say: between its list and
// our read of the files it may have restarted one. (An earlier check compared the process's
// start with the file's mtime; a step of the wall clock between the two, as a VM's clock
// takes on resume, broke it.) redis-server keeps its environment readable only with
// set-proc-title off, which site-plan.ts sets: one started before that cannot be known, and
// is left running, as before this module.
import { readdir, readFile, rm } from "node:fs/promises"
import { isAbsolute, join, resolve } from "node:path"

export interface Orphan {
  name: string
  pid: number
  pidFile: string
  /** The process's start, in clock ticks after boot: with the pid, its identity. */
  startTicks: number
}

/** A live process's parent and start (clock ticks after boot); undefined if gone or a zombie. */
async function procStat(pid: number): Promise<{ ppid: number; ticks: number } | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "")
  // The command name (field 2) is in parentheses and may hold spaces: count from its end.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
  if (fields.length < 20 || fields[0] === "Z") return undefined
  return { ppid: Number(fields[1]), ticks: Number(fields[19]) }
}

const startTicks = async (pid: number) => (await procStat(pid))?.ticks

/** The pid file pm2 gave the process, from its environment; undefined if unreadable. */
async function pidFileOf(pid: number): Promise<string | undefined> {
  // Not ours to read (another user's process) reads as none: such a process is not our child.
  const environ = await readFile(`/proc/${pid}/environ`, "utf8").catch(() => "")
  const entry = environ.split("\0").find((e) => e.startsWith("pm_pid_path="))
  return entry === undefined ? undefined : resolve(entry.slice("pm_pid_path=".length))
}

/** The processes named by pid files under `pm2Home` still alive, less those in `managed`. */
export async function findOrphans(pm2Home: string, managed: Iterable<number>): Promise<Orphan[]> {
  // pm2 writes absolute paths into the environment; a relative home would match by accident.
  if (!isAbsolute(pm2Home)) throw new Error(`PM2_HOME must be an absolute path: ${pm2Home}`)
  const dir = join(pm2Home, "pids")
  const files = await readdir(dir).catch(() => [] as string[])
  const known = new Set(managed)
  const daemon = Number((await readFile(join(pm2Home, "pm2.pid"), "utf8").catch(() => "")).trim())
  const found: Orphan[] = []
  for (const file of files) {
    const name = /^(.+)-\d+\.pid$/.exec(file)?.[1]
    const pidFile = join(dir, file)
    const pid = Number((await readFile(pidFile, "utf8").catch(() => "")).trim())
    if (!name || !Number.isSafeInteger(pid) || pid <= 0 || known.has(pid)) continue
    const proc = await procStat(pid)
    // The live daemon's child is its own. A daemon killed outright can read as a zombie while
    // its child still names it as parent: the kernel hands children to another thread of the
    // dying process first, and only when the last thread has gone to init. Fresh-clone CI
    // met that window: the child was then skipped as the daemon's.
    if (proc && daemon > 0 && proc.ppid === daemon && (await procStat(daemon)) !== undefined) {
      continue
    }
    if (proc && (await pidFileOf(pid)) === resolve(pidFile)) {
      // Read again: the process might have ended, and its pid gone to another, since.
      if ((await startTicks(pid)) === proc.ticks) {
        found.push({ name, pid, pidFile, startTicks: proc.ticks })
        continue
      }
    }
    // The process is gone, or the pid is another's now: the file is stale.
    await rm(pidFile, { force: true })
  }
  return found
}

/**
 * Stops orphans with SIGTERM, as pm2 would have (every Keyway process drains on it), and
 * after `graceMs` with SIGKILL. Returns once all are gone; throws, naming them, if some are
 * still there 5 s after the SIGKILL (not ours to signal, or stuck in the kernel).
 */
export async function stopOrphans(orphans: readonly Orphan[], graceMs: number): Promise<void> {
  const signal = (o: Orphan, sig: NodeJS.Signals) => {
    try {
      process.kill(o.pid, sig)
    } catch {
      // Gone already.
    }
  }
  for (const o of orphans) signal(o, "SIGTERM")
  const deadline = Date.now() + graceMs
  let alive = [...orphans]
  for (;;) {
    const still = await Promise.all(
      alive.map(async (o) => (await startTicks(o.pid)) === o.startTicks),
    )
    alive = alive.filter((_, n) => still[n])
    if (alive.length === 0) break
    if (Date.now() >= deadline + 5000) {
      throw new Error(
        `could not stop ${alive.map((o) => `${o.name} (pid ${o.pid})`).join(", ")}: stop them by hand`,
      )
    }
    if (Date.now() >= deadline) for (const o of alive) signal(o, "SIGKILL")
    await new Promise((r) => setTimeout(r, 100))
  }
  await Promise.all(orphans.map((o) => rm(o.pidFile, { force: true })))
}
