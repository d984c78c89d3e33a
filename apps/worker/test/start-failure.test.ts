// A start that waiting cannot mend ends the worker with exit 1 and one JSON line in its own
// log format saying why: thrown out of the top-level await, it was Node's stack trace, which
// a log pipeline reading the worker's JSON lines does not parse.
import assert from "node:assert/strict"
import { execFile } from "node:child_process"
import { randomBytes } from "node:crypto"
import { createServer, type Server } from "node:net"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import { createTestDatabase, type TestDatabase } from "@keyway/testkit"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))
const NATS_URL = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
const REDIS_URL = process.env.KEYWAY_TEST_REDIS_URL ?? "redis://127.0.0.1:6379"

let t: TestDatabase
before(async () => {
  t = await createTestDatabase()
})
after(async () => {
  await t?.drop()
})

/** The worker run to its end, stdout and stderr apart; a start that hangs fails the test. */
const runWorker = (env: Record<string, string>) =>
  new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
    const stream = `T${randomBytes(4).toString("hex").toUpperCase()}`
    execFile(
      process.execPath,
      ["--import", "tsx", main],
      {
        env: {
          ...process.env,
          KEYWAY_SITE: "cloud",
          KEYWAY_STREAM: stream,
          KEYWAY_GROUP: "g",
          KEYWAY_FILTER_SUBJECT: `${stream.toLowerCase()}.>`,
          DATABASE_URL: t.url,
          NATS_URL,
          REDIS_URL,
          ...env,
        },
        timeout: 60_000,
      },
      (error, out, err) =>
        resolve({ code: error ? ((error.code as number | undefined) ?? null) : 0, out, err }),
    )
  })

const jsonLines = (out: string) =>
  out
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>)

function assertFailedToStart(
  r: { code: number | null; out: string; err: string },
  error: RegExp,
): void {
  const printed = `stdout:\n${r.out}\nstderr:\n${r.err}`
  assert.equal(r.code, 1, printed)
  const failed = jsonLines(r.out).filter((l) => l.message === "worker failed to start")
  assert.equal(failed.length, 1, printed)
  assert.equal(failed[0]!.level, "error")
  assert.match(String(failed[0]!.error), error, printed)
  assert.doesNotMatch(r.err, /^\s+at /m, `no stack trace; ${printed}`)
}

test("a metrics port in use: exit 1, one JSON line saying so, no stack trace", async () => {
  // Held on all addresses, as the worker's metrics server asks for it.
  const holder: Server = createServer()
  await new Promise<void>((resolve) => holder.listen(0, "0.0.0.0", resolve))
  const port = (holder.address() as { port: number }).port
  try {
    assertFailedToStart(await runWorker({ METRICS_PORT: String(port) }), /EADDRINUSE/)
  } finally {
    await new Promise((resolve) => holder.close(resolve))
  }
})

test("a role Postgres refuses: exit 1, one JSON line saying so, no stack trace", async () => {
  const url = new URL(t.url)
  url.username = "no_such_role_here"
  assertFailedToStart(
    await runWorker({ DATABASE_URL: url.toString() }),
    /role "no_such_role_here" does not exist/,
  )
})
