// The memory benchmark (DESIGN.md invariant 6, "memory does not grow with backlog"): a relay
// and a keyed consumer worker, each in its own process as deployed, work through a small
// backlog and then, in fresh processes, a backlog 25 times larger. What they hold at their
// peak must not follow the backlog: the relay claims a bounded batch and keeps a bounded
// window of PubAcks in flight, the worker is sent at most max_ack_pending messages and
// drains a bounded number of keys and tasks at a time.
import { randomBytes } from "node:crypto"
import { readFileSync } from "node:fs"
import { fileURLToPath } from "node:url"
import { applyStreams, connectNats } from "@keyway/nats"
import { enqueue } from "@keyway/outbox"
import { createTestDatabase, spawnTs, type TsChild } from "@keyway/testkit"
import { jetstreamManager } from "@nats-io/jetstream"
import { type Kysely, sql } from "kysely"
import { printTable, round } from "./stats.ts"

const SMALL = Number(process.env.BENCH_MEMORY_SMALL ?? 2_000)
const LARGE = Number(process.env.BENCH_MEMORY_LARGE ?? 50_000)
const KEYS = 1000
// The backlog is written the fast way (many events per transaction): what is measured is
// what the relay and the worker hold while they work through it, not how it came to be.
const PER_TX = 250
const WRITERS = 2
// Peak resident set with the large backlog against the small one. A Node process's peak
// moves by some MB from run to run (when V8 collects, what the allocator returns); a
// footprint that followed the backlog would be 25 times the small one's growth.
const MAX_GROWTH = 1.2

const relayEntry = fileURLToPath(new URL("../../apps/relay/src/main.ts", import.meta.url))
const workerEntry = fileURLToPath(new URL("./pipeline-worker.ts", import.meta.url))
const probe = {
  nodeArgs: [
    "--expose-gc",
    "--import",
    fileURLToPath(new URL("./memory-probe.ts", import.meta.url)),
  ],
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** Resident set now and at its peak (VmRSS, VmHWM), in MB. */
function residentMb(pid: number): { now: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8")
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)![1])
  return { now: kb("VmRSS") / 1024, peak: kb("VmHWM") / 1024 }
}

/** What the child's heap holds after a full collection (memory-probe.ts), in MB. */
async function liveHeapMb(child: TsChild): Promise<number> {
  const seen = child.json().filter((l) => l.memoryProbe).length
  child.kill("SIGUSR2")
  for (;;) {
    const probes = child.json().filter((l) => l.memoryProbe)
    if (probes.length > seen) return probes.at(-1)!.memoryProbe.heapUsed / 2 ** 20
    if (child.exitCode !== null) throw new Error("the process died before its memory probe")
    await sleep(20)
  }
}

async function count(db: Kysely<any>, query: ReturnType<typeof sql<{ n: number }>>) {
  return (await query.execute(db)).rows[0]!.n
}

async function waitUntil(what: string, done: () => Promise<boolean>, child: TsChild) {
  const deadline = Date.now() + 600_000
  while (!(await done())) {
    if (child.exitCode !== null) throw new Error(`${what}: the process died`)
    if (Date.now() > deadline) throw new Error(`${what}: not done after 10 min`)
    await sleep(100)
  }
}

/** One process's memory over a run: at start, at its peak, and alive once the work is done. */
interface Footprint {
  startMb: number
  peakMb: number
  liveStartMb: number
  liveEndMb: number
  perSecond: number
}

/**
 * Runs `child` (already spawned) until `done`, and reads its memory: resident set at start
 * and at the peak, live heap at start and at the end, while it still holds whatever it kept.
 */
async function footprint(
  child: TsChild,
  backlog: number,
  ready: () => boolean,
  done: () => Promise<boolean>,
): Promise<Footprint> {
  await waitUntil("start", async () => ready(), child)
  const startMb = residentMb(child.pid!).now
  const liveStartMb = await liveHeapMb(child)
  const started = performance.now()
  await waitUntil("drain", done, child)
  const perSecond = backlog / ((performance.now() - started) / 1000)
  const peakMb = residentMb(child.pid!).peak
  const liveEndMb = await liveHeapMb(child)
  child.kill("SIGTERM")
  await child.exited()
  return { startMb, peakMb, liveStartMb, liveEndMb, perSecond }
}

async function measure(backlog: number, natsUrl: string) {
  const t = await createTestDatabase({ prefix: "keyway_bench", poolSize: WRITERS + 1 })
  const db = t.db
  await sql`create table effect (id bigserial primary key, key text not null, ver bigint not null,
                                 event_id text not null, handled_at double precision not null)`.execute(
    db,
  )
  const site = `bench${randomBytes(3).toString("hex")}`
  const stream = site.toUpperCase()
  const nc = await connectNats({ servers: natsUrl })
  const jsm = await jetstreamManager(nc)
  await applyStreams(jsm, [{ name: stream, subjects: [`${site}.>`], duplicate_window: 120e9 }])
  const children: TsChild[] = []
  try {
    let written = 0
    await Promise.all(
      Array.from({ length: WRITERS }, async () => {
        while (written < backlog) {
          const n = Math.min(PER_TX, backlog - written)
          written += n
          await db.transaction().execute((trx) =>
            enqueue(
              trx,
              Array.from({ length: n }, (_, i) => ({
                type: "demo.item.changed.v1",
                key: `k${Math.floor(Math.random() * KEYS)}`,
                payload: { n: i },
              })),
            ),
          )
        }
      }),
    )

    // The relay starts with the whole backlog waiting in the outbox.
    const relay = spawnTs(
      relayEntry,
      { DATABASE_URL: t.url, NATS_URL: natsUrl, KEYWAY_SITE: site },
      probe,
    )
    children.push(relay)
    const unpublished = sql<{ n: number }>`
      select count(*)::int as n from keyway.outbox where published_at is null`
    const relayFigures = await footprint(
      relay,
      backlog,
      () => relay.json().some((l) => l.message === "relay active"),
      async () => (await count(db, unpublished)) === 0,
    )

    // The worker starts with the whole backlog waiting in the stream.
    const worker = spawnTs(
      workerEntry,
      {
        KIND: "keyway",
        DATABASE_URL: t.url,
        NATS_URL: natsUrl,
        REDIS_URL: process.env.REDIS_URL ?? "redis://127.0.0.1:6379",
        STREAM: stream,
        GROUP: `bench_${site}`,
        CONCURRENCY: "64",
      },
      probe,
    )
    children.push(worker)
    const effects = sql<{ n: number }>`select count(*)::int as n from effect`
    const workerFigures = await footprint(
      worker,
      backlog,
      () => worker.json().some((l) => l.ready),
      async () => (await count(db, effects)) >= backlog,
    )
    return { relay: relayFigures, worker: workerFigures }
  } finally {
    for (const c of children) if (c.exitCode === null) c.kill("SIGKILL")
    await Promise.all(children.map((c) => c.exited()))
    await jsm.streams.delete(stream).catch(() => {})
    await nc.close()
    await t.drop()
  }
}

export async function run() {
  const natsUrl = process.env.NATS_URL ?? "nats://127.0.0.1:4222"
  const small = await measure(SMALL, natsUrl)
  const large = await measure(LARGE, natsUrl)
  const mb = (n: number) => round(n, 1)
  const result = {
    bench: "memory",
    backlog_small: SMALL,
    backlog_large: LARGE,
    relay_live_mb_small: mb(small.relay.liveEndMb),
    relay_live_mb_large: mb(large.relay.liveEndMb),
    relay_peak_rss_mb_small: mb(small.relay.peakMb),
    relay_peak_rss_mb_large: mb(large.relay.peakMb),
    worker_live_mb_small: mb(small.worker.liveEndMb),
    worker_live_mb_large: mb(large.worker.liveEndMb),
    worker_peak_rss_mb_small: mb(small.worker.peakMb),
    worker_peak_rss_mb_large: mb(large.worker.peakMb),
  }
  const growth = (a: number, b: number, target?: number) =>
    `${round(b / a, 2)}x${target ? ` (target <= ${target}x)` : ""}`
  const rows = (name: string, s: Footprint, l: Footprint) => [
    [`${name}: resident set at start, MB`, mb(s.startMb), mb(l.startMb), ""],
    [`${name}: resident set at peak, MB`, mb(s.peakMb), mb(l.peakMb), growth(s.peakMb, l.peakMb)],
    [`${name}: live heap at start, MB`, mb(s.liveStartMb), mb(l.liveStartMb), "after a full GC"],
    [
      `${name}: live heap after the backlog, MB`,
      mb(s.liveEndMb),
      mb(l.liveEndMb),
      growth(s.liveEndMb, l.liveEndMb, MAX_GROWTH),
    ],
    [`${name}: events/s through the backlog`, Math.round(s.perSecond), Math.round(l.perSecond), ""],
  ]
  printTable([
    ["measure", `${SMALL} events`, `${LARGE} events`, "note"],
    ...rows("relay", small.relay, large.relay),
    ...rows("worker", small.worker, large.worker),
  ])
  console.log(JSON.stringify(result))
}
