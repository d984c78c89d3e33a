// Order and exactly-once through crashes (issue 3, must-show 1), fencing under a frozen
// worker (2), and a Redis restart in the middle of draining (6). Workers are child
// processes; the checker reads only the effect rows the handlers wrote.
import assert from "node:assert/strict"
import { after, afterEach, before, describe, test } from "node:test"
import { fileURLToPath } from "node:url"
import { createDb } from "@keyway/db"
import { createConsumerAdmin, createKeyedConsumer } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { createRelay, enqueue } from "@keyway/outbox"
import {
  createTcpProxy,
  createTestDatabase,
  createTestStream,
  gate,
  spawnTs,
  startNatsServer,
  startRedisServer,
  type TestDatabase,
  type TsChild,
  waitFor,
} from "@keyway/testkit"
import { jetstream } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { Redis } from "ioredis"
import { sql } from "kysely"
import {
  checkEffects,
  createEffectTable,
  effects,
  publishEvent,
  recordEffect,
  SHARED_NATS,
  SHARED_REDIS,
  unique,
} from "./support.ts"

const workerEntry = fileURLToPath(new URL("./fixtures/worker-child.ts", import.meta.url))
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function effectCount(db: TestDatabase["db"]) {
  const r = await sql<{ n: number }>`select count(*)::int as n from effect`.execute(db)
  return r.rows[0]!.n
}

/** Keys not yet at `last`, with their lease and the state of their next task. */
async function keysBehind(db: TestDatabase["db"], group: string, last: number) {
  const r = await sql`
    select k.key, k.done_ver, k.epoch, k.owner, k.lease_until > now() as leased,
           k.baseline_stream_seq, k.gap_since is not null as gap, i.state, i.attempts,
           i.run_after > now() as later, i.last_error
      from keyway.consumer_key k
      left join keyway.inbox i
        on i.grp = k.grp and i.topic = k.topic and i.key = k.key and i.ver = k.done_ver + 1
     where k.grp = ${group} and k.done_ver < ${last}
     order by k.key limit 10
  `.execute(db)
  return r.rows
}

describe("keyed consumer under crashes", () => {
  let nc: NatsConnection
  const cleanups: (() => Promise<unknown>)[] = []
  before(async () => {
    nc = await connectNats({ servers: SHARED_NATS })
  })
  // After each test: a test's workers and relay left running held connections and CPU
  // through the tests after it, whose leases and windows are a few seconds.
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
  })
  after(async () => {
    await nc.close()
  })

  async function site() {
    const t = await createTestDatabase({ poolSize: 8 })
    cleanups.push(() => t.drop())
    await createEffectTable(t.db)
    const stream = await createTestStream(nc)
    cleanups.push(() => stream.delete())
    return { t, stream, group: unique("g") }
  }

  function startWorker(env: Record<string, string>): TsChild {
    const child = spawnTs(workerEntry, env)
    cleanups.push(async () => {
      child.kill("SIGKILL")
      await child.exited()
    })
    return child
  }

  test("3 workers, 100 keys, 20,000 events through outbox and relay, a worker kill -9'd every few seconds", async () => {
    const { t, stream, group } = await site()
    const relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site: stream.site,
    })
    cleanups.push(() => relay.stop())
    await relay.start()
    const env = (id: string) => ({
      DATABASE_URL: t.url,
      NATS_URL: SHARED_NATS,
      REDIS_URL: SHARED_REDIS,
      STREAM: stream.name,
      GROUP: group,
      WORKER_ID: id,
      LEASE_MS: "2000",
      POLL_MS: "500",
      RECOVERY_MS: "500",
    })
    let generation = 0
    const workers = [0, 1, 2].map((i) => startWorker(env(`w${i}.${generation}`)))

    // Three kills are the point of the test, and on a fast machine the group can drain all
    // 20,000 events before the third one (it did: 2 kills). So the writers hold back their
    // last transactions until the third kill: there is always work in flight across it.
    const { opened: threeKills, open: killedThree } = gate()

    // Writers: 4 of them, 100-event transactions over 100 keys, spread over a few seconds.
    const writing = Promise.all(
      [0, 1, 2, 3].map(async (w) => {
        for (let tx = 0; tx < 50; tx++) {
          if (tx === 40) await threeKills
          const events = Array.from({ length: 100 }, (_, i) => ({
            type: "demo.item.changed.v1",
            key: `k${(w * 7 + tx * 13 + i) % 100}`,
            payload: { n: tx * 100 + i },
          }))
          await t.db.transaction().execute((trx) => enqueue(trx, events))
          await sleep(50)
        }
      }),
    )

    // The killer: one worker dies with SIGKILL 2 s after the last replacement started, and a
    // fresh one takes its place. Counting from the start rather than from the kill keeps the
    // test the same on a slow machine, where a worker can take seconds to start: killing on a
    // fixed clock there left the group with hardly a worker past its start-up.
    let kills = 0
    let done = false
    const killer = (async () => {
      try {
        while (!done) {
          await sleep(2000)
          if (done) break
          const i = kills % 3
          workers[i]!.kill("SIGKILL")
          await workers[i]!.exited()
          kills++
          if (kills === 3) killedThree()
          generation++
          const fresh = startWorker(env(`w${i}.${generation}`))
          workers[i] = fresh
          await waitFor(() => done || fresh.json().some((l) => l.started), {
            timeoutMs: 60_000,
            message: `worker w${i}.${generation} started`,
          })
        }
      } finally {
        // A killer that failed must not leave the writers waiting for ever; the count of
        // kills is asserted below.
        killedThree()
      }
    })()
    try {
      await writing
      let seen = 0
      await waitFor(
        async () => {
          seen = await effectCount(t.db)
          return seen >= 20_000
        },
        {
          timeoutMs: 240_000,
          intervalMs: 500,
          message: () => `20,000 effects (${seen} so far, ${kills} kills)`,
        },
      )
    } finally {
      // Also on failure: a killer left running restarts workers forever and the test file
      // never exits.
      done = true
      await killer
    }
    // Let the survivors settle, then make sure nothing more (a duplicate) appears.
    await sleep(1500)
    const rows = await effects(t.db)
    assert.ok(kills >= 3, `at least 3 workers were killed (got ${kills})`)
    const distinct = new Set(rows.map((r) => `${r.key}/${r.ver}`))
    assert.equal(distinct.size, 20_000, "every event has an effect")
    assert.equal(rows.length, 20_000, "no event has two effects")
    const { byKey, problems } = checkEffects(rows)
    assert.equal(byKey.size, 100)
    assert.deepEqual(problems, [], "within each key, effects in version order")
    const workersSeen = new Set(rows.map((r) => r.worker))
    assert.ok(workersSeen.size >= 4, "effects came from workers of several generations")
  })

  test("fencing: a worker frozen past its lock's expiry finds the key lost before its vendor call, and writes nothing", async () => {
    const { t, stream, group } = await site()
    const frozen = startWorker({
      DATABASE_URL: t.url,
      NATS_URL: SHARED_NATS,
      REDIS_URL: SHARED_REDIS,
      STREAM: stream.name,
      GROUP: group,
      WORKER_ID: "frozen",
      LEASE_MS: "1000",
      RECOVERY_MS: "200",
      SLOW_KEY: "slow",
      SLOW_MS: "1500",
    })
    await waitFor(() => frozen.json().some((l) => l.started), {
      timeoutMs: 15_000,
      message: "worker up",
    })
    await publishEvent(nc, stream.site, { key: "slow", ver: 1, payload: { n: 1 } })
    await waitFor(() => frozen.json().some((l) => l.slowStart === 1), {
      timeoutMs: 10_000,
      message: "handler started",
    })
    // Freeze it mid-handler: no heartbeats, no lock extension, like a long GC pause.
    frozen.kill("SIGSTOP")
    const redis = new Redis(SHARED_REDIS)
    cleanups.push(async () => redis.disconnect())
    const other = createKeyedConsumer({
      group,
      stream: stream.name,
      nats: nc,
      db: t.db,
      redis,
      workerId: "other",
      handlers: { "demo.item.changed.v1": recordEffect("other") },
      leaseMs: 1000,
      pollIntervalMs: 200,
      recoveryIntervalMs: 200,
    })
    cleanups.push(() => other.stop())
    await other.start()
    await waitFor(async () => (await effectCount(t.db)) === 1, {
      timeoutMs: 15_000,
      message: "the other worker took the key and handled v1",
    })
    frozen.kill("SIGCONT")
    await waitFor(() => frozen.json().some((l) => l.completeFailed === 1), {
      timeoutMs: 10_000,
      message: "the resumed worker's complete() was refused",
    })
    const failure = frozen.json().find((l) => l.completeFailed === 1)!
    assert.equal(failure.error, "FencedError")
    // Frozen in the middle of its own code, it resumes there, before any timer: only the
    // lock's own clock can tell it, before a call that the other worker's may have overtaken.
    assert.deepEqual(
      frozen.json().filter((l) => l.stillHeld !== undefined || l.lost !== undefined),
      [{ lost: 1, error: "lock lost" }],
    )
    await sleep(500)
    const rows = await effects(t.db)
    assert.deepEqual(
      rows.map((r) => [r.key, r.ver, r.worker]),
      [["slow", 1, "other"]],
      "one effect, by the worker that took over",
    )
    await other.stop()
  })

  test("a payload that kills its worker is dead once its runs alone use up its attempts; the tasks beside it are never charged", {
    timeout: 150_000,
  }, async () => {
    const { t, stream, group } = await site()
    const maxAttempts = 2
    const env = {
      DATABASE_URL: t.url,
      NATS_URL: SHARED_NATS,
      REDIS_URL: SHARED_REDIS,
      STREAM: stream.name,
      GROUP: group,
      // A death counts once the killer's lease has less than a third left when its key is
      // claimed again: 3 s leaves a claim a second, on a busy machine, to answer (sql/0019).
      LEASE_MS: "3000",
      POLL_MS: "200",
      RECOVERY_MS: "200",
      // First in key order, so that the others' tasks wait behind it at the gate.
      CRASH_KEY: "a-doom",
      MAX_ATTEMPTS: String(maxAttempts),
      // Slow enough that other keys' tasks are in flight whenever the doomed one runs.
      HANDLER_MS: "150",
    }
    const bystanders = Array.from({ length: 10 }, (_, n) => `b${n}`)
    const rounds = 12
    let published = 0
    const publishRound = async () => {
      published++
      await Promise.all(
        bystanders.map((key) =>
          publishEvent(nc, stream.site, { key, ver: published, payload: { n: published } }),
        ),
      )
    }
    await publishRound()
    await publishEvent(nc, stream.site, { key: "a-doom", ver: 1, payload: { n: 1, note: "crash" } })
    await publishEvent(nc, stream.site, { key: "a-doom", ver: 2, payload: { n: 2 } })
    // Two workers at all times: one that dies is replaced, as a supervisor would.
    let deaths = 0
    let generation = 0
    let supervising = true
    const live = new Set<TsChild>()
    const slots = [0, 1].map(async () => {
      while (supervising) {
        const child = startWorker({ ...env, WORKER_ID: `w${++generation}` })
        live.add(child)
        const { signal } = await child.exited()
        live.delete(child)
        if (signal === "SIGKILL" && supervising) deaths++
      }
    })
    const doomV1 = async () =>
      (
        await sql<{ state: string; last_error: string | null }>`
          select state, last_error from keyway.inbox
           where grp = ${group} and key = 'a-doom' and ver = 1`.execute(t.db)
      ).rows[0]
    try {
      // More of the other keys' tasks arrive while the doomed one takes workers down.
      while ((await doomV1())?.state !== "dead") {
        if (published < rounds) await publishRound()
        await sleep(500)
        assert.ok(deaths <= maxAttempts + 1, `the doomed task stopped killing (${deaths} deaths)`)
        assert.ok(generation < 40, "the doomed task died within 40 worker starts")
      }
      while (published < rounds) await publishRound()
      await waitFor(async () => (await effectCount(t.db)) === bystanders.length * rounds, {
        timeoutMs: 60_000,
        message: "every other key's tasks handled",
      })
    } finally {
      supervising = false
      for (const child of live) child.kill("SIGKILL")
      await Promise.all(slots)
    }
    // Its first death among the others' tasks made it a suspect; each later one, alone,
    // cost it an attempt.
    assert.equal(deaths, maxAttempts + 1, "one worker killed per run of the doomed task")
    assert.match(
      (await doomV1())!.last_error ?? "",
      /its attempts \(2 of 2\) are used up, the last by a run alone lost with its worker/,
    )
    const rows = await effects(t.db)
    assert.equal(rows.length, bystanders.length * rounds, "no other key's effect twice")
    assert.deepEqual(checkEffects(rows).problems, [])
    const dead = await sql<{ key: string; ver: number }>`
      select key, ver::int from keyway.inbox where grp = ${group} and state = 'dead'`.execute(t.db)
    assert.deepEqual(dead.rows, [{ key: "a-doom", ver: 1 }], "the doomed task alone is dead")
    const charged = await sql`
      select key, ver::int, attempts from keyway.inbox
       where grp = ${group} and key <> 'a-doom' and attempts <> 1`.execute(t.db)
    assert.deepEqual(charged.rows, [], "every other task done in one attempt, the one that ran")
    assert.deepEqual(
      rows.filter((r) => r.key === "a-doom"),
      [],
      "policy block: v2 waits behind the dead v1",
    )

    // Fixed (here: a worker that does not crash on it), an operator's retry runs it again
    // from a fresh count, still a suspect, and v2 after it.
    const redis = new Redis(SHARED_REDIS)
    cleanups.push(async () => redis.disconnect())
    const fixed = createKeyedConsumer({
      group,
      stream: stream.name,
      nats: nc,
      db: t.db,
      redis,
      handlers: { "demo.item.changed.v1": recordEffect("fixed") },
      defaultPolicy: { maxAttempts },
      leaseMs: 1000,
      pollIntervalMs: 200,
      recoveryIntervalMs: 200,
    })
    cleanups.push(() => fixed.stop())
    await fixed.start()
    assert.equal(
      await createConsumerAdmin({ db: t.db, group }).retry({ topic: "demo.item", key: "a-doom" }),
      1,
    )
    await waitFor(
      async () => (await effects(t.db)).filter((r) => r.key === "a-doom").length === 2,
      {
        timeoutMs: 15_000,
        message: "doom v1 and v2 handled after the retry",
      },
    )
    assert.deepEqual(
      (await effects(t.db)).filter((r) => r.key === "a-doom").map((r) => [r.ver, r.worker]),
      [
        [1, "fixed"],
        [2, "fixed"],
      ],
    )
    assert.equal(
      fixed.status().suspectRuns,
      1,
      "the retried task ran alone first: unfixed, it would have taken no other task down",
    )
    await fixed.stop()
  })

  /** A database handle that reaches `t`'s Postgres through a proxy the test can cut. */
  async function throughProxy(t: TestDatabase) {
    const proxy = await createTcpProxy({ host: "127.0.0.1", port: 5432 })
    cleanups.push(() => proxy.close())
    const url = new URL(t.url)
    url.host = `${proxy.host}:${proxy.port}`
    const db = createDb({ connectionString: url.toString(), max: 8 })
    cleanups.push(() => db.destroy())
    const redis = new Redis(SHARED_REDIS)
    cleanups.push(async () => redis.disconnect())
    return { proxy, db, redis }
  }

  /**
   * Two consumers drain `keys` keys; once a fifth of the events are handled, `outage.begin()`
   * takes a server away, the rest of the events are published while it is gone, and
   * `outage.end()` brings it back. Then every effect must exist once, in version order.
   */
  async function drainThroughOutage(o: {
    t: TestDatabase
    stream: { name: string; site: string }
    group: string
    /** What the consumers use; the checker reads the effects through `t.db`. */
    db: TestDatabase["db"]
    redis: [Redis, Redis]
    what: string
    begin(): Promise<void>
    /** While the server is gone, after the rest was published and a second has passed. */
    during(effectsSoFar: number): Promise<void>
    end(): Promise<void>
  }) {
    const { t, group } = o
    // k0's v30 waits for the outage to have begun: the server goes away under a drain in
    // progress, its key locked and its handler running, not only with work queued.
    const { opened: midDrain, open: enteredMidDrain } = gate()
    const { opened: outageBegun, open: beginOutage } = gate()
    const consumers = o.redis.map((redis, i) =>
      createKeyedConsumer({
        group,
        stream: o.stream.name,
        nats: nc,
        db: o.db,
        redis,
        workerId: `w${i}`,
        handlers: {
          "demo.item.changed.v1": async (event, ctx) => {
            if (event.key === "k0" && event.ver === 30) {
              enteredMidDrain()
              await outageBegun
            }
            await sleep(1) // keep the drain going long enough to take a server away under it
            await recordEffect(`w${i}`)(event, ctx)
          },
        },
        leaseMs: 2000,
        pollIntervalMs: 300,
        recoveryIntervalMs: 300,
      }),
    )
    for (const c of consumers) {
      cleanups.push(() => c.stop())
      await c.start()
    }
    const keys = 30
    const perKey = 100
    const publish = async (from: number, to: number) => {
      for (let ver = from; ver <= to; ver++) {
        await Promise.all(
          Array.from({ length: keys }, (_, k) =>
            publishEvent(nc, o.stream.site, { key: `k${k}`, ver, payload: { n: ver } }),
          ),
        )
      }
    }
    await publish(1, 60)
    await midDrain
    await o.begin()
    beginOutage()
    // The rest arrives while the server is away: a fast machine had drained all 3,000 events
    // before a Redis kill, and the restart then tested nothing.
    await publish(61, perKey)
    await sleep(1000)
    await o.during(await effectCount(t.db))
    await o.end()
    // What the group looked like at the last check, for the timeout's message: which keys
    // are behind, who holds them, and what each worker is doing.
    let lastSeen = ""
    await waitFor(
      async () => {
        const n = await effectCount(t.db)
        if (n >= keys * perKey) return true
        lastSeen = `${n} effects; behind: ${JSON.stringify(await keysBehind(t.db, group, perKey))}; workers: ${JSON.stringify(consumers.map((c) => c.status()))}`
        return false
      },
      {
        timeoutMs: 90_000,
        intervalMs: 250,
        message: () => `all effects after ${o.what}; ${lastSeen}`,
      },
    )
    await sleep(500)
    const rows = await effects(t.db)
    assert.equal(rows.length, keys * perKey, "no effect twice")
    assert.deepEqual(checkEffects(rows).problems, [])
    for (const c of consumers) await c.stop()
  }

  test("a private Redis restarted in the middle of draining: every effect once, in order", async () => {
    const { t, stream, group } = await site()
    // Stopped by the cleanups, after the consumers (cleanups run in reverse): a server gone
    // first left a failed test's consumers waiting on Redis commands in stop(), and the file
    // never finished.
    const server = await startRedisServer()
    cleanups.push(() => server.stop())
    // As the worker apps configure them: a command fails after one reconnect attempt
    // instead of twenty.
    const redis = [server.url, server.url].map(
      (url) => new Redis(url, { maxRetriesPerRequest: 1 }),
    ) as [Redis, Redis]
    for (const c of redis) c.on("error", () => {})
    cleanups.push(async () => {
      for (const c of redis) c.disconnect()
    })
    await drainThroughOutage({
      t,
      stream,
      group,
      db: t.db,
      redis,
      what: "the Redis restart",
      begin: () => server.kill(),
      during: async () => {},
      end: () => server.start(),
    })
  })

  test("Postgres out of reach in the middle of draining: every effect once, in order", async () => {
    const { t, stream, group } = await site()
    // The consumers reach Postgres through a proxy the test cuts: every connection drops and
    // every reconnect fails until restore(), as when the database host goes away.
    const { proxy, db, redis } = await throughProxy(t)
    await drainThroughOutage({
      t,
      stream,
      group,
      db,
      redis: [redis, redis],
      what: "Postgres came back",
      begin: async () => proxy.cut(),
      during: async (atOutage) => {
        await sleep(1000)
        assert.equal(await effectCount(t.db), atOutage, "nothing commits without Postgres")
      },
      end: async () => proxy.restore(),
    })
  })
  test("Postgres away for many ack waits: each message is held once, and all land after", async () => {
    const { t, stream, group } = await site()
    const { proxy, db, redis } = await throughProxy(t)
    // A short ack wait, so the server redelivers what waits for the inbox several times over
    // while Postgres is away, and a small batch, so that most of it waits in the buffer.
    const consumer = createKeyedConsumer({
      group,
      stream: stream.name,
      nats: nc,
      db,
      redis,
      handlers: { "demo.item.changed.v1": recordEffect("w") },
      ackWaitMs: 500,
      maxAckPending: 60,
      ingestBatchSize: 8,
      pollIntervalMs: 300,
      recoveryIntervalMs: 300,
    })
    cleanups.push(() => consumer.stop())
    await consumer.start()
    proxy.cut()
    for (let ver = 1; ver <= 6; ver++) {
      for (let k = 0; k < 10; k++) {
        await publishEvent(nc, stream.site, { key: `k${k}`, ver, payload: { n: ver } })
      }
    }
    let most = 0
    for (let i = 0; i < 30; i++) {
      most = Math.max(most, consumer.status().ingestBuffered)
      await sleep(100)
    }
    assert.ok(most > 8, `messages waited for the inbox (at most ${most} at once)`)
    // max_ack_pending, plus the copies of the batch being stored that came again meanwhile.
    assert.ok(most <= 60 + 8, `each message held once, not once per redelivery (${most} at once)`)
    proxy.restore()
    await waitFor(async () => (await effectCount(t.db)) >= 60, {
      timeoutMs: 30_000,
      message: "every event handled after Postgres came back",
    })
    await sleep(300)
    const rows = await effects(t.db)
    assert.equal(rows.length, 60, "no effect twice")
    assert.deepEqual(checkEffects(rows).problems, [])
    assert.equal(consumer.status().ingestBuffered, 0)
  })
  test("with NATS away, the polling loop still runs what the inbox holds", async () => {
    const { t, group } = await site()
    const server = await startNatsServer()
    cleanups.push(() => server.stop())
    const privateNc = await connectNats({ servers: server.url })
    cleanups.push(() => privateNc.close())
    const stream = await createTestStream(privateNc)
    const redis = new Redis(SHARED_REDIS)
    cleanups.push(async () => redis.disconnect())
    // Wake-ups off: only the polling loop, every 8 s after its first run at start, moves keys.
    // Its next run must come after NATS is gone, with two test files on two cores: 8 s, of
    // which getting both events into the inbox may take 6.
    const consumer = createKeyedConsumer({
      group,
      stream: stream.name,
      nats: privateNc,
      db: t.db,
      redis,
      handlers: { "demo.item.changed.v1": recordEffect("w") },
      wakeOnIngest: false,
      pollIntervalMs: 8000,
      recoveryIntervalMs: 8000,
    })
    cleanups.push(() => consumer.stop())
    await consumer.start()
    // "x" first seen at version 2 has a provisional start, which polling settles with NATS.
    await publishEvent(privateNc, stream.site, { key: "x", ver: 2, payload: { n: 2 } })
    await publishEvent(privateNc, stream.site, { key: "y", ver: 1, payload: { n: 1 } })
    await waitFor(
      async () =>
        (await sql<{ n: number }>`select count(*)::int as n from keyway.inbox`.execute(t.db))
          .rows[0]!.n === 2,
      { timeoutMs: 6000, intervalMs: 20, message: "both in the inbox" },
    )
    await server.stop()
    assert.equal(await effectCount(t.db), 0, "nothing ran before NATS went away")
    await waitFor(async () => (await effectCount(t.db)) === 1, {
      timeoutMs: 25_000,
      message: "y ran on a poll while NATS was away",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.key),
      ["y"],
    )
  })
})
