// The memory benchmark (DESIGN.md invariant 6, "memory does not grow with backlog"): a relay
// and a keyed consumer worker, each in its own process as deployed, work through a small
// backlog and then, in fresh processes, a backlog 25 times larger. What they still hold
// once through must not follow the backlog: the relay claims a bounded batch and keeps a
// bounded window of PubAcks in flight, the worker is sent at most max_ack_pending messages
// and drains a bounded number of keys and tasks at a time.
import { randomBytes } from "node:crypto"
import { readFileSync } from "node:fs"
import { fileURLToPath } from "node:url"
import { applyStreams, connectNats } from "@keyway/nats"
import { enqueue } from "@keyway/outbox"
import { createTestDatabase, spawnTs, type TsChild } from "@keyway/testkit"
import { jetstreamManager } from "@nats-io/jetstream"
import { type Kysely, sql } from "kysely"
import { relayEntry } from "./relay-process.ts"
import { benchKnob, printTable, round } from "./stats.ts"

const SMALL = benchKnob("BENCH_MEMORY_SMALL", 2_000)
const LARGE = benchKnob("BENCH_MEMORY_LARGE", 50_000)
const KEYS = 1000
// The backlog is written the fast way (many events per transaction): what is measured is
// what the relay and the worker hold while they work through it, not how it came to be.
const PER_TX = 250
const WRITERS = 2
// Live memory (heap and the buffers outside it, after a full collection) once through the
// large backlog against the small one. It moves by a MiB or two from run to run; memory
// that followed the backlog would grow with its 25 times.
const MAX_GROWTH = 1.2
const DEADLINE_MS = 600_000

const workerEntry = fileURLToPath(new URL("./pipeline-worker.ts", import.meta.url))
const probe = {
  nodeArgs: [
    "--expose-gc",
    "--import",
    fileURLToPath(new URL("./memory-probe.ts", import.meta.url)),
  ],
}
const MiB = 2 ** 20
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const gone = (child: TsChild) => child.exitCode !== null || child.signalCode !== null

/** The peak resident set so far (VmHWM), in MiB. */
function peakResidentMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8")
  return Number(/^VmHWM:\s+(\d+) kB/m.exec(status)![1]) / 1024
}

async function waitUntil(what: string, done: () => Promise<boolean>, child: TsChild) {
  const deadline = Date.now() + DEADLINE_MS
  while (!(await done())) {
    if (gone(child)) throw new Error(`${what}: the process died`)
    if (Date.now() > deadline) throw new Error(`${what}: not done after ${DEADLINE_MS} ms`)
    await sleep(50)
  }
}

/** What the child holds after a full collection (memory-probe.ts): heap and buffers, MiB. */
async function liveMiB(child: TsChild): Promise<number> {
  const probes = () => child.json().filter((l) => l.memoryProbe)
  const seen = probes().length
  child.kill("SIGUSR2")
  await waitUntil("memory probe", async () => probes().length > seen, child)
  const { heapUsed, external } = probes().at(-1)!.memoryProbe
  return (heapUsed + external) / MiB
}

/** One process through its backlog: peak resident set, live memory after, and its rate. */
interface Footprint {
  peakMiB: number
  liveMiB: number
  /** From the process's spawn, start-up included, to the backlog's end. */
  perSecond: number
}

async function footprint(
  spawn: () => TsChild,
  backlog: number,
  done: () => Promise<boolean>,
): Promise<Footprint> {
  const started = performance.now()
  const child = spawn()
  try {
    await waitUntil("backlog", done, child)
    const perSecond = backlog / ((performance.now() - started) / 1000)
    const peakMiB = peakResidentMiB(child.pid!)
    return { peakMiB, liveMiB: await liveMiB(child), perSecond }
  } finally {
    if (!gone(child)) child.kill("SIGTERM")
    await child.exited()
  }
}

async function count(db: Kysely<any>, query: ReturnType<typeof sql<{ n: number }>>) {
  return (await query.execute(db)).rows[0]!.n
}

async function measure(backlog: number, natsUrl: string) {
  const t = await createTestDatabase({ prefix: "keyway_bench", poolSize: WRITERS + 1 })
  const site = `bench${randomBytes(3).toString("hex")}`
  const stream = site.toUpperCase()
  const nc = await connectNats({ servers: natsUrl }).catch(async (err) => {
    await t.drop()
    throw err
  })
  const jsm = await jetstreamManager(nc)
  try {
    const db = t.db
    await sql`create table effect (id bigserial primary key, key text not null, ver bigint not null,
                                   event_id text not null, handled_at double precision not null)`.execute(
      db,
    )
    await applyStreams(jsm, [{ name: stream, subjects: [`${site}.>`], duplicate_window: 120e9 }])
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

    // The relay starts with the whole backlog waiting in the outbox, the worker with the
    // whole backlog waiting in the stream.
    const unpublished = sql<{ n: number }>`
      select count(*)::int as n from keyway.outbox where published_at is null`
    const relay = await footprint(
      () =>
        spawnTs(relayEntry, { DATABASE_URL: t.url, NATS_URL: natsUrl, KEYWAY_SITE: site }, probe),
      backlog,
      async () => (await count(db, unpublished)) === 0,
    )
    const workerEnv = {
      KIND: "keyway",
      DATABASE_URL: t.url,
      NATS_URL: natsUrl,
      REDIS_URL: process.env.REDIS_URL ?? "redis://127.0.0.1:6379",
      STREAM: stream,
      GROUP: `bench_${site}`,
      CONCURRENCY: "64",
    }
    const effects = sql<{ n: number }>`select count(*)::int as n from effect`
    const worker = await footprint(
      () => spawnTs(workerEntry, workerEnv, probe),
      backlog,
      async () => (await count(db, effects)) >= backlog,
    )
    return { relay, worker }
  } finally {
    await jsm.streams.delete(stream).catch(() => {})
    await nc.close()
    await t.drop()
  }
}

export async function run() {
  const natsUrl = process.env.NATS_URL ?? "nats://127.0.0.1:4222"
  const small = await measure(SMALL, natsUrl)
  const large = await measure(LARGE, natsUrl)
  const mib = (n: number) => round(n, 1)
  const result = {
    bench: "memory",
    backlog_small: SMALL,
    backlog_large: LARGE,
    relay_live_mib_small: mib(small.relay.liveMiB),
    relay_live_mib_large: mib(large.relay.liveMiB),
    relay_peak_rss_mib_small: mib(small.relay.peakMiB),
    relay_peak_rss_mib_large: mib(large.relay.peakMiB),
    worker_live_mib_small: mib(small.worker.liveMiB),
    worker_live_mib_large: mib(large.worker.liveMiB),
    worker_peak_rss_mib_small: mib(small.worker.peakMiB),
    worker_peak_rss_mib_large: mib(large.worker.peakMiB),
  }
  const growth = (a: number, b: number) => `${round(b / a, 2)}x`
  const rows = (name: string, s: Footprint, l: Footprint) => [
    [
      `${name}: live heap and buffers after, MiB`,
      mib(s.liveMiB),
      mib(l.liveMiB),
      `${growth(s.liveMiB, l.liveMiB)} (target <= ${MAX_GROWTH}x)`,
    ],
    [
      `${name}: peak resident set, MiB`,
      mib(s.peakMiB),
      mib(l.peakMiB),
      `${growth(s.peakMiB, l.peakMiB)} (V8 sizes its heap to the load)`,
    ],
    [
      `${name}: events/s from spawn`,
      Math.round(s.perSecond),
      Math.round(l.perSecond),
      "start-up included",
    ],
  ]
  printTable([
    ["measure", `${SMALL} events`, `${LARGE} events`, "note"],
    ...rows("relay", small.relay, large.relay),
    ...rows("worker", small.worker, large.worker),
  ])
  console.log(JSON.stringify(result))
}
