// The worker process started before what it needs: it waits, logging why, rather than exit
// and leave its return to a supervisor that gives up after a few restarts.
import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import { readdir } from "node:fs/promises"
import { after, before, test } from "node:test"
import { fileURLToPath } from "node:url"
import { migrationsDir } from "@keyway/db"
import { connectNats } from "@keyway/nats"
import {
  createTcpProxy,
  createTestDatabase,
  spawnTs,
  type TestDatabase,
  waitFor,
} from "@keyway/testkit"
import { jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { sql } from "kysely"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))
const NATS_URL = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
const REDIS_URL = process.env.KEYWAY_TEST_REDIS_URL ?? "redis://127.0.0.1:6379"
let t: TestDatabase
let nc: NatsConnection

before(async () => {
  t = await createTestDatabase()
  nc = await connectNats({ servers: NATS_URL })
})
after(async () => {
  await nc?.close()
  await t?.drop()
})

/** A worker of `group` on `stream` (subjects `<stream in lower case>.>`), on the shared NATS. */
const startWorker = (stream: string, group: string, databaseUrl: string) =>
  spawnTs(main, {
    KEYWAY_SITE: "cloud",
    KEYWAY_STREAM: stream,
    KEYWAY_GROUP: group,
    KEYWAY_FILTER_SUBJECT: `${stream.toLowerCase()}.>`,
    DATABASE_URL: databaseUrl,
    NATS_URL,
    REDIS_URL,
  })

const waits = (lines: Record<string, any>[], what: string) =>
  lines.filter((l) => l.level === "warn" && l.message === `waiting for ${what}`).length

test("a worker waits for Postgres, Redis, NATS, then its stream, then starts; SIGTERM exits 0", async () => {
  const natsUrl = new URL(NATS_URL)
  const redisUrl = new URL(REDIS_URL)
  // Its key locks: a worker started without Redis ingested and ran nothing, looking healthy.
  await using redisProxy = await createTcpProxy({
    host: redisUrl.hostname,
    port: Number(redisUrl.port || 6379),
  })
  await using pgProxy = await createTcpProxy({
    host: "127.0.0.1",
    port: Number(new URL(t.url).port),
  })
  await using natsProxy = await createTcpProxy({
    host: natsUrl.hostname,
    port: Number(natsUrl.port),
  })
  pgProxy.cut()
  redisProxy.cut()
  natsProxy.cut()
  const url = new URL(t.url)
  url.host = `${pgProxy.host}:${pgProxy.port}`
  const stream = `T${randomBytes(4).toString("hex").toUpperCase()}`
  const group = `g${randomBytes(4).toString("hex")}`
  const jsm = await jetstreamManager(nc)
  const worker = spawnTs(main, {
    KEYWAY_SITE: "cloud",
    KEYWAY_STREAM: stream,
    KEYWAY_GROUP: group,
    KEYWAY_FILTER_SUBJECT: `${stream.toLowerCase()}.>`,
    DATABASE_URL: url.toString(),
    NATS_URL: `nats://127.0.0.1:${natsProxy.port}`,
    REDIS_URL: `redis://127.0.0.1:${redisProxy.port}`,
  })
  const printed = () => `it printed ${worker.lines.join("\n")}`
  try {
    await waitFor(() => waits(worker.json(), "Postgres") >= 2, {
      timeoutMs: 30_000,
      message: () => `two waits for Postgres; ${printed()}`,
    })
    assert.equal(worker.exitCode, null, "still running while Postgres is away")
    // One after the other, in that order: not yet a word of the others.
    assert.deepEqual([waits(worker.json(), "Redis"), waits(worker.json(), "NATS")], [0, 0])
    pgProxy.restore()
    await waitFor(() => waits(worker.json(), "Redis") >= 2, {
      timeoutMs: 30_000,
      message: () => `two waits for Redis; ${printed()}`,
    })
    assert.ok(!worker.json().some((l) => l.message === "worker started"), printed())
    assert.equal(worker.exitCode, null, "still running while Redis is away")
    assert.equal(waits(worker.json(), "NATS"), 0)
    redisProxy.restore()
    await waitFor(() => waits(worker.json(), "NATS") >= 2, {
      timeoutMs: 30_000,
      message: () => `two waits for NATS; ${printed()}`,
    })
    assert.equal(worker.exitCode, null, "still running while NATS is away")
    natsProxy.restore()
    await waitFor(() => waits(worker.json(), `stream ${stream} on NATS`) >= 2, {
      timeoutMs: 30_000,
      message: () => `two waits for the stream; ${printed()}`,
    })
    assert.equal(worker.exitCode, null, "still running while its stream is missing")
    await jsm.streams.add({ name: stream, subjects: [`${stream.toLowerCase()}.>`] })
    await waitFor(() => worker.json().some((l) => l.message === "worker started"), {
      timeoutMs: 30_000,
      message: () => `the worker started; ${printed()}`,
    })
    // Started means its group's durable consumer exists on the stream that came late.
    assert.equal((await jsm.consumers.info(stream, group)).name, group)
  } finally {
    worker.kill("SIGTERM")
    await worker.exited()
    await jsm.streams.delete(stream).catch(() => {})
  }
  assert.equal(worker.exitCode, 0, printed())
  assert.ok(worker.json().some((l) => l.message === "worker stopped"))
})

test("SIGTERM while a worker waits to start ends it at once with exit 0", async () => {
  const stream = `T${randomBytes(4).toString("hex").toUpperCase()}`
  const worker = spawnTs(main, {
    KEYWAY_SITE: "cloud",
    KEYWAY_STREAM: stream,
    KEYWAY_GROUP: "g",
    KEYWAY_FILTER_SUBJECT: `${stream.toLowerCase()}.>`,
    DATABASE_URL: t.url,
    NATS_URL,
    REDIS_URL,
  })
  await waitFor(() => waits(worker.json(), `stream ${stream} on NATS`) >= 1, {
    timeoutMs: 30_000,
    message: () => `a wait for the stream; it printed ${worker.lines.join("\n")}`,
  })
  worker.kill("SIGTERM")
  assert.equal((await worker.exited()).code, 0)
  assert.ok(worker.json().some((l) => l.message === "worker stopped while starting"))
})

test("a worker on a database that lacks a migration waits, naming it, and starts once it is applied", async () => {
  await using db = await createTestDatabase()
  const newest = (await readdir(migrationsDir))
    .filter((f) => f.endsWith(".sql"))
    .sort()
    .at(-1)!
  const name = newest.replace(/\.sql$/, "")
  // As if the code were deployed before `just migrate`: the bookkeeping says not applied.
  const applied = await sql<{ timestamp: string }>`
    delete from public.kysely_migration where name = ${name} returning timestamp`.execute(db.db)
  const stream = `T${randomBytes(4).toString("hex").toUpperCase()}`
  const group = `g${randomBytes(4).toString("hex")}`
  const jsm = await jetstreamManager(nc)
  await jsm.streams.add({ name: stream, subjects: [`${stream.toLowerCase()}.>`] })
  const worker = startWorker(stream, group, db.url)
  const printed = () => `it printed ${worker.lines.join("\n")}`
  const schemaWaits = () =>
    worker
      .json()
      .filter(
        (l) =>
          l.message === "waiting for Postgres" &&
          String(l.error).includes(name) &&
          String(l.error).includes("just migrate"),
      ).length
  try {
    await waitFor(() => schemaWaits() >= 2, {
      timeoutMs: 30_000,
      message: () => `two waits naming ${name}; ${printed()}`,
    })
    assert.equal(worker.exitCode, null, "still running while the schema is behind")
    assert.ok(!worker.json().some((l) => l.message === "worker started"))
    await sql`insert into public.kysely_migration (name, timestamp)
              values (${name}, ${applied.rows[0]!.timestamp})`.execute(db.db)
    await waitFor(() => worker.json().some((l) => l.message === "worker started"), {
      timeoutMs: 30_000,
      message: () => `the worker started; ${printed()}`,
    })
  } finally {
    worker.kill("SIGTERM")
    await worker.exited()
    await jsm.streams.delete(stream).catch(() => {})
  }
  assert.equal(worker.exitCode, 0, printed())
})

test("SIGTERM while Postgres does not answer: the worker exits 1 after its stop's bound, saying why", {
  // Unbounded, the stop waited for Postgres: more than 40 s, for as long as it is stalled.
  timeout: 60_000,
}, async () => {
  await using pgProxy = await createTcpProxy({
    host: "127.0.0.1",
    port: Number(new URL(t.url).port),
  })
  const url = new URL(t.url)
  url.host = `${pgProxy.host}:${pgProxy.port}`
  const stream = `T${randomBytes(4).toString("hex").toUpperCase()}`
  const group = `g${randomBytes(4).toString("hex")}`
  const jsm = await jetstreamManager(nc)
  await jsm.streams.add({ name: stream, subjects: [`${stream.toLowerCase()}.>`] })
  const worker = startWorker(stream, group, url.toString())
  const printed = () => `it printed ${worker.lines.join("\n")}`
  try {
    await waitFor(() => worker.json().some((l) => l.message === "worker started"), {
      timeoutMs: 30_000,
      message: () => `the worker started; ${printed()}`,
    })
    // Its polling and recovery loops send statements that get no answer. Stopped once one is
    // in the stall: after a fixed 2 s, a round that had ended just before the stall had not
    // yet sent its next statement, and the worker stopped cleanly (one CI run).
    pgProxy.stall()
    const sent = pgProxy.bytesToTarget
    await waitFor(() => pgProxy.bytesToTarget > sent, {
      timeoutMs: 20_000,
      message: () => `a statement sent into the stall; ${printed()}`,
    })
    worker.kill("SIGTERM")
    assert.equal((await worker.exited()).code, 1, printed())
    assert.ok(
      worker
        .json()
        .some((l) => l.level === "error" && /^worker did not stop within \d+ ms/.test(l.message)),
      printed(),
    )
  } finally {
    pgProxy.resume()
    worker.kill("SIGKILL")
    await jsm.streams.delete(stream).catch(() => {})
  }
})
