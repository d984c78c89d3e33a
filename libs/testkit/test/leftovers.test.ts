import assert from "node:assert/strict"
import { test } from "node:test"
import { jetstreamManager } from "@nats-io/jetstream"
import { connect } from "@nats-io/transport-node"
import { startNatsServer } from "../src/index.ts"
import { sweepTestStreams } from "../src/internal/leftovers.ts"

test("test streams left by a killed test file are deleted once old; fresh ones and others stay", async () => {
  // A private server: the sweep must not meet the streams of test files running meanwhile.
  await using server = await startNatsServer()
  const nc = await connect({ servers: server.url })
  try {
    const jsm = await jetstreamManager(nc)
    for (const name of ["T0A1B2C3D", "ORDERS", "T0A1B2C3D4"]) {
      await jsm.streams.add({ name, subjects: [`${name.toLowerCase()}.>`] })
    }
    assert.deepEqual(await sweepTestStreams(jsm), [], "none is two hours old")
    assert.deepEqual(await sweepTestStreams(jsm, { olderThanMs: 0 }), ["T0A1B2C3D"])
    const left: string[] = []
    for await (const info of jsm.streams.list()) left.push(info.config.name)
    assert.deepEqual(left.sort(), ["ORDERS", "T0A1B2C3D4"])
  } finally {
    await nc.close()
  }
})

test("a dead test's temp dir goes with its servers, but a process of somebody else's there is left alone", async () => {
  const { spawn, spawnSync } = await import("node:child_process")
  const { mkdir, mkdtemp, rm, stat } = await import("node:fs/promises")
  const { tmpdir } = await import("node:os")
  const { join } = await import("node:path")
  const { sweepTempDirs } = await import("../src/internal/leftovers.ts")
  const root = await mkdtemp(join(tmpdir(), "leftovers-test-"))
  // A pid that has ended: the dir's test process.
  const deadPid = spawnSync("true").pid!
  const dir = join(root, `keyway-redis-${deadPid}-abc123`)
  await mkdir(dir)
  const { freePort } = await import("../src/index.ts")
  const port = String(await freePort())
  const redis = spawn("redis-server", ["--port", port, "--dir", dir, "--save", ""], { cwd: dir })
  const shell = spawn("sleep", ["60"], { cwd: dir })
  const exited = (p: typeof redis) =>
    new Promise((resolve) =>
      p.exitCode !== null || p.signalCode !== null ? resolve(p.exitCode) : p.once("exit", resolve),
    )
  try {
    await new Promise((r) => setTimeout(r, 300))
    assert.deepEqual(await sweepTempDirs(root), [dir])
    await exited(redis)
    assert.equal(redis.signalCode, "SIGKILL", "the dead test's server is killed")
    // Killed with the server, its exit would have come by now.
    await new Promise((r) => setTimeout(r, 200))
    assert.equal(shell.signalCode, null, "a process that only stands in the dir is not")
    await assert.rejects(stat(dir), { code: "ENOENT" })
  } finally {
    redis.kill("SIGKILL")
    shell.kill("SIGKILL")
    await rm(root, { recursive: true, force: true })
  }
})
