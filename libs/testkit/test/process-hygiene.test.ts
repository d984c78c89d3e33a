import assert from "node:assert/strict"
import { spawn } from "node:child_process"
import { once } from "node:events"
import { readFile, stat } from "node:fs/promises"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import { sql } from "kysely"
import pg from "pg"
import { createTestDatabase, type TestDatabase, waitFor } from "../src/index.ts"
import { sweepTempDirs, sweepTestDatabases } from "../src/internal/leftovers.ts"

let observer: TestDatabase
before(async () => {
  observer = await createTestDatabase({ prefix: "keyway_testkit_observer" })
})
after(() => observer.drop())

const fixture = fileURLToPath(new URL("./fixtures/leave-servers.ts", import.meta.url))

// A killed child that nobody has reaped yet is a zombie: it still has a pid but no longer
// holds ports or files, so it counts as gone.
async function isGone(pid: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8")
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z")
  } catch {
    return true
  }
}

async function runFixture(how: "throw" | "exit" | "signal" | "kill"): Promise<void> {
  const child = spawn(process.execPath, ["--import", "tsx", fixture, how], {
    stdio: ["ignore", "pipe", "pipe"],
  })
  // Subscribed now: the crashing variants may exit before their pids are even parsed.
  const exited = once(child, "exit")
  let stdout = ""
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
    stdout += chunk
  })
  await waitFor(() => stdout.includes("\n"), { timeoutMs: 15_000, message: "fixture started" })
  const { pids, dirs, database } = JSON.parse(stdout) as {
    pids: number[]
    dirs: string[]
    database: string
  }
  // nats-server, redis-server and a child started with spawnTs.
  assert.equal(pids.length, 3)
  if (how === "signal" || how === "kill") {
    for (const pid of pids) assert.equal(await isGone(pid), false)
    child.kill(how === "kill" ? "SIGKILL" : "SIGTERM")
  }
  const [code, signal] = await exited
  // A process left behind holds the fixture's stderr open; closed here, it cannot keep this
  // file running once the check below has failed.
  child.stdout.destroy()
  child.stderr.destroy()
  if (how === "signal") assert.equal(signal, "SIGTERM")
  else if (how === "kill") assert.equal(signal, "SIGKILL")
  else assert.notEqual(code, 0)
  if (how === "kill") {
    // No exit hook ran: what the next test process sweeps is the servers and dirs (found by
    // the dead pid in their dirs' names) and the database (the pid in its name). The child
    // started with spawnTs has no dir; it is no server, and is killed below.
    const swept = await sweepTempDirs()
    for (const dir of dirs) assert.ok(swept.includes(dir), `${dir} swept`)
    const client = new pg.Client({ connectionString: observer.url })
    await client.connect()
    try {
      // Killed a moment ago, so not yet old enough for the default.
      assert.ok(!(await sweepTestDatabases(client, true)).includes(database), "too young")
      assert.ok((await sweepTestDatabases(client, true, 0)).includes(database), `${database} swept`)
    } finally {
      await client.end()
    }
    const idle = pids.pop()!
    process.kill(idle, "SIGKILL")
  }
  try {
    await waitFor(async () => (await Promise.all(pids.map(isGone))).every(Boolean), {
      timeoutMs: 5000,
      message: `processes ${pids.join(", ")} outlived their parent (${how})`,
    })
  } finally {
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGKILL")
      } catch {
        // Gone, as it should be.
      }
    }
  }
  for (const dir of dirs) await assert.rejects(stat(dir), { code: "ENOENT" }, dir)
  const { rows } = await sql`select 1 from pg_database where datname = ${database}`.execute(
    observer.db,
  )
  assert.equal(rows.length, 0, `${database} outlived its test file`)
}

test("servers, dirs and databases go with a test file that throws", () => runFixture("throw"))
test("servers, dirs and databases go with a test file that calls process.exit", () =>
  runFixture("exit"))
test("servers, dirs and databases go with a test file killed by SIGTERM", () =>
  runFixture("signal"))
test("servers, dirs and databases of a test file killed by SIGKILL are swept by the next", () =>
  runFixture("kill"))
