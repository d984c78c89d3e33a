// The pipeline benchmark (issue 3): writers → outbox → relay → JetStream → keyed consumer →
// handler, next to graphile-worker with queue_name = key doing the same work from the same
// writer pattern, on the same Postgres.
import { availableParallelism } from "node:os"
import { fileURLToPath } from "node:url"
import { connectNats } from "@keyway/nats"
import { enqueue } from "@keyway/outbox"
import { createTestDatabase, createTestStream, spawnTs, type TsChild } from "@keyway/testkit"
import { jetstreamManager } from "@nats-io/jetstream"
import { runMigrations } from "graphile-worker"
import { type Kysely, sql } from "kysely"
import { Cleanups, hasExited, stopChild } from "./cleanups.ts"
import { startRelayProcess } from "./relay-process.ts"
import {
  benchKnob,
  bucketPercentile,
  CpuByLabel,
  type HistogramSeries,
  histogramDelta,
  histogramTotal,
  offeredNote,
  percentile,
  pidsNamed,
  printTable,
  processName,
  readHistogram,
  round,
  wallClock,
  workerProcessCount,
} from "./stats.ts"

const KEYS = 1000
const WRITERS = 8
// The spec's throughput figure is over 20,000 events at least. Fewer are accepted, for a quick
// run while working, and the table says so, so that such a run is not taken for the figure.
const SPEC_EVENTS = 20_000
const EVENTS = benchKnob("BENCH_EVENTS", SPEC_EVENTS)
const LATENCY_RATE = benchKnob("BENCH_RATE", 1000)
const LATENCY_MS = benchKnob("BENCH_LATENCY_MS", 10_000)
// Worker processes per side (BENCH_WORKERS), the same for both. One, on two cores shared with
// the writers, the relay and the servers: back to back, Keyway alone made 1,564 / 1,360
// events/s with one process against 1,126 / 1,179 with two (p99 at 1,000/s 89 / 60 ms against
// 212 / 88), and graphile-worker 407 against 267: a second process of the same group only
// splits the batches that make each round trip serve many keys, and adds a scheduler to the
// same two cores.
const WORKER_PROCESSES = benchKnob("BENCH_WORKERS", 1)
const workerProcesses = workerProcessCount(WORKER_PROCESSES)
// Keys each Keyway worker process drains at once (BENCH_CONCURRENCY; graphile-worker's
// settings are its own best, GRAPHILE below). 256
// rather than the consumer's default of 64: at 1,000 events/s a drain holds its slot for 30-50
// ms on this machine, mostly waiting on batched round trips, so 64 slots cap the drain rate
// near the load and a slow spell queues keys for slots (consumer_drain_step_seconds, step
// "wait": mean 1-137 ms with 64, 0 with 256). Interleaved keyway-only runs, 64 / 128 / 256:
// p99 607 / 215 / 103, 279 / 271 / 90, 118 / 98 / 140 ms; events/s 1,098 / 1,168 / 1,249,
// 1,391 / 1,249 / 1,167, 1,446 / 1,643 / 1,510.
const CONCURRENCY = process.env.BENCH_CONCURRENCY ?? "256"
// graphile-worker at its best measured settings, not Keyway's: 16 jobs at once on a pool of
// 20, with its batched completion (completeJobBatchDelay 1 ms). A sweep (BENCH_ONLY=graphile,
// one run each; events/s, then p50 / p99 ms at 1,000 events/s): 256 jobs on 10 connections,
// the settings until session 22: 258, 1,512 / 2,691. 16 on 20: 280, 57 / 268. 32 on 40,
// polling every 100 ms: 247, 1,028 / 2,134. 256 on 10 with batching: 297, 2,606 / 4,915. 16
// on 20 with batching: 336, 35 / 116. With 256 jobs on 10 connections most jobs waited for a
// client: that was the seconds of latency. BENCH_GRAPHILE_* override each.
const GRAPHILE = {
  GRAPHILE_CONCURRENCY: process.env.BENCH_GRAPHILE_CONCURRENCY ?? "16",
  GRAPHILE_POOL: process.env.BENCH_GRAPHILE_POOL ?? "20",
  GRAPHILE_POLL_MS: process.env.BENCH_GRAPHILE_POLL_MS ?? "1000",
  GRAPHILE_BATCH_MS: process.env.BENCH_GRAPHILE_BATCH_MS ?? "1",
}
// While working on one side, `BENCH_ONLY=keyway` or `graphile` skips the other (and the ratio).
const ONLY = process.env.BENCH_ONLY
const workerEntry = fileURLToPath(new URL("./pipeline-worker.ts", import.meta.url))
// Compared with the workers' handled_at, stamped by the same clock in their processes.
const now = wallClock()
const randomKey = () => `k${Math.floor(Math.random() * KEYS)}`
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

type Write = (key: string, n: number) => Promise<string>
/** One transaction of the throughput run: a domain row and an event (or job) per key. */
type WriteBatch = (keys: string[], n: number) => Promise<void>

// Events per writer transaction in the throughput run (BENCH_PER_TX), the same for both
// sides. One is the default and the JSON line's figure; the ESL flow's jobs write one task
// per affected label in a transaction, which is the case that a larger value measures.
const PER_TX = benchKnob("BENCH_PER_TX", 1)

async function effectCount(db: Kysely<any>) {
  return (await sql<{ n: number }>`select count(*)::int as n from effect`.execute(db)).rows[0]!.n
}

/**
 * Waits until `n` effects exist, of `ids` only when given. Only when the wait ends depends on
 * how often it looks (the figures come from the effects' own timestamps), and each look scans
 * the table: every 250 ms rather than 50, which put some 1,200 scans of up to 20,000 rows into
 * graphile-worker's longer tail.
 */
async function waitForEffects(
  db: Kysely<any>,
  n: number,
  timeoutMs: number,
  processes: TsChild[],
  ids?: readonly string[],
) {
  const deadline = Date.now() + timeoutMs
  // graphile-worker's effect commits apart from its job's completion: a job run again after a
  // lost completion writes a second row, which must not stand in for an event not yet
  // handled. Nor may a job of the throughput phase run again during the latency phase: its
  // row is of an event the latency phase did not write, so that phase counts its own ids only.
  const distinct = async () => {
    const r = ids
      ? sql<{ n: number }>`select count(distinct event_id)::int as n from effect
                             where event_id = any(${ids}::text[])`
      : sql<{ n: number }>`select count(distinct event_id)::int as n from effect`
    return (await r.execute(db)).rows[0]!.n
  }
  // A count of rows first, which is cheap: a distinct count sorts the table at every look.
  const handled = async () => (await effectCount(db)) >= n && (await distinct()) >= n
  while (!(await handled())) {
    // The relay among them: without it nothing more is handled, and the wait ran out its time.
    const dead = processes.find(hasExited)
    if (dead) {
      // Its last lines may still be on their way: 'exit' can come before them.
      await dead.exited()
      throw new BenchProcessStoppedError(dead)
    }
    if (Date.now() > deadline) throw new Error(`only ${await distinct()} of ${n} effects`)
    await sleep(250)
  }
}

// Neither side's tables are vacuumed or analysed between phases, although this machine's
// Postgres runs with autovacuum off (conf.d/90-ci.conf) and any other would analyse them as
// they fill. Tried: a VACUUM ANALYZE before each phase, when the tables are empty, gave both
// sides the plans of empty tables for the whole phase: Keyway 437 events/s (its worker's
// Postgres 2.4 ms per event: seq scans of inbox and consumer_key, 7,486 and 866 rows each),
// graphile-worker p50 862 ms at 1,000/s, not keeping up. Unanalysed tables are planned from
// their size as it is, which is nearer what autovacuum would give.

/**
 * A benchmark worker, or the relay, that exited in the middle of a phase, with what it said
 * on its way out.
 */
class BenchProcessStoppedError extends Error {
  override name = "BenchProcessStoppedError"
  /** graphile/worker#636 stopped it: see pipeline-worker.ts. */
  readonly issue636: boolean
  constructor(child: TsChild) {
    const last = child.json().findLast((l) => typeof l.fatal === "string")
    super(
      `a benchmark process stopped (exit ${child.exitCode ?? child.signalCode}): ${last?.fatal ?? (child.lines.slice(-5).join(" | ") || "no reason given")}`,
    )
    this.issue636 = last?.issue636 === true
  }
}

/** Events/s from the first commit to the last handler, over EVENTS events. */
async function commits(db: Kysely<any>) {
  const r = await sql<{ c: number; s: number }>`
    select xact_commit::float8 as c,
           (tup_inserted + tup_updated + tup_deleted + tup_fetched)::float8 as s
      from pg_stat_database where datname = current_database()`.execute(db)
  return r.rows[0]!
}

/** Per-table scan and write counts, for `BENCH_DIAG=1`: where Postgres spends its reads. */
async function tableStats(db: Kysely<any>) {
  const r = await sql<Record<string, number | string>>`
    select schemaname || '.' || relname as t, seq_scan::float8 as seq, seq_tup_read::float8 as seq_rows,
           coalesce(idx_scan, 0)::float8 as idx, coalesce(idx_tup_fetch, 0)::float8 as idx_rows,
           n_tup_ins::float8 as ins, n_tup_upd::float8 as upd, n_tup_hot_upd::float8 as hot,
           n_tup_del::float8 as del
      from pg_stat_user_tables`.execute(db)
  return new Map(r.rows.map((row) => [row.t as string, row]))
}

async function printTableStats(db: Kysely<any>, before: Awaited<ReturnType<typeof tableStats>>) {
  const after = await tableStats(db)
  const rows: (string | number)[][] = [
    ["table", "seq", "seq_rows", "idx", "idx_rows", "ins", "upd", "hot", "del"],
  ]
  for (const [t, a] of after) {
    const b = before.get(t)
    const d = (c: string) => round(((a[c] as number) - ((b?.[c] as number) ?? 0)) / EVENTS, 2)
    if (d("seq") + d("idx") + d("ins") + d("upd") + d("del") === 0) continue
    rows.push([t, ...["seq", "seq_rows", "idx", "idx_rows", "ins", "upd", "hot", "del"].map(d)])
  }
  console.log("per event, by table:")
  printTable(rows)
}

// Each process's Postgres connections carry its name, so that the CPU of the backends serving
// it can be told apart (pg_stat_activity.application_name). It is set in the connection string
// because pg lets the string's application_name override the one a pool or client passes
// (pg/lib/connection-parameters.js), so every connection of the process carries it. The
// writers are this process, on createTestDatabase's pool; the benchmark's own queries go
// through it too (a count every 50 ms, the sampler's every 250 ms), a small part of its rows.
const RELAY_APP = "keyway-bench-relay"
const WORKER_APP = "keyway-bench-worker"
const WRITERS_APP = "keyway-testkit"
const withApplicationName = (url: string, name: string) => {
  const u = new URL(url)
  u.searchParams.set("application_name", name)
  return u.toString()
}

/** Where the CPU goes, in the order the table prints it. */
const CPU_LABELS = [
  "writers: node",
  "writers: postgres",
  "relay: node",
  "relay: postgres",
  "worker: node",
  "worker: postgres",
  "postgres: background",
  "nats-server",
  "redis-server",
] as const

/** Labels the processes of the run for {@link CpuByLabel}. */
function processLabels(db: Kysely<any>, relay: TsChild, workers: TsChild[]) {
  // The processes that live through the run; only Postgres backends come and go.
  const lasting = new Map<number, string>([
    [process.pid, "writers: node"],
    [relay.pid!, "relay: node"],
    ...workers.map((w): [number, string] => [w.pid!, "worker: node"]),
  ])
  for (const name of ["nats-server", "redis-server"] as const) {
    for (const pid of pidsNamed(name)) lasting.set(pid, name)
  }
  return async () => {
    const labels = new Map(lasting)
    const backends = await sql<{ pid: number; app: string; type: string }>`
      select pid, application_name as app, backend_type as type from pg_stat_activity
    `.execute(db)
    for (const b of backends.rows) {
      // Only a Postgres on this machine, in its pid namespace, has its backends' pids in our
      // /proc: one in a container would have unrelated processes counted as its own.
      if (processName(b.pid) !== "postgres") continue
      const owner = { [RELAY_APP]: "relay", [WORKER_APP]: "worker", [WRITERS_APP]: "writers" }[
        b.app
      ]
      // Client backends of other databases (nothing else runs during a benchmark) go with the
      // rest of the machine.
      if (owner) labels.set(b.pid, `${owner}: postgres`)
      else if (b.type !== "client backend") labels.set(b.pid, "postgres: background")
    }
    return labels
  }
}

async function throughput(db: Kysely<any>, write: WriteBatch, relay: TsChild, workers: TsChild[]) {
  const labels = processLabels(db, relay, workers)
  await sql`truncate effect`.execute(db)
  const before = await commits(db)
  const tablesBefore = process.env.BENCH_DIAG ? await tableStats(db) : undefined
  let n = 0
  const cpu = new CpuByLabel(labels)
  await cpu.start()
  const start = now()
  let writtenIn: number
  try {
    await Promise.all(
      Array.from({ length: WRITERS }, async () => {
        while (n < EVENTS) {
          const keys = Array.from({ length: Math.min(PER_TX, EVENTS - n) }, () => randomKey())
          n += keys.length
          await write(keys, n)
        }
      }),
    )
    writtenIn = now() - start
    await waitForEffects(db, EVENTS, 600_000, [relay, ...workers])
  } finally {
    // On failure too: its sampling queries must not outlive the database. The figures are
    // read again below, and a failed sample throws there.
    await cpu.stop().catch(() => {})
  }
  const { byLabel, machineMs } = await cpu.stop()
  const last = (await sql<{ t: number }>`select max(handled_at) as t from effect`.execute(db))
    .rows[0]!.t
  // pg_stat_database lags by up to its stats interval; a pause lets it catch up.
  await sleep(1000)
  const after = await commits(db)
  if (tablesBefore) await printTableStats(db, tablesBefore)
  return {
    perSecond: EVENTS / ((last - start) / 1000),
    writePerSecond: EVENTS / (writtenIn / 1000),
    commitsPerEvent: (after.c - before.c) / EVENTS,
    rowsPerEvent: (after.s - before.s) / EVENTS,
    cpuMsPerEvent: machineMs / EVENTS,
    cpuMsPerEventBy: new Map([...byLabel].map(([label, ms]) => [label, ms / EVENTS])),
  }
}

/**
 * Commit-to-handler latency at a steady LATENCY_RATE, one event per transaction, and the CPU
 * it took: how close to its capacity the machine ran, which is what the tail follows.
 */
async function latency(db: Kysely<any>, write: Write, relay: TsChild, workers: TsChild[]) {
  const labels = processLabels(db, relay, workers)
  await sql`truncate effect`.execute(db)
  const committed = new Map<string, number>()
  const total = Math.round((LATENCY_RATE * LATENCY_MS) / 1000)
  const perWriter = total / WRITERS
  const cpu = new CpuByLabel(labels)
  await cpu.start()
  const start = now()
  try {
    await Promise.all(
      Array.from({ length: WRITERS }, async (_, w) => {
        for (let i = 0; i < perWriter; i++) {
          const due = start + (i * WRITERS * 1000) / LATENCY_RATE + (w * 1000) / LATENCY_RATE
          if (due > now()) await sleep(due - now())
          const id = await write(randomKey(), i)
          committed.set(id, now())
        }
      }),
    )
    // What was written: with BENCH_RATE x BENCH_LATENCY_MS not a multiple of the writers,
    // each wrote its share rounded up, and the slowest of those would drop out of the sample.
    await waitForEffects(db, committed.size, 120_000, [relay, ...workers], [...committed.keys()])
  } finally {
    await cpu.stop().catch(() => {})
  }
  const elapsedMs = now() - start
  const { byLabel, machineMs } = await cpu.stop()
  // An event's first handling is its latency: a graphile-worker job run again after a lost
  // completion leaves a second, later row for the same event.
  const rows = await sql<{ event_id: string; handled_at: number }>`
    select event_id, min(handled_at) as handled_at from effect
     where event_id = any(${[...committed.keys()]}::text[])
     group by event_id
  `.execute(db)
  // One sample per event written, or the figures are not of the phase: an event without its
  // sample would drop out of the tail unseen (the wait counts these ids, so this is a bug).
  if (rows.rows.length !== committed.size) {
    throw new Error(
      `latency phase: ${rows.rows.length} of ${committed.size} events written have an effect`,
    )
  }
  // In commit order: the rows come back in whatever order the table holds them.
  const latencies = rows.rows
    .map((r) => {
      const c = committed.get(r.event_id)!
      return { c, latency: r.handled_at - c }
    })
    .sort((a, b) => a.c - b.c)
    .map((e) => e.latency)
  // The first second warms connections and caches; it is not the steady state.
  const steady = latencies.slice(LATENCY_RATE)
  // What the writers offered: a writer held up by a slow commit starts its next one late. A
  // loop, not Math.max(...): spreading a run's worth of arguments overflows the stack.
  let lastCommit = Number.NEGATIVE_INFINITY
  for (const at of committed.values()) if (at > lastCommit) lastCommit = at
  return {
    events: committed.size,
    offered: committed.size / ((lastCommit - start) / 1000),
    p50: percentile(steady, 50),
    p99: percentile(steady, 99),
    samples: steady.length,
    // Of every core, from the first commit until the last effect exists.
    machineBusy: machineMs / (availableParallelism() * elapsedMs),
    cpuMsPerEvent: machineMs / committed.size,
    cpuMsPerEventBy: new Map([...byLabel].map(([label, ms]) => [label, ms / committed.size])),
    stages: await stages(db, committed),
  }
}

/**
 * Where Keyway's latency goes, per event: commit → relay's PubAck mark → inbox commit →
 * handler. Timestamps are the outbox's published_at and the inbox's received_at (both the
 * start of the transaction that wrote them) and the handler's clock, on one machine.
 */
async function stages(db: Kysely<any>, committed: Map<string, number>) {
  const has = await sql<{
    ok: boolean
  }>`select to_regclass('keyway.inbox') is not null as ok`.execute(db)
  if (!has.rows[0]!.ok) return undefined
  const r = await sql<{ event_id: string; published: number; received: number; handled: number }>`
    select e.event_id,
           extract(epoch from o.published_at) * 1000 as published,
           extract(epoch from i.received_at) * 1000 as received,
           e.handled_at as handled
      from effect e
      join keyway.inbox i on i.event_id = e.event_id
      join keyway.outbox o on o.seq = split_part(e.event_id, ':', 2)::bigint
  `.execute(db)
  if (r.rows.length === 0) return undefined
  const relay: number[] = []
  const ingest: number[] = []
  const drain: number[] = []
  for (const row of r.rows) {
    const c = committed.get(row.event_id)
    if (c === undefined) continue
    relay.push(row.published - c)
    ingest.push(row.received - row.published)
    drain.push(row.handled - row.received)
  }
  const p = (xs: number[]) => `${round(percentile(xs, 50), 1)} / ${round(percentile(xs, 99), 1)}`
  return { relay: p(relay), ingest: p(ingest), drain: p(drain) }
}

// A worker is ready in a few seconds (loading code, connecting); one that is not by then is
// stuck, on a server or a lock, and would have held the benchmark for ever.
const WORKER_START_TIMEOUT_MS = 120_000

async function startWorkers(env: Record<string, string>): Promise<TsChild[]> {
  const children = Array.from({ length: WORKER_PROCESSES }, () => spawnTs(workerEntry, env))
  const deadline = Date.now() + WORKER_START_TIMEOUT_MS
  try {
    for (const c of children) {
      while (!c.json().some((l) => l.ready)) {
        if (hasExited(c)) throw new Error("a benchmark worker died at start")
        if (Date.now() > deadline) {
          throw new Error(
            `a benchmark worker was not ready within ${WORKER_START_TIMEOUT_MS / 1000} s`,
          )
        }
        await sleep(50)
      }
    }
  } catch (err) {
    // The caller gets no handle to stop them with: the ones started go now.
    await stopWorkers(children).catch(() => {})
    throw err
  }
  return children
}

/**
 * Runs `body` with worker processes started from `env`, and stops them however it ends. The
 * phase's failure is the one thrown: a stop that fails after it is only reported.
 */
async function withWorkers<T>(
  env: Record<string, string>,
  body: (workers: TsChild[]) => Promise<T>,
): Promise<T> {
  const workers = await startWorkers(env)
  let result: T
  try {
    result = await body(workers)
  } catch (err) {
    await stopWorkers(workers).catch((stopErr) => console.error(stopErr))
    throw err
  }
  await stopWorkers(workers)
  return result
}

/**
 * The keyed consumers' drain steps so far (consumer_drain_step_seconds), summed over the
 * worker processes: each prints its metrics when sent SIGUSR2 (only keyway workers listen).
 */
async function drainSteps(children: TsChild[]): Promise<Record<string, HistogramSeries>> {
  const printed = (c: TsChild) => c.json().filter((l) => typeof l.metrics === "string")
  const before = children.map((c) => printed(c).length)
  for (const c of children) c.kill("SIGUSR2")
  const deadline = now() + 10_000
  while (children.some((c, i) => printed(c).length === before[i])) {
    if (children.some(hasExited)) throw new Error("a benchmark worker died")
    if (now() > deadline) throw new Error("a benchmark worker did not print its metrics")
    await sleep(20)
  }
  const perWorker = children.map((c) =>
    readHistogram(printed(c).at(-1)!.metrics, "consumer_drain_step_seconds", "step"),
  )
  // A worker lists only the steps it has observed.
  const steps = new Set(perWorker.flatMap((w) => Object.keys(w)))
  return Object.fromEntries(
    [...steps].map((step) => [step, histogramTotal(perWorker.flatMap((w) => w[step] ?? []))]),
  )
}

/** Stops every worker, each within stopChild's deadline, then throws the first failure. */
async function stopWorkers(children: TsChild[]) {
  const stops = await Promise.allSettled(children.map((c) => stopChild(c, "a benchmark worker")))
  const failed = stops.find((s) => s.status === "rejected")
  if (failed) throw failed.reason
}

export async function run() {
  // Each resource is handed to `cleanups` as soon as it exists, released in reverse order
  // however the run ends: the relay, then the stream (over the connection, still open), the
  // connection, the database.
  await using cleanups = new Cleanups()
  const t = await createTestDatabase({ prefix: "keyway_bench", poolSize: WRITERS + 2 })
  cleanups.defer(`database ${t.name}`, () => t.drop())
  const db = t.db
  await sql`create table bench_order (id bigserial primary key, key text not null, n int not null)`.execute(
    db,
  )
  await sql`create table effect (id bigserial primary key, key text not null, ver bigint not null,
                                 event_id text not null, handled_at double precision not null)`.execute(
    db,
  )
  await runMigrations({ connectionString: t.url, logger: undefined })
  const natsUrl = process.env.NATS_URL ?? "nats://127.0.0.1:4222"
  const nc = await connectNats({ servers: natsUrl })
  cleanups.defer("the NATS connection", () => nc.close())
  const jsm = await jetstreamManager(nc)
  // testkit's, so that a run stopped before its cleanup leaves a stream the next sweeps.
  const { site, name: streamName } = await createTestStream(nc)
  // Not swallowed: a stream that outlives the run stays on the shared server.
  cleanups.defer(`stream ${streamName}`, () => jsm.streams.delete(streamName))
  const relay = await startRelayProcess({
    DATABASE_URL: withApplicationName(t.url, RELAY_APP),
    NATS_URL: natsUrl,
    KEYWAY_SITE: site,
  })
  cleanups.defer("the relay", () => stopChild(relay, "the relay"))

  const keywayWrite: Write = async (key, n) => {
    const [e] = await db.transaction().execute(async (trx) => {
      await trx.insertInto("bench_order").values({ key, n }).execute()
      return enqueue(trx, { type: "demo.item.changed.v1", key, payload: { n } })
    })
    return `${site}:${e!.seq}`
  }
  const keywayBatch: WriteBatch = async (keys, n) => {
    await db.transaction().execute(async (trx) => {
      await trx
        .insertInto("bench_order")
        .values(keys.map((key) => ({ key, n })))
        .execute()
      await enqueue(
        trx,
        keys.map((key) => ({ type: "demo.item.changed.v1", key, payload: { n } })),
      )
    })
  }
  let gid = 0
  // add_jobs() for a batch: graphile-worker's own bulk call, one statement like enqueue().
  const graphileBatch: WriteBatch = async (keys, n) => {
    if (keys.length === 1) {
      await graphileWrite(keys[0]!, n)
      return
    }
    await db.transaction().execute(async (trx) => {
      await trx
        .insertInto("bench_order")
        .values(keys.map((key) => ({ key, n })))
        .execute()
      const specs = keys.map((key) => ({ key, payload: JSON.stringify({ key, id: `g:${gid++}` }) }))
      await sql`select graphile_worker.add_jobs(array(
                  select row('item', s.payload::json, s.key, null, null, null, null, null)::graphile_worker.job_spec
                    from json_to_recordset(${JSON.stringify(specs)}::json) as s(key text, payload text)))`.execute(
        trx,
      )
    })
  }
  const graphileWrite: Write = async (key, n) => {
    const id = `g:${gid++}`
    await db.transaction().execute(async (trx) => {
      await trx.insertInto("bench_order").values({ key, n }).execute()
      await sql`select graphile_worker.add_job('item', ${JSON.stringify({ key, id })}::json,
                                                queue_name => ${key})`.execute(trx)
    })
    return id
  }

  const env = {
    DATABASE_URL: withApplicationName(t.url, WORKER_APP),
    NATS_URL: natsUrl,
    REDIS_URL: process.env.REDIS_URL ?? "redis://127.0.0.1:6379",
    STREAM: streamName,
    GROUP: `bench_${site}`,
    CONCURRENCY,
  }
  const skipped = {
    perSecond: Number.NaN,
    writePerSecond: Number.NaN,
    commitsPerEvent: Number.NaN,
    rowsPerEvent: Number.NaN,
    cpuMsPerEvent: Number.NaN,
    cpuMsPerEventBy: new Map<string, number>(),
  }
  const skippedLatency = {
    events: 0,
    offered: Number.NaN,
    p50: Number.NaN,
    p99: Number.NaN,
    samples: 0,
    machineBusy: Number.NaN,
    cpuMsPerEvent: Number.NaN,
    cpuMsPerEventBy: new Map<string, number>(),
    stages: undefined as Awaited<ReturnType<typeof latency>>["stages"],
  }
  let kThroughput = skipped
  let kLatency = skippedLatency
  let stepsBefore: Record<string, HistogramSeries> = {}
  let stepsAfter: Record<string, HistogramSeries> = {}
  if (ONLY !== "graphile") {
    await withWorkers({ ...env, KIND: "keyway" }, async (workers) => {
      kThroughput = await throughput(db, keywayBatch, relay, workers)
      stepsBefore = await drainSteps(workers)
      kLatency = await latency(db, keywayWrite, relay, workers)
      stepsAfter = await drainSteps(workers)
    })
  }
  let gThroughput = skipped
  let gLatency = skippedLatency
  let graphileReruns = 0
  while (ONLY !== "keyway") {
    let failure: unknown
    try {
      await withWorkers({ ...env, ...GRAPHILE, KIND: "graphile" }, async (workers) => {
        gThroughput = await throughput(db, graphileBatch, relay, workers)
        gLatency = await latency(db, graphileWrite, relay, workers)
      })
    } catch (err) {
      failure = err
    }
    if (failure === undefined) break
    // Two runs in eight met graphile/worker#636 in session 27. Run again, from empty
    // queues: the jobs of the lost batch stay locked, and their effects exist already.
    if (
      !(failure instanceof BenchProcessStoppedError && failure.issue636) ||
      graphileReruns === 2
    ) {
      throw failure
    }
    graphileReruns++
    console.error(`${failure.message}: graphile/worker#636; its phase runs again`)
    await sql`delete from graphile_worker._private_jobs`.execute(db)
    await sql`delete from graphile_worker._private_job_queues`.execute(db)
    // pg_stat_database, which the commits per event come from, lags by up to a second.
    await sleep(1000)
  }

  const result = {
    bench: "pipeline",
    keyway_per_s: Math.round(kThroughput.perSecond),
    graphile_keyed_per_s: Math.round(gThroughput.perSecond),
    keyway_p50_ms: round(kLatency.p50, 2),
    keyway_p99_ms: round(kLatency.p99, 2),
    graphile_p50_ms: round(gLatency.p50, 2),
    graphile_p99_ms: round(gLatency.p99, 2),
  }
  printTable([
    ["measure", "keyway", "graphile-worker", "note"],
    [
      "events/s end to end",
      result.keyway_per_s,
      result.graphile_keyed_per_s,
      `${EVENTS} events${EVENTS < SPEC_EVENTS ? ` (BELOW the spec's ${SPEC_EVENTS}: not the figure)` : ""}, ${KEYS} keys, ${WRITERS} writers, ${workerProcesses}: ${CONCURRENCY} keys / ${GRAPHILE.GRAPHILE_CONCURRENCY} jobs at once${graphileReruns ? `; graphile-worker's phase run ${graphileReruns + 1} times (graphile/worker#636)` : ""}`,
    ],
    [
      "events written/s meanwhile",
      Math.round(kThroughput.writePerSecond),
      Math.round(gThroughput.writePerSecond),
      `${PER_TX} row(s) + ${PER_TX} event(s) per tx`,
    ],
    [
      "commit-to-handler p50 ms",
      result.keyway_p50_ms,
      result.graphile_p50_ms,
      `${offeredNote(
        LATENCY_RATE,
        [kLatency.offered, gLatency.offered].filter((o) => !Number.isNaN(o)),
      )}; to the handler's call`,
    ],
    [
      "commit-to-handler p99 ms",
      result.keyway_p99_ms,
      result.graphile_p99_ms,
      `${kLatency.samples} / ${gLatency.samples} samples`,
    ],
    [
      `machine busy at ${LATENCY_RATE} events/s, %`,
      round(100 * kLatency.machineBusy),
      round(100 * gLatency.machineBusy),
      "both cores, every process, latency run",
    ],
    [
      "Postgres commits per event",
      round(kThroughput.commitsPerEvent, 2),
      round(gThroughput.commitsPerEvent, 2),
      "all processes",
    ],
    [
      "Postgres rows touched per event",
      round(kThroughput.rowsPerEvent, 1),
      round(gThroughput.rowsPerEvent, 1),
      "inserted, updated, deleted, fetched",
    ],
    [
      "machine CPU ms per event",
      round(kThroughput.cpuMsPerEvent, 2),
      round(gThroughput.cpuMsPerEvent, 2),
      "both cores, every process, throughput run",
    ],
    ["  commit → published (relay) p50 / p99", kLatency.stages?.relay ?? "", "", "ms"],
    ["  published → in inbox (ingest) p50 / p99", kLatency.stages?.ingest ?? "", "", "ms"],
    ["  in inbox → handled (drain) p50 / p99", kLatency.stages?.drain ?? "", "", "ms"],
    [
      "ratio keyway / graphile",
      round(kThroughput.perSecond / gThroughput.perSecond, 2),
      "",
      "target >= 5",
    ],
  ])
  // The steps of each key's drain in the latency run, warm-up second included, as the
  // consumer's consumer_drain_step_seconds histogram saw them. Not all of the drain stage:
  // reading more tasks, marking a gap and the time between steps are not among them.
  const bound = (d: HistogramSeries, p: number) => {
    const le = bucketPercentile(d, p)
    const lastFinite = d.buckets.at(-2)?.[0] ?? 0
    return le === Number.POSITIVE_INFINITY ? `> ${lastFinite * 1000}` : `≤ ${le * 1000}`
  }
  const stepNames: Record<string, string> = {
    wait: "wait for a drain slot",
    lock: "Redis lock",
    claim: "claim (epoch, lease, tasks)",
    run: "run a task (handler + completion)",
    release: "release the lock",
  }
  printTable([
    [
      `drain steps at ${LATENCY_RATE} events/s, whole run`,
      "per event",
      "mean ms",
      "p50 ms",
      "p99 ms",
    ],
    ...Object.entries(stepNames).flatMap(([step, name]) => {
      const after = stepsAfter[step]
      if (!after) return []
      const d = histogramDelta(stepsBefore[step], after)
      if (d.count === 0) return []
      return [
        [
          name,
          round(d.count / kLatency.events, 2),
          round((1000 * d.sum) / d.count, 2),
          bound(d, 50),
          bound(d, 99),
        ],
      ]
    }),
  ])
  // Where the CPU went, by process: with every part on the same two cores, events/s is about
  // the CPU there is over the CPU each event costs. At the latency run's steady rate batches
  // are smaller than in the throughput run, so each event costs more; the last column shows
  // how much of the machine that left (the tail grows as it nears none).
  const cpuRow = (label: string, k: number, g: number, kAtRate: number) => [
    label,
    round(k, 3),
    round(g, 3),
    `${Math.round((100 * k) / kThroughput.cpuMsPerEvent)}%`,
    round(kAtRate, 3),
  ]
  const labelled = (by: Map<string, number>) => [...by.values()].reduce((a, b) => a + b, 0)
  printTable([
    [
      "CPU ms per event, throughput run",
      "keyway",
      "graphile-worker",
      "share of keyway's",
      `keyway at ${LATENCY_RATE}/s`,
    ],
    ...CPU_LABELS.map((label) =>
      cpuRow(
        label,
        kThroughput.cpuMsPerEventBy.get(label) ?? 0,
        gThroughput.cpuMsPerEventBy.get(label) ?? Number.NaN,
        kLatency.cpuMsPerEventBy.get(label) ?? 0,
      ),
    ),
    cpuRow(
      "everything else (kernel threads, …)",
      kThroughput.cpuMsPerEvent - labelled(kThroughput.cpuMsPerEventBy),
      gThroughput.cpuMsPerEvent - labelled(gThroughput.cpuMsPerEventBy),
      kLatency.cpuMsPerEvent - labelled(kLatency.cpuMsPerEventBy),
    ),
    cpuRow(
      "the whole machine",
      kThroughput.cpuMsPerEvent,
      gThroughput.cpuMsPerEvent,
      kLatency.cpuMsPerEvent,
    ),
  ])
  console.log(JSON.stringify(result))
}
