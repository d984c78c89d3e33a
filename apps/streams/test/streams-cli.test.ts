// `just streams` meets what is wrong with one line and an exit code, never a stack or a
// silent wait: 2 for what the operator gave (the file, NATS_URL, NATS_USER), 1 for what the server
// refused; a server not up yet is waited for, saying so.
import assert from "node:assert/strict"
import { execFile, spawn } from "node:child_process"
import { mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import { fileURLToPath } from "node:url"
import { freePort, startNatsServer, waitFor } from "@keyway/testkit"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))
const cloud = fileURLToPath(new URL("../../../nats/streams/cloud.json", import.meta.url))

const streams = (args: string[], natsUrl: string, env: Record<string, string> = {}) =>
  new Promise<{ code: number | null; err: string }>((resolve) => {
    execFile(
      process.execPath,
      ["--import", "tsx", main, ...args],
      { env: { ...process.env, NATS_URL: natsUrl, ...env }, timeout: 20_000 },
      (error, _out, err) => resolve({ code: error ? (error.code as number) : 0, err }),
    )
  })

test("a site file that does not exist, or a NATS_URL that is not one: exit 2, one line", async () => {
  const missing = await streams(["nats/streams/nosuch.json"], "nats://127.0.0.1:4222")
  assert.equal(missing.code, 2)
  assert.match(missing.err, /^streams: cannot read nats\/streams\/nosuch\.json: ENOENT/)
  assert.equal(missing.err.trim().split("\n").length, 1)
  const badUrl = await streams([cloud], "nats://127.0.0.1:4222,")
  assert.equal(badUrl.code, 2)
  assert.match(badUrl.err, /^streams: NATS_URL must be/)
  // nats.js sends a password only beside a user: the server's "Authorization Violation"
  // said nothing of NATS_USER.
  const passOnly = await streams([cloud], "nats://127.0.0.1:4222", {
    NATS_USER: "",
    NATS_PASS: "x",
  })
  assert.equal(passOnly.code, 2)
  assert.match(passOnly.err, /^streams: NATS_PASS is set without NATS_USER/)
})

test("a stream without a name, or declared twice: exit 2, naming it, before NATS is asked", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-streams-"))
  try {
    const file = join(dir, "site.json")
    await writeFile(file, JSON.stringify({ streams: [{ name: "A" }, { subjects: ["b.>"] }] }))
    // No server there: the file is refused before any connection is tried.
    const unnamed = await streams([file], "nats://127.0.0.1:1")
    assert.equal(unnamed.code, 2)
    assert.match(unnamed.err, /^streams: cannot read .*: .*streams\[1\] has no name/)
    await writeFile(file, JSON.stringify({ streams: [{ name: "A" }, { name: "A" }] }))
    const twice = await streams([file], "nats://127.0.0.1:1")
    assert.equal(twice.code, 2)
    assert.match(twice.err, /stream A is declared twice/)
  } finally {
    await rm(dir, { recursive: true })
  }
})

test("a NATS server that is not up yet is waited for, visibly; a refused password ends it at once", async () => {
  // Waited for: compose starts this beside a NATS that may still be recovering its store.
  const port = await freePort()
  const child = spawn(process.execPath, ["--import", "tsx", main, cloud], {
    env: { ...process.env, NATS_URL: `nats://127.0.0.1:${port}` },
  })
  let err = ""
  child.stderr.on("data", (d) => (err += d))
  const exited = new Promise((resolve) => child.on("exit", resolve))
  try {
    await waitFor(() => /streams: waiting for NATS .*: connection refused/.test(err), {
      timeoutMs: 20_000,
      message: () => `a line saying it waits (stderr: ${err})`,
    })
  } finally {
    // It waits for ever: not left behind, whatever the check found.
    child.kill("SIGKILL")
    await exited
  }
  // Connected, but JetStream does not answer (yet): waited for too, not a failure.
  await using bare = await startNatsServer({ jetstream: false })
  const early = spawn(process.execPath, ["--import", "tsx", main, cloud], {
    env: { ...process.env, NATS_URL: bare.url },
  })
  let earlyErr = ""
  early.stderr.on("data", (d) => (earlyErr += d))
  const earlyExited = new Promise((resolve) => early.on("exit", resolve))
  try {
    await waitFor(() => /streams: waiting for JetStream: /.test(earlyErr), {
      timeoutMs: 20_000,
      message: () => `a line saying it waits for JetStream (stderr: ${earlyErr})`,
    })
    assert.equal(early.exitCode, null, "still waiting")
  } finally {
    early.kill("SIGKILL")
    await earlyExited
  }
  await using server = await startNatsServer({
    config: "authorization { user: admin, password: right }",
  })
  const refused = await streams([cloud], server.url, { NATS_USER: "admin", NATS_PASS: "wrong" })
  assert.equal(refused.code, 1)
  assert.match(refused.err, /^streams: cannot connect to NATS: .*authorization/i)
  assert.equal(refused.err.trim().split("\n").length, 1)
})
