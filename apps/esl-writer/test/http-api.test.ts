// The writer process's HTTP API as a client meets it: bad requests get a clear answer, and
// none of them stops the next good one.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import {
  createTestDatabase,
  spawnTs,
  type TestDatabase,
  type TsChild,
  waitFor,
} from "@keyway/testkit"
import { migrateEslSchema, upsertProducts } from "../src/index.ts"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))
let t: TestDatabase
let writer: TsChild
let base = ""

before(async () => {
  t = await createTestDatabase()
  await migrateEslSchema(t.db)
  await upsertProducts(t.db, [{ id: "A", name: "Apples 1 kg", priceMinor: 199, currency: "EUR" }])
  writer = spawnTs(main, { DATABASE_URL: t.url, PORT: "0" })
  await waitFor(() => writer.json().some((l) => l.started === "esl-writer"), {
    timeoutMs: 20_000,
    message: () => `the writer started; it printed ${writer.lines.join("\n")}`,
  })
  base = `http://127.0.0.1:${writer.json().find((l) => l.started)!.port}`
})
after(async () => {
  writer?.kill("SIGTERM")
  await writer?.exited()
  await t.drop()
})

const post = (path: string, body: string) =>
  fetch(`${base}${path}`, { method: "POST", body, headers: { "content-type": "application/json" } })

test("a body over the limit gets 413, malformed JSON 400; the next good job is written", async () => {
  const huge = await post("/label-jobs", JSON.stringify({ pad: "x".repeat(5 * 1024 * 1024) }))
  assert.equal(huge.status, 413)
  assert.match(((await huge.json()) as { error: string }).error, /request body over 4194304 bytes/)
  const garbled = await post("/label-jobs", "{not json")
  assert.equal(garbled.status, 400)
  const good = await post(
    "/label-jobs",
    JSON.stringify({ jobId: "j1", labels: [{ labelCode: "C0FFEE000001", productId: "A" }] }),
  )
  assert.equal(good.status, 201)
  assert.deepEqual(
    ((await good.json()) as { tasks: { key: string }[] }).tasks.map((task) => task.key),
    ["C0FFEE000001"],
  )
})
