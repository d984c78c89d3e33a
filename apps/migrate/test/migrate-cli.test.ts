// `just migrate` meets a bad DATABASE_URL with one line naming what is wrong and a non-zero
// exit, never a stack: 2 for a value that is not a postgres URL, 1 for a server that refuses.
import assert from "node:assert/strict"
import { execFile } from "node:child_process"
import { test } from "node:test"
import { fileURLToPath } from "node:url"
import { freePort } from "@keyway/testkit"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))

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
