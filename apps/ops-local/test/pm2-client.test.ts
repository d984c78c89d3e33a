// The project's pm2 daemon, on a PM2_HOME of its own: what `just status` sees of a process
// that cannot stay up, and what is left when the daemon itself dies.
import assert from "node:assert/strict"
import { type ChildProcess, spawn } from "node:child_process"
import { mkdir, mkdtemp, readdir, readFile, rm, utimes, writeFile } from "node:fs/promises"
import { connect } from "node:net"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import { fileURLToPath } from "node:url"
import { freePort, spawnTs, waitFor } from "@keyway/testkit"
import { findOrphans, stopOrphans } from "../src/orphans.ts"
import {
  type LaunchContext,
  NATS_USERS,
  type ProcessSpec,
  repositoryRoot,
  SITES,
  siteProcesses,
} from "../src/site-plan.ts"

const fixture = fileURLToPath(new URL("./fixtures/pm2-start.ts", import.meta.url))

/** Runs the fixture on a fresh PM2_HOME; returns what it printed and the home. */
async function underPm2(spec: ProcessSpec, watchMs: number, keepDaemon = false) {
  const home = await mkdtemp(join(tmpdir(), "keyway-pm2-"))
  const child = spawnTs(fixture, {
    KEYWAY_TEST_PM2_HOME: home,
    KEYWAY_TEST_PM2_SPEC: JSON.stringify(spec),
    KEYWAY_TEST_WATCH_MS: String(watchMs),
    ...(keepDaemon ? { KEYWAY_TEST_PM2_KEEP: "1" } : {}),
  })
  const { code } = await child.exited()
  assert.equal(code, 0)
  return { home, seen: child.json() as { status: string; restarts: number; pid: number }[] }
}

function kill(pid: number) {
  try {
    process.kill(pid, "SIGKILL")
  } catch {
    // Gone already.
  }
}

/** Stops whatever the test left under `home` (a daemon cut short, an orphan) and removes it. */
async function cleanUp(home: string) {
  const pids = [join(home, "pm2.pid")]
  for (const f of await readdir(join(home, "pids")).catch(() => [] as string[])) {
    pids.push(join(home, "pids", f))
  }
  for (const file of pids) {
    const pid = Number(await readFile(file, "utf8").catch(() => ""))
    if (pid > 0 && pid !== process.pid) kill(pid)
  }
  await rm(home, { recursive: true, force: true })
}

/** Whether a Redis server answers PING on the port. */
function pong(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ port, host: "127.0.0.1" }, () => socket.write("PING\r\n"))
    socket.once("data", (d) => {
      socket.destroy()
      resolve(d.toString().startsWith("+PONG"))
    })
    socket.once("error", () => resolve(false))
  })
}

/** What findOrphans would read of `pid` under `home`, for a failure's message. */
async function describe(home: string, pid: number) {
  const files = await readdir(join(home, "pids")).catch(() => [])
  const contents = await Promise.all(
    files.map(
      async (f) => `${f}=${await readFile(join(home, "pids", f), "utf8").catch(() => "?")}`,
    ),
  )
  const daemon = await readFile(join(home, "pm2.pid"), "utf8").catch(() => "?")
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch((e) => String(e))
  const environ = await readFile(`/proc/${pid}/environ`, "utf8").catch((e) => String(e))
  const pidPath = environ.split("\0").find((e) => e.startsWith("pm_pid_path")) ?? "no pm_pid_path"
  return `files [${contents.join(", ")}] daemon ${daemon} stat ${stat.trim()} env ${pidPath}`
}

/** Running, as opposed to gone or a zombie nobody has reaped yet. */
async function running(pid: number) {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "")
  return stat !== "" && stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z"
}

test("a process that keeps dying ends errored, and is no longer restarted", async () => {
  // 18 s of pm2's view: a process that exits at once, restarted a second later each time, is
  // given up on after its tenth restart, in about 11 s.
  const { home, seen } = await underPm2(
    {
      name: "dies",
      script: process.execPath,
      args: ["-e", "process.exit(3)"],
      env: {},
      tier: "app",
    },
    18_000,
  )
  try {
    const first = seen.findIndex((s) => s.status === "errored")
    assert.ok(first >= 0, `never errored: ${JSON.stringify(seen.slice(-3))}`)
    // Given up on: errored from then on, and not started again.
    const after = seen.slice(first)
    assert.ok(after.length >= 3, "watched for a while after")
    for (const s of after) assert.deepEqual(s, seen[first])
  } finally {
    await cleanUp(home)
  }
})

test("the processes of a daemon killed outright are found by their pid files, and stopped", async () => {
  const { home, seen } = await underPm2(
    { name: "cloud-worker", script: "/bin/sleep", args: ["300"], env: {}, tier: "app" },
    1500,
    true,
  )
  let other: ChildProcess | undefined
  try {
    const sleeper = seen.at(-1)!.pid
    assert.ok(sleeper > 0 && (await running(sleeper)))
    // The running daemon's child is its own, even when the caller's list of it is stale.
    const before = await describe(home, sleeper)
    assert.deepEqual(await findOrphans(home, []), [], before)
    const after = await describe(home, sleeper)
    assert.ok(after.includes("cloud-worker-0.pid"), `kept its pid file: ${before} / ${after}`)
    const daemon = Number(await readFile(join(home, "pm2.pid"), "utf8"))
    kill(daemon)
    // A signal is not a death: until the daemon is gone, its child is still its child.
    await waitFor(async () => !(await running(daemon)), { timeoutMs: 5000, message: "daemon gone" })
    // The wall clock stepped an hour since pm2 wrote the file (a VM resumed): the file's time
    // says nothing of the process's start.
    const later = new Date(Date.now() + 3_600_000)
    await utimes(join(home, "pids", "cloud-worker-0.pid"), later, later)
    // A pid file whose pid has since been given to another process (here, this one).
    const stale = join(home, "pids", "cloud-relay-1.pid")
    await writeFile(stale, String(process.pid))
    // A pid given to a process that pm2 started for another file: another home's, say.
    other = spawn("/bin/sleep", ["300"], {
      env: { pm_pid_path: join(home, "..", "elsewhere", "pids", "cloud-demo-2.pid") },
      stdio: "ignore",
    })
    const otherFile = join(home, "pids", "cloud-demo-2.pid")
    await writeFile(otherFile, String(other.pid))
    // A pid file copied (cp -r of a checkout) names init.
    await writeFile(join(home, "pids", "cloud-nats-3.pid"), "1")
    assert.deepEqual(await findOrphans(home, [sleeper]), [], "a running daemon's own")
    const seen6 = await describe(home, sleeper)
    const orphans = await findOrphans(home, [])
    assert.deepEqual(
      orphans.map((o) => [o.name, o.pid]),
      [["cloud-worker", sleeper]],
      seen6,
    )
    for (const file of [stale, otherFile]) {
      assert.equal(await readFile(file, "utf8").catch(() => "removed"), "removed")
    }
    assert.equal(await running(other.pid!), true)
    await stopOrphans(orphans, 5000)
    assert.equal(await running(sleeper), false)
    assert.deepEqual(await readdir(join(home, "pids")), [])
    assert.equal(await running(process.pid), true)
  } finally {
    other?.kill()
    await cleanUp(home)
  }
})

test("a site's redis-server started as the plan says keeps the environment that names it", async () => {
  // redis-server writes its process title over its environment unless told not to; then an
  // orphaned site redis could not be told from a stranger holding its pid.
  const ctx: LaunchContext = {
    root: repositoryRoot(),
    runDir: await mkdtemp(join(tmpdir(), "keyway-plan-redis-")),
    postgresUrl: "postgres://postgres@127.0.0.1:5432/postgres",
    passwords: Object.fromEntries(NATS_USERS.map((u) => [u, "unused"])),
    nodeBinary: process.execPath,
    natsServerBinary: "nats-server",
    redisServerBinary: "redis-server",
    demoRate: 1,
  }
  const spec = siteProcesses(SITES.cloud, ctx).find((p) => p.name === "cloud-redis")!
  const args = [...spec.args]
  const port = await freePort()
  args[args.indexOf("--port") + 1] = String(port)
  args[args.indexOf("--dir") + 1] = ctx.runDir
  const home = await mkdtemp(join(tmpdir(), "keyway-pm2-"))
  await mkdir(join(home, "pids"))
  const pidFile = join(home, "pids", "cloud-redis-1.pid")
  const redis = spawn(spec.script, args, { env: { pm_pid_path: pidFile }, stdio: "ignore" })
  try {
    await writeFile(pidFile, String(redis.pid))
    // Answering, so past the point where it would have set its title.
    await waitFor(() => pong(port), { timeoutMs: 10_000, message: "redis answering" })
    const orphans = await findOrphans(home, [])
    assert.deepEqual(
      orphans.map((o) => [o.name, o.pid]),
      [["cloud-redis", redis.pid]],
    )
    await stopOrphans(orphans, 5000)
    assert.equal(await running(redis.pid!), false)
  } finally {
    redis.kill("SIGKILL")
    await rm(home, { recursive: true, force: true })
    await rm(ctx.runDir, { recursive: true, force: true })
  }
})
