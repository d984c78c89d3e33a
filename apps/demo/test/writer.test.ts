// The demo writer `just up` runs: SIGTERM ends it between transactions and it exits 0, at
// once even in the middle of a long pause between writes (pm2 kills after 15 s, compose
// after 20).
import assert from "node:assert/strict"
import { execFile } from "node:child_process"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import {
  createTestDatabase,
  type OtlpReceiver,
  spawnTs,
  startOtlpReceiver,
  type TestDatabase,
  waitFor,
} from "@keyway/testkit"
import { sql } from "kysely"

const writer = fileURLToPath(new URL("../src/writer.ts", import.meta.url))
let t: TestDatabase
let receiver: OtlpReceiver
before(async () => {
  t = await createTestDatabase()
  receiver = await startOtlpReceiver()
})
after(async () => {
  await receiver.stop()
  await t.drop()
})

test("SIGTERM in a pause between writes stops the writer then and there, exit 0", async () => {
  // One event, then a pause of 100 s before the next.
  const child = spawnTs(writer, { KEYWAY_SITE: "factory", DATABASE_URL: t.url, DEMO_RATE: "0.01" })
  try {
    const written = async () =>
      Number(
        (await sql<{ n: string }>`select count(*) as n from keyway.outbox`.execute(t.db)).rows[0]!
          .n,
      )
    await waitFor(async () => (await written()) === 1, {
      timeoutMs: 20_000,
      message: () => `the first event written; the writer printed ${child.lines.join("\n")}`,
    })
    child.kill("SIGTERM")
    // Far short of the pause: the old writer slept it out before it looked at the signal.
    await waitFor(() => child.exitCode !== null, {
      timeoutMs: 30_000,
      message: "the writer stopped within its stop's grace",
    })
    await child.exited() // and its last output read
    assert.equal(child.exitCode, 0, child.lines.join("\n"))
    assert.ok(child.json().some((l) => l.message === "demo writer stopped" && l.written === 1))
    assert.equal(await written(), 1)
  } finally {
    child.kill("SIGKILL")
  }
})

test("each write is a span, and its event carries the span's trace: an event's trace starts at the writer", async () => {
  const child = spawnTs(writer, {
    KEYWAY_SITE: "cloud",
    DATABASE_URL: t.url,
    DEMO_RATE: "20",
    OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
  })
  try {
    const written = () =>
      receiver
        .spans()
        .filter((s) => s.serviceName === "keyway-demo-cloud" && s.name === "demo write")
    await waitFor(() => written().length >= 3, {
      timeoutMs: 30_000,
      message: () => `three write spans; the writer printed ${child.lines.join("\n")}`,
    })
    // The spans first: one exported after the query could be of an event it did not see.
    const spans = written()
    const traces = await sql<{ trace: { traceparent: string } | null }>`
      select trace from keyway.outbox`.execute(t.db)
    const stored = new Set(traces.rows.map((r) => r.trace?.traceparent.split("-")[1]))
    for (const span of spans)
      assert.ok(stored.has(span.traceId), `span ${span.traceId} has its event`)
  } finally {
    child.kill("SIGTERM")
    await child.exited()
  }
})

test("a DEMO_KEYS that is not a whole number is refused by name, exit 2", async () => {
  for (const raw of ["0x10", "abc", "0"]) {
    const { code, err } = await new Promise<{ code: number | null; err: string }>((resolve) =>
      execFile(
        process.execPath,
        ["--import", "tsx", writer],
        {
          env: { ...process.env, KEYWAY_SITE: "factory", DATABASE_URL: t.url, DEMO_KEYS: raw },
          timeout: 20_000,
        },
        (error, _out, stderr) => resolve({ code: error ? (error.code as number) : 0, err: stderr }),
      ),
    )
    assert.equal(code, 2, `${raw}: ${err}`)
    assert.match(
      err,
      new RegExp(`DEMO_KEYS must be an integer from 1 to 1000000, got "${raw}"`),
      `${raw}`,
    )
  }
})
