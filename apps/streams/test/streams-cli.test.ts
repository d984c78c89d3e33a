// `just streams` meets what is wrong with one line and an exit code, never a stack or a wait
// for ever: 2 for what the operator gave (the file, NATS_URL), 1 for a server not there.
import assert from "node:assert/strict"
import { execFile } from "node:child_process"
import { test } from "node:test"
import { fileURLToPath } from "node:url"
import { freePort } from "@keyway/testkit"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))
const cloud = fileURLToPath(new URL("../../../nats/streams/cloud.json", import.meta.url))

const streams = (args: string[], natsUrl: string) =>
  new Promise<{ code: number | null; err: string }>((resolve) => {
    execFile(
      process.execPath,
      ["--import", "tsx", main, ...args],
      { env: { ...process.env, NATS_URL: natsUrl }, timeout: 20_000 },
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
})

test("a NATS server that is not there: exit 1 at once, naming it, instead of waiting for ever", async () => {
  const url = `nats://127.0.0.1:${await freePort()}`
  const r = await streams([cloud], url)
  assert.equal(r.code, 1)
  assert.equal(r.err, `streams: cannot connect to NATS at ${url}: connection refused\n`)
})
