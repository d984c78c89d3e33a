// The project's pm2 daemon, on a PM2_HOME of its own: what `just status` sees of a process
// that cannot stay up, and what is left when the daemon itself dies.
import assert from "node:assert/strict"
import { type ChildProcess, spawn } from "node:child_process"
import { once } from "node:events"
import {
  chmod,
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  rm,
  stat,
  utimes,
  writeFile,
} from "node:fs/promises"
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
  specDigest,
} from "../src/site-plan.ts"

const fixture = fileURLToPath(new URL("./fixtures/pm2-start.ts", import.meta.url))

/** Runs the fixture on a fresh PM2_HOME; returns what it printed and the home. */
async function underPm2(
  spec: ProcessSpec,
  watchMs: number,
  keepDaemon = false,
  homeMode = 0o700,
  /** Watch until three reports after this status first shows, `watchMs` at most. */
  watchAfter?: string,
) {
  const home = await mkdtemp(join(tmpdir(), "keyway-pm2-"))
  await chmod(home, homeMode)
  const child = spawnTs(fixture, {
    KEYWAY_TEST_PM2_HOME: home,
    KEYWAY_TEST_PM2_SPEC: JSON.stringify(spec),
    KEYWAY_TEST_WATCH_MS: String(watchMs),
    ...(keepDaemon ? { KEYWAY_TEST_PM2_KEEP: "1" } : {}),
    ...(watchAfter ? { KEYWAY_TEST_WATCH_AFTER: watchAfter } : {}),
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

test("the daemon's home, where it dumps every process's environment, is kept to its owner", async () => {
  // As `.run/pm2` under a umask of 022: the dump.pm2 a signal or `pm2 save` writes there
  // holds the NATS passwords, with mode 0644.
  const { home } = await underPm2(
    { name: "idle", script: process.execPath, args: ["-e", ""], env: {}, tier: "app" },
    500,
    false,
    0o755,
  )
  try {
    assert.equal((await stat(home)).mode & 0o777, 0o700)
  } finally {
    await cleanUp(home)
  }
})

test("a socket left by a daemon that was killed is no daemon: status and down start none", async () => {
  const home = await mkdtemp(join(tmpdir(), "keyway-pm2-"))
  try {
    // What a daemon killed with -9 leaves: its socket, and the pid of a process now gone.
    const gone = spawn(process.execPath, ["-e", ""])
    await once(gone, "exit")
    await writeFile(join(home, "rpc.sock"), "")
    await writeFile(join(home, "pm2.pid"), String(gone.pid))
    const child = spawnTs(fileURLToPath(new URL("./fixtures/pm2-connect.ts", import.meta.url)), {
      KEYWAY_TEST_PM2_HOME: home,
    })
    await child.exited()
    assert.deepEqual(child.json(), [{ daemon: "none" }])
    assert.equal(
      (await readFile(join(home, "pm2.pid"), "utf8")).trim(),
      String(gone.pid),
      "no daemon started",
    )
  } finally {
    await cleanUp(home)
  }
})

test("a process that keeps dying ends errored, and is no longer restarted", {
  timeout: 120_000,
}, async () => {
  // A process that exits at once, restarted a second later each time, is given up on after
  // its tenth restart, in about 11 s (later on a busy machine: 18 s of watching were once
  // too few); watched for three reports more after that.
  const { home, seen } = await underPm2(
    {
      name: "dies",
      script: process.execPath,
      args: ["-e", "process.exit(3)"],
      env: {},
      tier: "app",
    },
    90_000,
    false,
    0o700,
    "errored",
  )
  try {
    const first = seen.findIndex((s) => s.status === "errored")
    assert.ok(first >= 0, `never errored: ${JSON.stringify(seen.slice(-3))}`)
    // Given up on: errored from then on, and not started again.
    const after = seen.slice(first)
    assert.ok(after.length >= 3, "watched for a while after")
    // pm2 may report the last dead process's pid for a moment, then 0; a new process would
    // have a new pid and one more restart.
    const dead = seen[first]!
    for (const s of after) {
      assert.deepEqual([s.status, s.restarts], ["errored", dead.restarts], JSON.stringify(after))
      assert.ok(s.pid === dead.pid || s.pid === 0, `not started again: ${JSON.stringify(after)}`)
    }
  } finally {
    await cleanUp(home)
  }
})

test("a daemon killed outright leaves its child running; the child is found by its pid file, and stopped", async (t) => {
  const { home, seen } = await underPm2(
    { name: "cloud-worker", script: "/bin/sleep", args: ["300"], env: {}, tier: "app" },
    1500,
    true,
  )
  try {
    const sleeper = seen.at(-1)!.pid
    const pidFile = join(home, "pids", "cloud-worker-0.pid")
    assert.ok(sleeper > 0 && (await running(sleeper)))
    assert.equal(await readFile(pidFile, "utf8"), String(sleeper))
    // What findOrphans knows the child by: pm2 names the pid file in its environment.
    const environ = await readFile(`/proc/${sleeper}/environ`, "utf8")
    assert.ok(environ.split("\0").includes(`pm_pid_path=${pidFile}`), await describe(home, sleeper))
    // The running daemon's child is its own, even when the caller's list of it is stale.
    assert.deepEqual(await findOrphans(home, []), [], await describe(home, sleeper))
    assert.equal(await readFile(pidFile, "utf8"), String(sleeper), "its pid file kept")
    const daemon = Number(await readFile(join(home, "pm2.pid"), "utf8"))
    kill(daemon)
    // A signal is not a death: until the daemon is gone, its child is still its child.
    await waitFor(async () => !(await running(daemon)), { timeoutMs: 5000, message: "daemon gone" })
    const state = await describe(home, sleeper)
    if (!(await running(sleeper))) {
      // Twice in CI (fresh clones, the whole suite), never here, the child was gone by now;
      // the cause is not known. Nothing is left to find, and the file is stale.
      t.diagnostic(`the child did not outlive its daemon: ${state}`)
      assert.deepEqual(await findOrphans(home, []), [])
      assert.deepEqual(await readdir(join(home, "pids")), [])
      return
    }
    const orphans = await findOrphans(home, [])
    assert.deepEqual(
      orphans.map((o) => [o.name, o.pid]),
      [["cloud-worker", sleeper]],
      state,
    )
    await stopOrphans(orphans, 5000)
    assert.equal(await running(sleeper), false)
    assert.deepEqual(await readdir(join(home, "pids")), [])
  } finally {
    await cleanUp(home)
  }
})

test("findOrphans knows a process by the pid file its environment names, not by the file's time", async () => {
  const home = await mkdtemp(join(tmpdir(), "keyway-pm2-"))
  await mkdir(join(home, "pids"))
  const spawned: ChildProcess[] = []
  const sleep = (pidPath: string) => {
    const child = spawn("/bin/sleep", ["300"], { env: { pm_pid_path: pidPath }, stdio: "ignore" })
    spawned.push(child)
    return child.pid!
  }
  try {
    // Left by a dead daemon (no pm2.pid here), its file's time an hour off: the wall clock
    // stepped since pm2 wrote it (a VM resumed).
    const pidFile = join(home, "pids", "cloud-worker-0.pid")
    const orphan = sleep(pidFile)
    await writeFile(pidFile, String(orphan))
    const later = new Date(Date.now() + 3_600_000)
    await utimes(pidFile, later, later)
    // A pid file whose pid has since been given to another process (here, this one).
    const stale = join(home, "pids", "cloud-relay-1.pid")
    await writeFile(stale, String(process.pid))
    // A pid given to a process that pm2 started for another file: another home's, say.
    const otherFile = join(home, "pids", "cloud-demo-2.pid")
    const other = sleep(join(home, "..", "elsewhere", "pids", "cloud-demo-2.pid"))
    await writeFile(otherFile, String(other))
    // A pid file copied (cp -r of a checkout) names init.
    await writeFile(join(home, "pids", "cloud-nats-3.pid"), "1")

    assert.deepEqual(await findOrphans(home, [orphan]), [], "a running daemon's own")
    const orphans = await findOrphans(home, [])
    assert.deepEqual(
      orphans.map((o) => [o.name, o.pid]),
      [["cloud-worker", orphan]],
    )
    assert.deepEqual(await readdir(join(home, "pids")), ["cloud-worker-0.pid"], "stale ones gone")
    assert.equal(await running(other), true, "another's process left alone")
    await stopOrphans(orphans, 5000)
    assert.equal(await running(orphan), false)
    assert.deepEqual(await readdir(join(home, "pids")), [])
    assert.equal(await running(process.pid), true)
    await assert.rejects(findOrphans("relative/home", []), /must be an absolute path/)
  } finally {
    for (const child of spawned) child.kill("SIGKILL")
    await rm(home, { recursive: true, force: true })
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

test("up restarts a process whose settings changed, and leaves one alone whose did not", {
  timeout: 60_000,
}, async () => {
  const port = await freePort()
  const dir = await mkdtemp(join(tmpdir(), "keyway-ensure-"))
  const home = await mkdtemp(join(tmpdir(), "keyway-pm2-"))
  await chmod(home, 0o700)
  const redis: ProcessSpec = {
    name: "cloud-redis",
    script: "redis-server",
    args: ["--set-proc-title", "no", "--port", String(port), "--bind", "127.0.0.1", "--dir", dir],
    env: {},
    tier: "server",
    ports: [port],
  }
  // A password rotated, say: only the environment differs.
  const changed = { ...redis, env: { KEYWAY_SOME_PASSWORD: "new" } }
  try {
    const child = spawnTs(fileURLToPath(new URL("./fixtures/ensure-running.ts", import.meta.url)), {
      KEYWAY_TEST_PM2_HOME: home,
      KEYWAY_TEST_ROUNDS: JSON.stringify([[redis], [redis], [changed], [changed]]),
    })
    const { code } = await child.exited()
    assert.equal(code, 0)
    const rounds = child.json() as {
      said: string[]
      listed: { name: string; status: string; pid: number; digest: string }[]
    }[]
    assert.deepEqual(
      rounds.map((r) =>
        r.said
          .join("|")
          .replace(/\s+/g, " ")
          .replace(/\(pid \d+\)/, "(pid)"),
      ),
      [
        "cloud-redis started",
        "cloud-redis already online (pid)",
        "cloud-redis restarted: its settings changed",
        "cloud-redis already online (pid)",
      ],
    )
    const pids = rounds.map((r) => r.listed[0]!.pid)
    assert.equal(pids[1], pids[0])
    assert.notEqual(pids[2], pids[1])
    assert.equal(pids[3], pids[2])
    assert.deepEqual(
      rounds.map((r) => r.listed[0]!.digest),
      [redis, redis, changed, changed].map(specDigest),
    )
    assert.ok(rounds.every((r) => r.listed[0]!.status === "online"))
  } finally {
    await cleanUp(home)
    await rm(dir, { recursive: true, force: true })
  }
})

test("up restarts a process whose environment `pm2 restart --update-env` changed, though its digest did not", {
  timeout: 90_000,
}, async () => {
  const home = await mkdtemp(join(tmpdir(), "keyway-pm2-"))
  await chmod(home, 0o700)
  const plan = {
    DATABASE_URL: "postgres://postgres@127.0.0.1:5432/keyway_cloud",
    NATS_URL: "nats://127.0.0.1:14222",
  }
  const relay: ProcessSpec = {
    name: "cloud-relay",
    script: "/bin/sleep",
    args: ["300"],
    env: plan,
    tier: "app",
  }
  const restart = (env: Record<string, string>) => ({
    pm2: ["restart", "cloud-relay", "--update-env"],
    env,
  })
  // What `npx just pm2 restart cloud-relay --update-env` passed when the justfile exported
  // the shared servers' URLs to every recipe.
  const shared = {
    DATABASE_URL: "postgres://postgres@127.0.0.1:5432/keyway",
    NATS_URL: "nats://127.0.0.1:4222",
  }
  try {
    const child = spawnTs(fileURLToPath(new URL("./fixtures/ensure-running.ts", import.meta.url)), {
      KEYWAY_TEST_PM2_HOME: home,
      KEYWAY_TEST_SHOW_ENV: "DATABASE_URL,NATS_URL,METRICS_PORT",
      KEYWAY_TEST_ROUNDS: JSON.stringify([
        [relay],
        restart(shared),
        [relay],
        // One the plan does not set, but start keeps out of every site process.
        restart({ METRICS_PORT: "9464" }),
        [relay],
        // Nothing up cares about: no restart.
        restart({ EDITOR: "vi" }),
        [relay],
      ]),
    })
    const { code } = await child.exited()
    assert.equal(code, 0)
    const rounds = child.json() as {
      said: string[]
      listed: { pid: number; status: string; env: Record<string, string | null> }[]
    }[]
    assert.deepEqual(
      rounds.map((r) =>
        r.said
          .join("|")
          .replace(/\s+/g, " ")
          .replace(/\(pid \d+\)/, "(pid)"),
      ),
      [
        "cloud-relay started",
        "",
        "cloud-relay restarted: its environment was changed outside up (DATABASE_URL, NATS_URL)",
        "",
        "cloud-relay restarted: its environment was changed outside up (METRICS_PORT)",
        "",
        "cloud-relay already online (pid)",
      ],
    )
    const held = rounds.map((r) => r.listed[0]!.env)
    const planned = { ...plan, METRICS_PORT: null }
    assert.deepEqual(held, [
      planned,
      { ...shared, METRICS_PORT: null },
      planned,
      { ...plan, METRICS_PORT: "9464" },
      planned,
      planned,
      planned,
    ])
    const pids = rounds.map((r) => r.listed[0]!.pid)
    assert.equal(pids[6], pids[5], "left alone after a restart that changed nothing of the plan's")
    assert.ok(rounds.every((r) => r.listed[0]!.status === "online"))
  } finally {
    await cleanUp(home)
  }
})
