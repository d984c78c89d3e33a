// `just replay` against the machine's NATS, run as a developer runs it.
import assert from "node:assert/strict"
import { spawn } from "node:child_process"
import { readFile } from "node:fs/promises"
import { after, before, test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { fileURLToPath } from "node:url"
import { connectNats } from "@keyway/nats"
import { encodeEnvelope } from "@keyway/schemas"
import { createTestStream, startNatsServer, waitFor } from "@keyway/testkit"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import { headers, type NatsConnection } from "@nats-io/transport-node"

const cli = fileURLToPath(new URL("../src/main.ts", import.meta.url))
const natsUrl = process.env.NATS_URL ?? "nats://127.0.0.1:4222"
let nc: NatsConnection
let stream: Awaited<ReturnType<typeof createTestStream>>

// Every read this file starts: one a failed test left running (--follow reads for ever)
// would outlive the file and keep it from exiting.
const children: ReturnType<typeof spawn>[] = []

function start(args: string[], url = natsUrl) {
  const child = spawn(process.execPath, ["--import", "tsx", cli, ...args], {
    cwd: fileURLToPath(new URL("../../..", import.meta.url)),
    env: { ...process.env, NATS_URL: url },
  })
  children.push(child)
  const result = { out: "", err: "" }
  child.stdout.on("data", (d) => (result.out += d))
  child.stderr.on("data", (d) => (result.err += d))
  const exited = new Promise<number | null>((resolve) => child.on("exit", resolve))
  const lines = () =>
    result.out
      .split("\n")
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Record<string, any>)
  return { child, result, exited, lines }
}

/** The names of the test stream's consumers: a read's own is deleted when it ends. */
async function consumers() {
  const names: string[] = []
  for await (const c of (await jetstreamManager(nc)).consumers.list(stream.name)) names.push(c.name)
  return names
}

async function run(args: string[]) {
  const r = start(args)
  const code = await r.exited
  return { code, err: r.result.err, lines: r.lines() }
}

async function publish(key: string, ver: number, trace?: string, header = "traceparent") {
  const h = headers()
  if (trace) h.set(header, trace)
  await jetstream(nc).publish(
    `${stream.site}.demo.item`,
    encodeEnvelope({
      id: `${stream.site}:${key}${ver}`,
      site: stream.site,
      seq: ver,
      topic: "demo.item",
      key,
      ver,
      type: "demo.item.changed.v1",
      payload: { n: ver },
      createdAt: new Date().toISOString(),
    }),
    { headers: h },
  )
}

const TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

before(async () => {
  nc = await connectNats({ servers: natsUrl })
  stream = await createTestStream(nc)
  await publish("a", 1, TRACE) // seq 1
  // Header names match whatever their case, as HTTP's do.
  await publish("b", 1, TRACE, "Traceparent") // 2
  await publish("a", 2) // 3
  await jetstream(nc).publish(`${stream.site}.demo.item`, "this is not json") // 4
  await publish("a", 3) // 5
  await jetstream(nc).publish(`${stream.site}.other`, "elsewhere") // 6
})
after(async () => {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL")
  await stream.delete()
  await nc.close()
})

test("prints every message in stream order, events decoded, the rest with the reason", async () => {
  const { code, err, lines } = await run(["--stream", stream.name])
  assert.equal(code, 0, err)
  assert.deepEqual(
    lines.map((l) => l.streamSeq),
    [1, 2, 3, 4, 5, 6],
  )
  assert.deepEqual(
    { ...lines[0], time: "t", createdAt: "c" },
    {
      streamSeq: 1,
      time: "t",
      subject: `${stream.site}.demo.item`,
      id: `${stream.site}:a1`,
      site: stream.site,
      topic: "demo.item",
      key: "a",
      ver: 1,
      type: "demo.item.changed.v1",
      createdAt: "c",
      traceparent: TRACE,
      payload: { n: 1 },
    },
  )
  assert.equal((lines[1] as { traceparent?: string }).traceparent, TRACE)
  assert.equal(lines[3]!.data, "this is not json")
  assert.match(lines[3]!.error, /JSON/)
  assert.match(err, new RegExp(`${stream.name} holds 6 messages, seq 1\\.\\.6`))
  assert.match(err, /6 printed/)
})

test("selects by key, by subject, by sequence range, by time and by count", async () => {
  const pick = async (args: string[]) => {
    const r = await run(["--stream", stream.name, ...args])
    assert.equal(r.code, 0, r.err)
    return r.lines.map((l) => l.streamSeq)
  }
  assert.deepEqual(await pick(["--key", "a"]), [1, 3, 5])
  assert.deepEqual(await pick(["--subject", `${stream.site}.other`]), [6])
  assert.deepEqual(await pick(["--subject", `${stream.site}.demo.item`, "--key", "b"]), [2])
  assert.deepEqual(await pick(["--from-seq", "3", "--to-seq", "4"]), [3, 4])
  assert.deepEqual(await pick(["--from-seq", "5"]), [5, 6])
  assert.deepEqual(await pick(["--limit", "2"]), [1, 2])
  assert.deepEqual(await pick(["--since", "1h"]), [1, 2, 3, 4, 5, 6])
  // Before 1970 is before every message (the server misreads such times, or refuses them).
  assert.deepEqual(await pick(["--since", "999999d"]), [1, 2, 3, 4, 5, 6])
  assert.deepEqual(await pick(["--since", "1500-01-01T00:00:00Z"]), [1, 2, 3, 4, 5, 6])
  const after6 = new Date(Date.now() + 1000)
  await new Promise((r) => setTimeout(r, 1100))
  assert.deepEqual(await pick(["--since", after6.toISOString()]), [])
  // No consumer is left behind: each read deleted its own, and made no durable.
  const left: string[] = []
  for await (const c of (await jetstreamManager(nc)).consumers.list(stream.name)) {
    left.push(c.name)
  }
  assert.deepEqual(left, [])
})

test("--follow prints what arrives after it started, until interrupted", async () => {
  const r = start(["--stream", stream.name, "--from-seq", "6", "--follow"])
  await waitFor(async () => r.lines().length === 1, { timeoutMs: 10_000, message: "seq 6" })
  await publish("c", 1)
  await waitFor(async () => r.lines().length === 2, { timeoutMs: 10_000, message: "seq 7" })
  assert.deepEqual(
    r.lines().map((l) => [l.streamSeq, l.key]),
    [
      [6, undefined],
      [7, "c"],
    ],
  )
  r.child.kill("SIGINT")
  assert.equal(await r.exited, 0)
})

test("SIGTERM ends a --follow read like Ctrl-C: exit 0, its consumer deleted", async () => {
  const r = start(["--stream", stream.name, "--follow"])
  await waitFor(async () => r.lines().length >= 6, { timeoutMs: 10_000, message: "the backlog" })
  r.child.kill("SIGTERM")
  assert.equal(await r.exited, 0, r.result.err)
  assert.deepEqual(await consumers(), [])
})

test("a paused reader the server drops misses nothing (with --since): every message once, in order", async () => {
  // A reader paused longer than the server's write deadline (`| less`, left alone) is dropped
  // as a slow consumer; nats.js reconnects and replaces its ordered consumer.
  await using server = await startNatsServer({ config: 'write_deadline: "1s"' })
  const privateNc = await connectNats({ servers: server.url })
  try {
    const name = `SLOW${Date.now()}`
    await (await jetstreamManager(privateNc)).streams.add({ name, subjects: ["slow.>"] })
    const js = jetstream(privateNc)
    const big = "x".repeat(60_000)
    let published = 0
    // In parallel: the messages must reach the server while the paused reader's pull is
    // still open (a second), even on a busy machine.
    const publishSome = (n: number) =>
      Promise.all(
        Array.from({ length: n }, () => {
          published++
          return js.publish("slow.a", JSON.stringify({ n: published, big }))
        }),
      )
    const dropped = async () => /slow consumer/i.test(await readFile(server.logPath, "utf8"))
    await publishSome(5)
    const r = start(["--stream", name, "--since", "1h", "--follow"], server.url)
    await waitFor(async () => r.lines().length === 5, { timeoutMs: 10_000, message: "the first 5" })
    // Paused while messages pour in, until the server has dropped the reader at least once.
    for (let pause = 1; pause <= 4 && !(await dropped()); pause++) {
      r.child.kill("SIGSTOP")
      await publishSome(100)
      await sleep(3000)
      r.child.kill("SIGCONT")
      await waitFor(async () => r.lines().length >= published || (await dropped()), {
        timeoutMs: 10_000,
        message: "caught up, or dropped",
      })
    }
    await waitFor(async () => r.lines().length >= published, {
      timeoutMs: 30_000,
      message: () => `${published} printed (${r.lines().length} so far; stderr: ${r.result.err})`,
    })
    r.child.kill("SIGINT")
    assert.equal(await r.exited, 0, r.result.err)
    assert.deepEqual(
      r.lines().map((l) => l.streamSeq),
      Array.from({ length: published }, (_, i) => i + 1),
    )
    assert.ok(await dropped(), "the server did drop the reader")
  } finally {
    await privateNc.close()
  }
})

test("bad input gets a clear error: exit 2 for arguments, 1 for a stream that is not there", async () => {
  const cases: [string[], RegExp][] = [
    [[], /--stream is required/],
    [["--stream", stream.name, "--from-seq", "0x10"], /--from-seq must be a positive integer/],
    [["--stream", stream.name, "--since", "yesterday"], /--since must be a span/],
    [["--stream", stream.name, "--since", "2026-12-06T10:00:00"], /--since must be a span/],
    [["--stream", stream.name, "--since", "2999-01-01T00:00:00Z"], /is in the future/],
    // Dates that do not exist, which Date would roll over to the next month or day.
    [["--stream", stream.name, "--since", "2026-02-30T10:00:00Z"], /--since must be a span/],
    [["--stream", stream.name, "--since", "2026-04-31T10:00Z"], /--since must be a span/],
    [["--stream", stream.name, "--since", "2026-05-01T24:00:00Z"], /--since must be a span/],
    [["--stream", stream.name, "--key", "a", "--key", "b"], /--key is given twice/],
    [["--stream", stream.name, "--from-seq", "5", "--to-seq", "2"], /is above --to-seq/],
    [["--stream", stream.name, "--from-seq", "1", "--since", "1h"], /not both/],
    [["--stream", stream.name, "--follow", "--to-seq", "3"], /takes no --to-seq/],
    [["--stream", stream.name, "--site", "moon"], /--site must be one of cloud, factory/],
    [["--stream", stream.name, "--frm-seq", "1"], /Unknown option '--frm-seq'/],
  ]
  for (const [args, message] of cases) {
    const r = await run(args)
    assert.equal(r.code, 2, args.join(" "))
    assert.match(r.err, message, args.join(" "))
    assert.deepEqual(r.lines, [])
  }
  // A password in the URL is refused (nats.js would drop it), and not repeated.
  const inUrl = start(["--stream", stream.name], "nats://u:secret@127.0.0.1:1")
  assert.equal(await inUrl.exited, 2)
  assert.match(inUrl.result.err, /carries a user or password.*NATS_USER and NATS_PASS/)
  assert.doesNotMatch(inUrl.result.err, /secret/)
  const missing = await run(["--stream", `${stream.name}X`])
  assert.equal(missing.code, 1)
  assert.match(
    missing.err,
    new RegExp(`no stream "${stream.name}X" on this server \\(its streams: .*${stream.name}`),
  )
})

test("a reader that stops early (`| head`) ends the read quietly, and its consumer with it", async () => {
  const r = start(["--stream", stream.name, "--follow"])
  await waitFor(async () => r.lines().length >= 6, { timeoutMs: 10_000, message: "the backlog" })
  assert.equal((await consumers()).length, 1, "the read's consumer")
  // The reader goes; the next line written finds the pipe closed (EPIPE).
  r.child.stdout.destroy()
  await publish("d", 1)
  assert.equal(await r.exited, 0, r.result.err)
  assert.deepEqual(await consumers(), [], "the consumer deleted, not left for the server to expire")
})
