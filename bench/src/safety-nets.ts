// What the keyed consumer's safety nets cost as a group's keys grow (DESIGN.md §5): each
// worker process runs the polling loop's query every poll interval and the recovery loop's
// two every recovery interval, whether or not anything was lost. Keys are never deleted, and
// a key's finished rows stay for the inbox's retention (a day by default), so the steady
// state of a store's shelf labels, each changed a few times a day, is many idle keys with a
// few finished rows each and a backlog on a handful.
//
// Measured on a fresh database per size, in this process: each query's wall time, and the
// whole machine's CPU for it (Postgres may run a query on parallel workers, which its wall
// time hides). The last column is what those rounds cost one worker process at the default
// intervals, as a share of one core; every worker of the group pays it.
import { createTestDatabase } from "@keyway/testkit"
import { type Kysely, sql } from "kysely"
import {
  dateGaps,
  expireLeases,
  runnableKeys,
} from "../../libs/keyed-consumer/src/internal/inbox-sql.ts"
import { Cleanups } from "./cleanups.ts"
import { benchKnob, machineBusyMs, percentile, printTable, round } from "./stats.ts"

const MAX_KEYS = benchKnob("BENCH_SAFETY_KEYS", 100_000)
const VERSIONS = 5 // finished rows per key, within retention
const BACKLOG_KEYS = 10 // keys with a task due
const ROUNDS = 5
// libs/keyed-consumer's defaults (create-keyed-consumer.ts) and its poll page.
const POLL_INTERVAL_MS = 2000
const RECOVERY_INTERVAL_MS = 5000
const POLL_PAGE = 1000
const GROUP = "bench"
const TOPIC = "esl.label"

const sizes = [1_000, 10_000, 100_000, 1_000_000].filter((n) => n < MAX_KEYS).concat(MAX_KEYS)

async function fill(db: Kysely<any>, keys: number, backlogKeys: number, lease: string) {
  const key = sql`lpad(to_hex(n), 12, '0')`
  await sql`
    insert into keyway.consumer_key (grp, topic, key, done_ver, epoch, lease_until)
    select ${GROUP}, ${TOPIC}, ${key}, ${VERSIONS}, ${VERSIONS}, now() + ${lease}::interval
      from generate_series(1, ${keys}) n`.execute(db)
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at,
                              state, attempts, done_at)
    select ${GROUP}, ${TOPIC}, ${key}, v, 'bench:' || (n * 100 + v), 'esl.label.v1', '{}',
           now(), 'done', 1, now()
      from generate_series(1, ${keys}) n, generate_series(1, ${VERSIONS}) v`.execute(db)
  // The backlog: a due task on a few keys, spread over the key range.
  await sql`
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, created_at)
    select ${GROUP}, ${TOPIC}, ${key}, ${VERSIONS + 1}, 'bench:' || (n * 100 + ${VERSIONS + 1}),
           'esl.label.v1', '{}', now()
      from generate_series(1, ${keys}, ${backlogStep(keys, backlogKeys)}) n`.execute(db)
  // As autovacuum would have it after the load: statistics, and the visibility map.
  await sql`vacuum analyze keyway.consumer_key`.execute(db)
  await sql`vacuum analyze keyway.inbox`.execute(db)
}

const backlogStep = (keys: number, backlogKeys: number) =>
  Math.max(1, Math.floor(keys / backlogKeys))

/** Median wall ms and mean machine CPU ms of ROUNDS runs of one query. */
async function timeRounds(round: () => Promise<unknown>) {
  await round() // warm: plans and caches, as a running worker has them
  const wall: number[] = []
  const busyBefore = machineBusyMs()
  for (let i = 0; i < ROUNDS; i++) {
    const started = performance.now()
    await round()
    wall.push(performance.now() - started)
  }
  return { wallMs: percentile(wall, 50), cpuMs: (machineBusyMs() - busyBefore) / ROUNDS }
}

export async function run() {
  const parks = { byDefault: false, except: [] as string[] }
  const results: {
    keys: number
    due: number
    poll: { wallMs: number; cpuMs: number }
    expire: { wallMs: number; cpuMs: number }
    gaps: { wallMs: number; cpuMs: number }
  }[] = []
  // The steady state at each size, then the worst case for the safety nets at the largest:
  // every key with a task due (a backlog, as after a factory's hours offline), each held by
  // a live worker's lease as its drain works through it.
  const runs = [
    ...sizes.map((keys) => ({ keys, backlogKeys: BACKLOG_KEYS, lease: "-1 hour" })),
    { keys: MAX_KEYS, backlogKeys: MAX_KEYS, lease: "1 hour" },
  ]
  for (const { keys, backlogKeys, lease } of runs) {
    await using cleanups = new Cleanups()
    const t = await createTestDatabase()
    cleanups.defer("the test database", () => t.drop())
    await fill(t.db, keys, backlogKeys, lease)
    const found = await runnableKeys(t.db, GROUP, parks, POLL_PAGE)
    const due = Math.ceil(keys / backlogStep(keys, backlogKeys))
    if (found.length !== Math.min(due, POLL_PAGE)) {
      throw new Error(`${keys} keys: the polling query found ${found.length} runnable keys`)
    }
    results.push({
      keys,
      due,
      poll: await timeRounds(() => runnableKeys(t.db, GROUP, parks, POLL_PAGE)),
      expire: await timeRounds(async () => {
        const released = await expireLeases(t.db, GROUP, parks)
        // Lapsed again for the next round, as a drain that ended leaves it. Counted in
        // the round: a primary-key update per key released, as many as the backlog's keys.
        await sql`
          update keyway.consumer_key c set lease_until = now() - interval '1 hour'
            from unnest(${released.map((k) => k.topic)}::text[],
                        ${released.map((k) => k.key)}::text[]) as r(topic, key)
           where c.grp = ${GROUP} and c.topic = r.topic and c.key = r.key`.execute(t.db)
      }),
      gaps: await timeRounds(() => dateGaps(t.db, GROUP)),
    })
  }
  const share = (r: (typeof results)[number]) =>
    (100 * r.poll.cpuMs) / POLL_INTERVAL_MS +
    (100 * (r.expire.cpuMs + r.gaps.cpuMs)) / RECOVERY_INTERVAL_MS
  printTable([
    [
      "keys",
      "keys with a task due",
      "poll ms (cpu)",
      "expire leases ms (cpu)",
      "date gaps ms (cpu)",
      "% of a core per worker",
    ],
    ...results.map((r) => [
      r.keys,
      r.due,
      `${round(r.poll.wallMs)} (${round(r.poll.cpuMs)})`,
      `${round(r.expire.wallMs)} (${round(r.expire.cpuMs)})`,
      `${round(r.gaps.wallMs)} (${round(r.gaps.cpuMs)})`,
      round(share(r)),
    ]),
  ])
  console.log(
    `${VERSIONS} finished rows per key; medians of ${ROUNDS} rounds; cpu: the whole machine's, mean per round; share: at the default ${POLL_INTERVAL_MS} ms poll and ${RECOVERY_INTERVAL_MS} ms recovery intervals`,
  )
  // The steady state at the largest size: what every worker pays while nothing is lost.
  const last = results.at(-2)!
  console.log(
    JSON.stringify({
      bench: "safety-nets",
      keys: last.keys,
      poll_ms: round(last.poll.wallMs, 2),
      expire_leases_ms: round(last.expire.wallMs, 2),
      date_gaps_ms: round(last.gaps.wallMs, 2),
      core_share_per_worker_pct: round(share(last), 1),
    }),
  )
}
