// The writer process's HTTP API as a client meets it: bad requests get a clear answer, and
// none of them stops the next good one.
import assert from "node:assert/strict"
import { request } from "node:http"
import { connect } from "node:net"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import {
  createTcpProxy,
  createTestDatabase,
  spawnTs,
  startOtlpReceiver,
  type TestDatabase,
  type TsChild,
  waitFor,
} from "@keyway/testkit"
import { sql } from "kysely"
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

const post = (path: string, body: string | Buffer) =>
  fetch(`${base}${path}`, { method: "POST", body, headers: { "content-type": "application/json" } })

test("a body over the limit gets 413, malformed JSON 400; the next good job is written", async () => {
  const huge = await post("/label-jobs", JSON.stringify({ pad: "x".repeat(5 * 1024 * 1024) }))
  assert.equal(huge.status, 413)
  assert.match(((await huge.json()) as { error: string }).error, /request body over 4194304 bytes/)
  const garbled = await post("/label-jobs", "{not json")
  assert.equal(garbled.status, 400)
  assert.match(((await garbled.json()) as { error: string }).error, /^request body is not JSON/)
  // Latin-1, as an ERP might send it: read as UTF-8, the è became U+FFFD and reached the shelf.
  const latin1 = await post(
    "/price-changes",
    Buffer.from(
      JSON.stringify({ changes: [{ productId: "A", priceMinor: 1, name: "Crème" }] }),
      "latin1",
    ),
  )
  assert.equal(latin1.status, 400)
  assert.match(((await latin1.json()) as { error: string }).error, /not UTF-8/)
  // A byte order mark is no reason to refuse UTF-8.
  const bom = await post(
    "/label-jobs",
    `\ufeff${JSON.stringify({ jobId: "bom", labels: [{ labelCode: "C0FFEE000002", productId: "A" }] })}`,
  )
  assert.equal(bom.status, 201)
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

test("a body of the wrong shape gets 400 naming the field, a repeated job 409; nothing of either is written", async () => {
  const errorOf = async (res: Response) => ((await res.json()) as { error: string }).error
  const cases: [string, string, RegExp][] = [
    ["/label-jobs", "null", /invalid label job/],
    ["/label-jobs", JSON.stringify({ labels: "abc" }), /\["labels"\]/],
    [
      "/label-jobs",
      JSON.stringify({ labels: [{ labelCode: 12, productId: "A" }] }),
      /\["labels"\]\[0\]\["labelCode"\]/,
    ],
    [
      "/label-jobs",
      JSON.stringify({ labels: [{ labelCode: "C0FFEE000009", productId: "A", page: 1.5 }] }),
      /\["page"\]/,
    ],
    ["/price-changes", JSON.stringify({ changes: {} }), /\["changes"\]/],
    // A field it does not know, refused: dropped, each fell back to its default without a
    // word (a price shown in the product's currency, not JPY; a label switched to its page).
    [
      "/price-changes",
      JSON.stringify({ changes: [{ productId: "A", priceMinor: 1500, currency_code: "JPY" }] }),
      /\["changes"\]\[0\]\["currency_code"\]/,
    ],
    [
      "/label-jobs",
      JSON.stringify({
        labels: [{ labelCode: "C0FFEE000009", productId: "A", front_page: false }],
      }),
      /\["labels"\]\[0\]\["front_page"\]/,
    ],
    [
      "/label-jobs",
      JSON.stringify({ job_id: "J1", labels: [{ labelCode: "C0FFEE000009", productId: "A" }] }),
      /\["job_id"\]/,
    ],
    // Checked even though no label shows the product: stored, each value would fail the
    // first label job that binds a label to it.
    [
      "/price-changes",
      JSON.stringify({ changes: [{ productId: "A", priceMinor: 5e9 }] }),
      /\["priceMinor"\]/,
    ],
    [
      "/price-changes",
      JSON.stringify({ changes: [{ productId: "A", priceMinor: 100, currency: "eur" }] }),
      /\["currency"\]/,
    ],
    [
      "/price-changes",
      JSON.stringify({ changes: [{ productId: "A", priceMinor: 100, name: "" }] }),
      /\["name"\]/,
    ],
    // Not a MAC: refused by name before the label table sees it (its index refused a long
    // one with a server error, 500).
    [
      "/label-jobs",
      JSON.stringify({ labels: [{ labelCode: "x".repeat(9000), productId: "A" }] }),
      /labels\[0\]\.labelCode "x{40}…" is not a label MAC/,
    ],
    [
      "/label-jobs",
      JSON.stringify({
        labels: [
          { labelCode: "C0FFEE000009", productId: "A" },
          { labelCode: "C0FFEE00000\u0000", productId: "A" },
        ],
      }),
      /labels\[1\]\.labelCode/,
    ],
    // Text Postgres cannot hold (NUL, a 500 before) or would change (an unpaired surrogate).
    [
      "/label-jobs",
      JSON.stringify({ labels: [{ labelCode: "C0FFEE000009", productId: "A\u0000" }] }),
      /printable[\s\S]*\["labels"\]\[0\]\["productId"\]/,
    ],
    [
      "/price-changes",
      JSON.stringify({ jobId: "j\u0000", changes: [{ productId: "A", priceMinor: 100 }] }),
      /\["jobId"\]/,
    ],
    [
      "/price-changes",
      `{"changes":[{"productId":"A","priceMinor":100,"name":"Pears \\ud800"}]}`,
      /printable[\s\S]*\["name"\]/,
    ],
    // Empty: it would use up the job id that the client's real job then sends again.
    ["/label-jobs", JSON.stringify({ jobId: "empty", labels: [] }), /empty[\s\S]*\["labels"\]/],
    ["/price-changes", JSON.stringify({ changes: [] }), /empty[\s\S]*\["changes"\]/],
  ]
  const jobCount = async () =>
    Number((await sql<{ n: string }>`select count(*) as n from esl.job`.execute(t.db)).rows[0]!.n)
  const jobsBefore = await jobCount()
  for (const [path, body, field] of cases) {
    const res = await post(path, body)
    assert.equal(res.status, 400, `${path} ${body.slice(0, 200)}`)
    assert.match(await errorOf(res), field, `${path} ${body.slice(0, 200)}`)
  }
  const product = await t.db
    .selectFrom("esl.product")
    .select(["price_minor", "currency", "name"])
    .where("id", "=", "A")
    .executeTakeFirstOrThrow()
  assert.deepEqual(product, { price_minor: 199, currency: "EUR", name: "Apples 1 kg" })
  const labels = await sql`select 1 from esl.label where label_code = 'C0FFEE000009'`.execute(t.db)
  assert.equal(labels.rows.length, 0, "no label of the refused requests")
  assert.equal(await jobCount(), jobsBefore, "no job of the refused requests")

  const job = JSON.stringify({
    jobId: "again",
    labels: [{ labelCode: "C0FFEE000002", productId: "A" }],
  })
  assert.equal((await post("/label-jobs", job)).status, 201)
  const repeated = await post("/label-jobs", job)
  assert.equal(repeated.status, 409)
  assert.match(await errorOf(repeated), /job again was already written/)
  const tasks = await t.db
    .selectFrom("esl.job_label")
    .select("label_code")
    .where("job_id", "=", "again")
    .execute()
  assert.equal(tasks.length, 1, "the job's task once")
})

/** Starts a writer of its own (the shared one serves the other tests) and waits for it. */
async function startWriter(databaseUrl: string): Promise<{ child: TsChild; port: number }> {
  const child = spawnTs(main, { DATABASE_URL: databaseUrl, PORT: "0" })
  await waitFor(() => child.json().some((l) => l.started === "esl-writer"), {
    timeoutMs: 30_000,
    message: () => `the writer started; it printed ${child.lines.join("\n")}`,
  })
  return { child, port: child.json().find((l) => l.started)!.port }
}

const refusesConnections = (port: number) =>
  new Promise<boolean>((resolve) => {
    const socket = connect(port, "127.0.0.1")
    socket.once("connect", () => {
      socket.destroy()
      resolve(false)
    })
    socket.once("error", () => resolve(true))
  })

test("SIGTERM lets a request in hand finish: its job commits, its client gets 201, exit 0", async () => {
  const { child, port } = await startWriter(t.url)
  const body = JSON.stringify({
    jobId: "in-hand",
    labels: [{ labelCode: "C0FFEE0000AA", productId: "A" }],
  })
  const answer = new Promise<{ status: number; connection?: string; body: string }>(
    (resolve, reject) => {
      // With `Expect: 100-continue` the server answers 100 once it has the request's headers
      // and has handed the request to the writer's handler: from then on the request is in
      // hand, and the signal goes then. A fresh connection (agent: false) of its own.
      const req = request(
        {
          port,
          method: "POST",
          path: "/label-jobs",
          agent: false,
          headers: {
            "content-type": "application/json",
            expect: "100-continue",
            // What a pooling client asks for; the answer must refuse it.
            connection: "keep-alive",
          },
        },
        (res) => {
          let text = ""
          res.on("data", (c) => {
            text += c
          })
          res.on("end", () =>
            resolve({ status: res.statusCode!, connection: res.headers.connection, body: text }),
          )
        },
      )
      req.on("error", reject)
      req.on("continue", () => {
        req.write(body.slice(0, 20))
        void (async () => {
          child.kill("SIGTERM")
          // The writer has taken the signal once it stops accepting connections.
          await waitFor(() => refusesConnections(port), {
            timeoutMs: 20_000,
            message: () => "the writer stopped accepting connections",
          })
          req.end(body.slice(20))
        })().catch(reject)
      })
      req.flushHeaders()
    },
  )
  const { status, connection, body: text } = await answer
  assert.equal(status, 201, text)
  // Answered while stopping: the connection ends with it, no further requests over it.
  assert.equal(connection, "close")
  assert.equal((await child.exited()).code, 0)
  const jobs = await t.db
    .selectFrom("keyway.outbox")
    .select("key")
    .where("key", "=", "C0FFEE0000AA")
    .execute()
  assert.equal(jobs.length, 1)
})

test("a writer started while Postgres is unreachable waits for it, then serves", async () => {
  await using proxy = await createTcpProxy({ host: "127.0.0.1", port: Number(new URL(t.url).port) })
  proxy.cut()
  const url = new URL(t.url)
  url.host = `${proxy.host}:${proxy.port}`
  const child = spawnTs(main, { DATABASE_URL: url.toString(), PORT: "0" })
  try {
    await waitFor(
      () => child.json().filter((l) => l.message === "waiting for Postgres").length >= 2,
      {
        timeoutMs: 30_000,
        message: () => `two waits logged; it printed ${child.lines.join("\n")}`,
      },
    )
    assert.equal(child.exitCode, null, "still running while Postgres is away")
    proxy.restore()
    await waitFor(() => child.json().some((l) => l.started === "esl-writer"), {
      timeoutMs: 30_000,
      message: () => `the writer started; it printed ${child.lines.join("\n")}`,
    })
    const port = child.json().find((l) => l.started)!.port
    const res = await fetch(`http://127.0.0.1:${port}/label-jobs`, {
      method: "POST",
      body: JSON.stringify({ labels: [{ labelCode: "C0FFEE0000BB", productId: "A" }] }),
    })
    assert.equal(res.status, 201)
  } finally {
    child.kill("SIGTERM")
  }
  assert.equal((await child.exited()).code, 0)
})

test("a request's traceparent is carried on: the job, its outbox rows and the labels join the caller's trace", async () => {
  await using receiver = await startOtlpReceiver()
  const callerTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
  const callerSpan = "00f067aa0ba902b7"
  const traced = spawnTs(main, {
    DATABASE_URL: t.url,
    PORT: "0",
    OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
  })
  try {
    await waitFor(() => traced.json().some((l) => l.started === "esl-writer"), {
      timeoutMs: 20_000,
      message: "the traced writer started",
    })
    const res = await fetch(
      `http://127.0.0.1:${traced.json().find((l) => l.started)!.port}/label-jobs`,
      {
        method: "POST",
        headers: {
          "content-type": "application/json",
          traceparent: `00-${callerTrace}-${callerSpan}-01`,
        },
        body: JSON.stringify({
          jobId: "traced",
          labels: [{ labelCode: "C0FFEE0000BB", productId: "A" }],
        }),
      },
    )
    assert.equal(res.status, 201)
    const row = await sql<{ trace: { traceparent: string } }>`
      select trace from keyway.outbox where payload->>'jobId' = 'traced'`.execute(t.db)
    assert.equal(row.rows[0]!.trace.traceparent.split("-")[1], callerTrace, "the outbox row")
    // Spans are exported at the latest when the process stops (below).
  } finally {
    // On a failed assertion too: not left running until the file ends.
    traced.kill("SIGTERM")
    await traced.exited()
  }
  const server = receiver.spans().find((x) => x.name === "POST /label-jobs")
  assert.ok(server, "the request's span was exported")
  assert.equal(server.kind, 2, "a SERVER span")
  assert.equal(server.traceId, callerTrace)
  assert.equal(server.parentSpanId, callerSpan)
  assert.equal(server.attributes["http.response.status_code"], 201)
  const job = receiver.spans().find((x) => x.name === "esl label job")
  assert.equal(job?.parentSpanId, server.spanId, "the job is the request's child")
})
