// The ESL worker's start: its settings reach the clients, and a start that waiting cannot
// mend ends the process with one JSON line in its log format, not Node's stack trace.
import assert from "node:assert/strict"
import { type AddressInfo, createServer, type Server } from "node:net"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import { createTestDatabase, spawnTs, type TestDatabase } from "@keyway/testkit"
import { parseConfig } from "../src/config.ts"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))
const NATS_URL = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
const REDIS_URL = process.env.KEYWAY_TEST_REDIS_URL ?? "redis://127.0.0.1:6379"
const aims = {
  AIMS_URL: "http://127.0.0.1:1",
  AIMS_COMPANY: "ACME",
  AIMS_STORE: "S001",
  AIMS_USERNAME: "esl@acme.example",
  AIMS_PASSWORD: "secret",
}

let t: TestDatabase
before(async () => {
  t = await createTestDatabase()
})
after(async () => {
  await t?.drop()
})

test("NATS_INBOX_PREFIX reaches the worker's settings; before, it was parsed and dropped", () => {
  const config = parseConfig({
    DATABASE_URL: t.url,
    ESL_STREAM: "CLOUD",
    NATS_USER: "cloud-esl",
    NATS_PASS: "p",
    NATS_INBOX_PREFIX: "_INBOX_cloud-worker",
    ...aims,
  })
  assert.equal(config.natsInboxPrefix, "_INBOX_cloud-worker")
})

test("a metrics port in use stops the worker at start with one JSON line in its log format", async () => {
  // Held on all addresses, as the worker's metrics server asks for it.
  const holder: Server = createServer()
  await new Promise<void>((resolve) => holder.listen(0, "0.0.0.0", resolve))
  try {
    const worker = spawnTs(main, {
      DATABASE_URL: t.url,
      NATS_URL,
      REDIS_URL,
      ESL_STREAM: "NO_SUCH_STREAM",
      METRICS_PORT: String((holder.address() as AddressInfo).port),
      ...aims,
    })
    const { code } = await worker.exited()
    const printed = worker.lines.join("\n")
    assert.equal(code, 1, printed)
    const failed = worker.json().filter((l) => l.message === "esl-worker failed to start")
    assert.equal(failed.length, 1, printed)
    assert.equal(failed[0]!.level, "error")
    assert.match(String(failed[0]!.error), /EADDRINUSE/)
  } finally {
    await new Promise((resolve) => holder.close(resolve))
  }
})
