// The project's pm2 daemon, on a PM2_HOME of its own: what `just status` sees of a process
// that cannot stay up.
import assert from "node:assert/strict"
import { mkdtemp, readFile, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import { fileURLToPath } from "node:url"
import { spawnTs } from "@keyway/testkit"

const fixture = fileURLToPath(new URL("./fixtures/crash-loop.ts", import.meta.url))

test("a process that keeps dying ends errored, and is no longer restarted", async () => {
  const home = await mkdtemp(join(tmpdir(), "keyway-pm2-"))
  try {
    // 12 s of pm2's view, a line a second: a process that exits at once is given up on in
    // about two.
    const child = spawnTs(fixture, { KEYWAY_TEST_PM2_HOME: home, KEYWAY_TEST_WATCH_MS: "12000" })
    const { code } = await child.exited()
    assert.equal(code, 0)
    const seen = child.json() as { status: string; restarts: number }[]
    const first = seen.findIndex((s) => s.status === "errored")
    assert.ok(first >= 0, `never errored: ${JSON.stringify(seen.slice(-3))}`)
    // Given up on: errored from then on, and not started again.
    const after = seen.slice(first)
    assert.ok(after.length >= 3, "watched for a while after")
    for (const s of after) assert.deepEqual(s, seen[first])
  } finally {
    // The fixture stops its daemon; if it was cut short, the daemon is stopped here.
    const pid = Number(await readFile(join(home, "pm2.pid"), "utf8").catch(() => ""))
    if (pid > 0) {
      try {
        process.kill(pid, "SIGKILL")
      } catch {
        // Already gone.
      }
    }
    await rm(home, { recursive: true, force: true })
  }
})
