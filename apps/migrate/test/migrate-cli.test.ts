// `just migrate` meets a bad DATABASE_URL with one line naming what is wrong and a non-zero
// exit, never a stack: 2 for a value that is not a postgres URL, 1 for a server that refuses.
import assert from "node:assert/strict"
import { execFile, spawn } from "node:child_process"
import { test } from "node:test"
import { fileURLToPath } from "node:url"
import { createDb } from "@keyway/db"
import { createTestDatabase, freePort, waitFor } from "@keyway/testkit"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))

/** libs/db's migrate.ts RUN_LOCK ("kwmi"): what a run holds from its start to its end. */
const RUN_LOCK = 0x6b776d69

const migrate = (databaseUrl: string) =>
  new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
    execFile(
      process.execPath,
      ["--import", "tsx", main],
      { env: { ...process.env, DATABASE_URL: databaseUrl }, timeout: 30_000 },
      (error, out, err) => resolve({ code: error ? (error.code as number) : 0, out, err }),
    )
  })

test("a DATABASE_URL that is not a postgres URL: exit 2, one line, the value not repeated", async () => {
  const r = await migrate("mysql://u:secret@127.0.0.1/db")
  assert.equal(r.code, 2)
  assert.match(r.err, /^migrate: DATABASE_URL must be a URL like postgres:/)
  assert.equal(r.err.trim().split("\n").length, 1)
  assert.ok(!r.err.includes("secret"))
})

test("a server that is not there, or a role it does not know: exit 1, one line with the reason", async () => {
  const port = await freePort()
  const away = await migrate(`postgres://postgres@127.0.0.1:${port}/keyway_nowhere`)
  assert.equal(away.code, 1)
  assert.equal(away.err, `migrate: connect ECONNREFUSED 127.0.0.1:${port}\n`)
  const role = await migrate("postgres://no_such_role_here@127.0.0.1:5432/keyway_nowhere")
  assert.equal(role.code, 1)
  assert.equal(role.err, 'migrate: role "no_such_role_here" does not exist\n')
})

test("a second migrate while one runs says once that it waits, then finishes", async () => {
  await using t = await createTestDatabase()
  // As a first `just migrate` holds it for its whole run, on the one session of a pool of one.
  const holder = createDb({ connectionString: t.url, max: 1 })
  try {
    await holder
      .selectNoFrom((eb) => eb.fn("pg_advisory_lock", [eb.val(RUN_LOCK)]).as("locked"))
      .execute()
    const child = spawn(process.execPath, ["--import", "tsx", main], {
      env: { ...process.env, DATABASE_URL: t.url },
      stdio: ["ignore", "pipe", "pipe"],
    })
    let out = ""
    let err = ""
    child.stdout.on("data", (d) => (out += d))
    child.stderr.on("data", (d) => (err += d))
    const exited = new Promise<number | null>((resolve) => child.once("close", resolve))
    try {
      await waitFor(() => err.length > 0, {
        timeoutMs: 30_000,
        message: () => `a line on stderr; it printed ${out}`,
      })
      assert.equal(err, "migrate: another migrate holds the run lock; waiting\n")
      assert.equal(child.exitCode, null, "still waiting")
      await holder
        .selectNoFrom((eb) => eb.fn("pg_advisory_unlock", [eb.val(RUN_LOCK)]).as("unlocked"))
        .execute()
      assert.equal(await exited, 0, err)
      assert.equal(out, "up to date\n")
      assert.equal(err, "migrate: another migrate holds the run lock; waiting\n", "said once")
    } finally {
      child.kill("SIGKILL")
    }
  } finally {
    await holder.destroy()
  }
})
