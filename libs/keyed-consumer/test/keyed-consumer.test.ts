import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import { after, afterEach, before, describe, test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { createDb } from "@keyway/db"
import {
  createConsumerAdmin,
  createKeyedConsumer,
  type HandlerContext,
  type KeyedConsumer,
  type KeyedConsumerConfig,
  KeyedConsumerConfigError,
  PoisonError,
} from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { type EventEnvelope, encodeEnvelope } from "@keyway/schemas"
import { createMetricsRegistry } from "@keyway/telemetry"
import {
  createTestDatabase,
  createTestStream,
  gate,
  metricValue,
  type TestDatabase,
  waitFor,
} from "@keyway/testkit"
import { AckPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { Redis } from "ioredis"
import { sql } from "kysely"
import pg from "pg"
import {
  checkEffects,
  createEffectTable,
  effects,
  publishEvent,
  recordEffect,
  rejects,
  SHARED_NATS,
  SHARED_REDIS,
  unique,
} from "./support.ts"

/** A group's summary with one key stopped at its one dead task, and nothing else waiting. */
const ONE_KEY_BLOCKED = {
  gapKeys: 0,
  oldestGapSeconds: 0,
  deadTasks: 1,
  blockedKeys: 1,
  pendingKeys: 0,
  oldestPendingSeconds: 0,
}

describe("keyed consumer", () => {
  let nc: NatsConnection
  let redis: Redis
  const cleanups: (() => Promise<unknown>)[] = []

  before(async () => {
    nc = await connectNats({ servers: SHARED_NATS })
    redis = new Redis(SHARED_REDIS)
  })
  // After each test, not once at the end: a test's consumer left running polls its database
  // until then, and with the file's forty-odd tests their connections passed Postgres'
  // max_connections (100) while another test file ran beside this one.
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c().catch(() => {})
  })
  after(async () => {
    redis.disconnect()
    await nc.close()
  })

  /** When a task may run again, as the inbox holds it: epoch milliseconds, as Date.now(). */
  const runAfterMs = async (db: TestDatabase["db"], key: string, ver: number) =>
    (
      await sql<{ at: number }>`
        select extract(epoch from run_after)::float8 * 1000 as at
          from keyway.inbox where key = ${key} and ver = ${ver}`.execute(db)
    ).rows[0]!.at

  /** A database, a stream and a started consumer for one test. */
  async function setup(
    overrides:
      | Partial<KeyedConsumerConfig>
      | ((t: TestDatabase) => Partial<KeyedConsumerConfig>) = {},
    /** Runs before the consumer starts: what it publishes is all there for the first drain. */
    beforeStart?: (stream: { site: string; name: string }) => Promise<void>,
  ) {
    const made = await unstarted(overrides)
    await beforeStart?.(made.stream)
    await made.consumer.start()
    return made
  }

  /** As {@link setup}, the consumer not started. */
  async function unstarted(
    overrides:
      | Partial<KeyedConsumerConfig>
      | ((t: TestDatabase) => Partial<KeyedConsumerConfig>) = {},
  ) {
    const t: TestDatabase = await createTestDatabase()
    cleanups.push(() => t.drop())
    await createEffectTable(t.db)
    const stream = await createTestStream(nc)
    cleanups.push(() => stream.delete())
    const group = unique("g")
    const consumer: KeyedConsumer = createKeyedConsumer({
      group,
      stream: stream.name,
      nats: nc,
      db: t.db,
      redis,
      handlers: { "demo.item.changed.v1": recordEffect("w1") },
      pollIntervalMs: 200,
      recoveryIntervalMs: 200,
      leaseMs: 3000,
      ...(typeof overrides === "function" ? overrides(t) : overrides),
    })
    cleanups.push(() => consumer.stop())
    return { t, stream, group, consumer, admin: createConsumerAdmin({ db: t.db, group }) }
  }

  /**
   * Stores a version of a key in the group's inbox as another worker's ingest would: this
   * worker is not woken for it.
   */
  const ingestElsewhere = (
    db: TestDatabase["db"],
    group: string,
    site: string,
    key: string,
    ver: number,
  ) =>
    sql`
      select keyway.ingest(${group}, ${["demo.item"]}::text[], ${[key]}::text[],
        ${[ver]}::bigint[], ${[`${site}:other`]}::text[], ${["demo.item.changed.v1"]}::text[],
        ${[JSON.stringify({ n: ver })]}::jsonb[], ${[null]}::jsonb[],
        ${[new Date().toISOString()]}::timestamptz[], ${[999]}::bigint[])
    `.execute(db)

  /**
   * Handlers whose v1 waits, while the key is held, until released; and polling and recovery
   * an hour away, so that only wake-ups and re-checks move the key.
   */
  function holdV1() {
    const { opened: running, open: entered } = gate()
    const { opened: released, open: release } = gate()
    const config: Partial<KeyedConsumerConfig> = {
      pollIntervalMs: 3600_000,
      recoveryIntervalMs: 3600_000,
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.ver === 1) {
            entered()
            await released
          }
          await recordEffect("w1")(event, ctx)
        },
      },
    }
    return { config, running, release }
  }

  test("a skip of a parked task below where its key stands leaves the task in hand alone", async () => {
    const { opened: running, open: entered } = gate()
    const { opened: released, open: release } = gate()
    const { t, stream, consumer, admin } = await setup({
      pollIntervalMs: 3600_000,
      recoveryIntervalMs: 3600_000,
      policies: { "demo.item": { maxAttempts: 1, onDead: "park" } },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.ver === 1) throw new Error("always fails")
          if (event.ver === 3) {
            entered()
            await released
          }
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    for (let ver = 1; ver <= 3; ver++) {
      await publishEvent(nc, stream.site, { key: "pk", ver, payload: { n: ver } })
    }
    // v1 dead and parked, v2 done: the key stands at v2, and v3 runs.
    await running
    assert.equal(await admin.skip({ topic: "demo.item", key: "pk" }), 1)
    release()
    await waitFor(async () => (await effects(t.db)).length === 2, {
      timeoutMs: 10_000,
      message: "v2 and v3 handled",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver),
      [2, 3],
    )
    assert.equal(consumer.status().fenced, 0, "v3's completion was not fenced")
  })

  test("a task an operator skips while its handler runs writes nothing when the handler returns", async () => {
    const v1 = holdV1()
    const { t, stream, group, consumer, admin } = await setup(v1.config)
    await publishEvent(nc, stream.site, { key: "sk", ver: 1, payload: { n: 1 } })
    await v1.running
    assert.equal(await admin.skip({ topic: "demo.item", key: "sk", fromVer: 1, toVer: 1 }), 1)
    v1.release()
    // The skip bumped the key's epoch: the completion is fenced, and its effect rolls back
    // with it. Without the bump the completion found done_ver where it left it and committed
    // the effect of a task the operator had skipped.
    await waitFor(() => consumer.status().fenced === 1, {
      timeoutMs: 10_000,
      message: "the completion fenced",
    })
    assert.deepEqual(await effects(t.db), [])
    // Still skipped (the polling loop, an hour away here, moves the key past it).
    const row = await sql<{ state: string }>`
      select state from keyway.inbox where grp = ${group} and key = 'sk'`.execute(t.db)
    assert.deepEqual(row.rows, [{ state: "skipped" }])
  })

  test("a gap no drain has met is counted: the recovery loop dates it", async () => {
    // No drain reads the key past its gap: its wake-up lost (here, wake-ups are off), or
    // taken by a worker that found the key's lock held. The polling and recovery loops look
    // for the version after done_ver, which is missing, so none starts one either. The key
    // waited, rightly, and the gap gauge (invariant 5) said 0.
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const { stream, consumer, admin } = await setup({
      metrics,
      wakeOnIngest: false,
      pollIntervalMs: 200,
    })
    const scrape = async (name: string) => metricValue((await metrics.render()).body, name)
    await publishEvent(nc, stream.site, { key: "g", ver: 1, payload: { n: 1 } })
    await waitFor(() => consumer.status().done === 1, {
      timeoutMs: 10_000,
      message: "v1 done through polling",
    })
    // After v1's drain has ended: had it read v3, it would have dated the gap itself.
    await publishEvent(nc, stream.site, { key: "g", ver: 3, payload: { n: 3 } })
    await waitFor(() => consumer.status().ingested === 2, {
      timeoutMs: 10_000,
      message: "v3 in the inbox",
    })
    assert.equal((await admin.listGaps()).length, 1)
    await waitFor(async () => (await scrape("consumer_gap_keys")) === 1, {
      timeoutMs: 5000,
      message: "the gap counted",
    })
  })

  test("lost wake-ups: with ingest wake-ups off, the polling loop completes every task", async () => {
    // First without polling (nor recovery): the ingested tasks must wait, which shows the
    // wake-ups are off. A consumer that woke on ingest anyway would drain them at once.
    const quiet = { wakeOnIngest: false, pollIntervalMs: 3600_000, recoveryIntervalMs: 3600_000 }
    const { t, stream, group, consumer } = await setup(quiet)
    for (let ver = 1; ver <= 20; ver++) {
      for (const key of ["a", "b", "c"])
        await publishEvent(nc, stream.site, { key, ver, payload: { n: ver } })
    }
    await waitFor(() => consumer.status().ingested === 60, {
      timeoutMs: 20_000,
      message: "all 60 in the inbox",
    })
    await sleep(1000)
    assert.equal((await effects(t.db)).length, 0, "nothing ran: no wake-up, no poll yet")
    await consumer.stop()
    // Then the same group with its polling loop running: it alone finds the tasks.
    const polling = createKeyedConsumer({
      group,
      stream: stream.name,
      nats: nc,
      db: t.db,
      redis,
      handlers: { "demo.item.changed.v1": recordEffect("w1") },
      leaseMs: 3000,
      ...quiet,
      pollIntervalMs: 200,
    })
    cleanups.push(() => polling.stop())
    await polling.start()
    await waitFor(async () => (await effects(t.db)).length === 60, {
      timeoutMs: 20_000,
      message: "all 60 effects through polling",
    })
    const { byKey, problems } = checkEffects(await effects(t.db))
    assert.deepEqual(problems, [])
    assert.equal(byKey.size, 3)
    assert.equal(polling.status().ingested, 0, "nothing was left to ingest: polling ran them")
    // Counted once each completion's commit is back, after its effect shows.
    await waitFor(() => polling.status().done === 60, { timeoutMs: 10_000, message: "60 done" })
  })

  test("a task stored by another worker while this one drains the key runs after the drain, without waiting for polling", async () => {
    // The other worker's wake-up finds the key locked and is dropped; the holder re-checks
    // the key once it lets go. Polling and recovery are an hour away, so only that re-check
    // can run v2 within the wait below.
    const v1 = holdV1()
    const { t, stream, group } = await setup(v1.config)
    await publishEvent(nc, stream.site, { key: "k", ver: 1, payload: { n: 1 } })
    await v1.running
    // v2 as another worker's ingest stores it: in the inbox, unknown to this worker.
    await ingestElsewhere(t.db, group, stream.site, "k", 2)
    v1.release()
    await waitFor(async () => (await effects(t.db)).length === 2, {
      timeoutMs: 10_000,
      message: "v2 ran after the drain of v1 let go of the key",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver),
      [1, 2],
    )
  })

  test("a key woken while it drains is drained once more, not twice", async () => {
    // v2 arrives while v1's handler runs: the wake-up marks the key to drain again. Each
    // claim bumps the key's epoch, so the epoch counts drains: one for v1, one for v2. The
    // first drain's re-check must not add a third, empty one.
    const v1 = holdV1()
    const { t, stream, group, consumer } = await setup(v1.config)
    await publishEvent(nc, stream.site, { key: "k", ver: 1, payload: { n: 1 } })
    await v1.running
    await publishEvent(nc, stream.site, { key: "k", ver: 2, payload: { n: 2 } })
    await waitFor(async () => consumer.status().ingested === 2, {
      timeoutMs: 10_000,
      message: "v2 ingested while v1 runs",
    })
    v1.release()
    await waitFor(async () => (await effects(t.db)).length === 2, {
      timeoutMs: 10_000,
      message: "v1 and v2 ran",
    })
    // Room for a third drain to happen, if anything were to start one.
    await new Promise((r) => setTimeout(r, 500))
    assert.equal(consumer.status().drainingKeys, 0)
    const { rows } = await sql<{ epoch: number }>`
      select epoch from keyway.consumer_key where grp = ${group} and key = 'k'`.execute(t.db)
    assert.deepEqual(
      rows.map((r) => Number(r.epoch)),
      [2],
    )
  })

  for (const { where, present, missing } of [
    { where: "before a later version", present: [1, 3], missing: 2 },
    // A drain reads a key's versions 32 at a time (TASKS_PER_READ): v33 lies past the read
    // that ends at the missing v32.
    {
      where: "at the end of a read",
      present: [...Array.from({ length: 31 }, (_, i) => i + 1), 33],
      missing: 32,
    },
  ]) {
    test(`a gap ${where} holds the key until the missing version arrives; then the rest run in order`, async () => {
      const metrics = createMetricsRegistry({ defaultMetrics: false })
      // Published before the consumer starts, so that its first drain of the key finds every
      // present version there: a drain that began later would read past the edge.
      const { t, stream, admin } = await setup({ metrics }, async (stream) => {
        for (const ver of present)
          await publishEvent(nc, stream.site, { key: "g", ver, payload: { n: ver } })
        await publishEvent(nc, stream.site, { key: "other", ver: 1, payload: { n: 1 } })
      })
      const scrape = async (name: string) => metricValue((await metrics.render()).body, name)
      const ran = async () =>
        (await effects(t.db)).filter((e) => e.key === "g").map((e) => Number(e.ver))
      await waitFor(async () => (await scrape("consumer_gap_keys")) === 1, {
        timeoutMs: 10_000,
        message: "the gap counted",
      })
      const [gap] = await admin.listGaps()
      assert.equal(gap!.key, "g")
      assert.equal(Number(gap!.missingVer), missing)
      assert.equal(Number(gap!.nextPresentVer), missing + 1)
      // Give polling a few rounds: nothing past the gap may run.
      await new Promise((r) => setTimeout(r, 800))
      assert.deepEqual(
        await ran(),
        present.filter((v) => v < missing),
      )
      // The alert of invariant 5: one key waiting, for as long as the wait above.
      assert.equal(await scrape("consumer_gap_keys"), 1)
      assert.ok((await scrape("consumer_oldest_gap_seconds"))! >= 0.5)
      await publishEvent(nc, stream.site, { key: "g", ver: missing, payload: { n: missing } })
      await waitFor(async () => (await ran()).length === present.length + 1, {
        timeoutMs: 10_000,
        message: "the missing version and the rest ran",
      })
      assert.deepEqual(
        await ran(),
        [...present, missing].sort((a, b) => a - b),
      )
      assert.deepEqual(await admin.listGaps(), [])
      assert.equal(await scrape("consumer_gap_keys"), 0)
      assert.equal(await scrape("consumer_oldest_gap_seconds"), 0)
    })
  }

  test("consumer lag on /metrics: what the stream holds for the group and its inbox does not", async () => {
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const { t, stream, group, consumer } = await setup({ metrics })
    const lag = async () => metricValue((await metrics.render()).body, "consumer_lag_messages")
    await publishEvent(nc, stream.site, { key: "a", ver: 1, payload: { n: 1 } })
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "v1 done",
    })
    await waitFor(async () => (await lag()) === 0, { timeoutMs: 10_000, message: "lag back to 0" })
    // A stopped group falls behind by exactly what is published meanwhile: as its replacement,
    // not started yet, reports (a stopped consumer's metrics leave the registry with it).
    await consumer.stop()
    const idle = createKeyedConsumer({
      group,
      stream: stream.name,
      nats: nc,
      db: t.db,
      redis,
      handlers: {},
      metrics,
    })
    cleanups.push(() => idle.stop())
    for (let ver = 2; ver <= 6; ver++)
      await publishEvent(nc, stream.site, { key: "a", ver, payload: { n: ver } })
    assert.equal(await lag(), 5)
  })

  test("retry then success", async () => {
    const failures = new Map<number, number>()
    const { t, stream, consumer } = await setup({
      defaultPolicy: { maxAttempts: 5, backoffMs: 20 },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          // v2 fails twice, then succeeds.
          const seen = failures.get(event.ver) ?? 0
          if (event.ver === 2 && seen < 2) {
            failures.set(event.ver, seen + 1)
            throw new Error(`transient failure ${seen + 1}`)
          }
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    for (let ver = 1; ver <= 3; ver++)
      await publishEvent(nc, stream.site, { key: "r", ver, payload: { n: ver } })
    await waitFor(async () => (await effects(t.db)).length === 3, {
      timeoutMs: 10_000,
      message: "3 effects",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver),
      [1, 2, 3],
    )
    assert.equal(consumer.status().retried, 2)
    assert.equal(consumer.status().dead, 0)
  })

  test("a task waiting for its retry counts as pending, growing older, until it is done", async () => {
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const scrape = async (name: string) => metricValue((await metrics.render()).body, name)
    let failing = true
    const { t, stream, admin } = await setup({
      metrics,
      defaultPolicy: { maxAttempts: 1000, backoffMs: 50, maxBackoffMs: 100 },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          // A vendor down: the task is retried and waits between tries, its key behind it.
          if (event.key === "down" && failing) throw new Error("vendor down")
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    for (let ver = 1; ver <= 3; ver++)
      await publishEvent(nc, stream.site, { key: "down", ver, payload: { n: ver } })
    await publishEvent(nc, stream.site, { key: "up", ver: 1, payload: { n: 1 } })
    await waitFor(async () => (await effects(t.db)).some((e) => e.key === "up"), {
      timeoutMs: 10_000,
      message: "the other key done",
    })
    await waitFor(async () => (await scrape("consumer_oldest_pending_seconds"))! >= 1, {
      timeoutMs: 10_000,
      message: "the waiting task a second old",
    })
    // One key, however many of its versions wait: the next is what holds the others.
    assert.equal(await scrape("consumer_pending_keys"), 1)
    const summary = await admin.summarise()
    assert.equal(summary.pendingKeys, 1)
    assert.ok(summary.oldestPendingSeconds >= 1, `${summary.oldestPendingSeconds} s`)
    assert.equal(summary.deadTasks, 0, "retried, not dead")
    failing = false
    await waitFor(async () => (await effects(t.db)).length === 4, {
      timeoutMs: 10_000,
      message: "the key drained once the vendor is back",
    })
    assert.equal(await scrape("consumer_pending_keys"), 0)
    assert.equal(await scrape("consumer_oldest_pending_seconds"), 0)
  })

  test("a failure that says when to come back (retryAfterMs) is not tried again sooner", async () => {
    const calls: number[] = []
    let failedAt = 0
    const { t, stream, consumer } = await setup({
      defaultPolicy: { maxAttempts: 5, backoffMs: 20 },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          calls.push(event.ver)
          if (calls.length === 1) {
            failedAt = Date.now()
            // A vendor's 429 with Retry-After: 2.
            throw Object.assign(new Error("rate limited"), { retryAfterMs: 2000 })
          }
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "ra", ver: 1, payload: { n: 1 } })
    await waitFor(() => consumer.status().retried === 1, { timeoutMs: 10_000, message: "failed" })
    // Without the floor the backoff of 10-20 ms would have put it back at once.
    // Measured from the failure, not from this read, which a busy machine may delay.
    const heldMs = (await runAfterMs(t.db, "ra", 1)) - failedAt
    assert.ok(heldMs >= 1900 && heldMs <= 3000, `held ${Math.round(heldMs)} ms from the failure`)
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "the effect, after the wait",
    })
    assert.equal(calls.length, 2)
    assert.equal(consumer.status().retried, 1)
  })

  test("a retry further off than a timer can wait (24.8 days) is not woken at once", async () => {
    // Node fires a longer timeout after 1 ms: the drain it woke found the task still waiting
    // and asked again, and the key was claimed without a pause.
    const { t, stream, group } = await setup({
      defaultPolicy: { backoffMs: 5e9, maxBackoffMs: 5e9 },
      handlers: {
        "demo.item.changed.v1": async () => {
          throw new Error("not yet")
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "far", ver: 1, payload: { n: 1 } })
    const epoch = async () =>
      Number(
        (
          await sql<{ epoch: string }>`
            select epoch from keyway.consumer_key where grp = ${group} and key = 'far'`.execute(
            t.db,
          )
        ).rows[0]?.epoch ?? 0,
      )
    await waitFor(async () => (await runAfterMs(t.db, "far", 1)) > Date.now() + 86_400_000, {
      timeoutMs: 10_000,
      message: "the failure recorded, its retry days away",
    })
    const before = await epoch()
    await sleep(1500)
    assert.ok((await epoch()) - before <= 1, `claimed ${(await epoch()) - before} times in 1.5 s`)
  })

  test("a key whose task waits out a long Retry-After keeps one timer, however often it is woken", async () => {
    // The hour-long timers the consumer has set and not cleared, followed where they are made.
    const long = new Set<unknown>()
    const realSetTimeout = globalThis.setTimeout
    const realClearTimeout = globalThis.clearTimeout
    const arm = realSetTimeout as (...args: unknown[]) => NodeJS.Timeout
    globalThis.setTimeout = ((fn: unknown, ms?: unknown, ...rest: unknown[]) => {
      const timer = arm(fn, ms, ...rest)
      if (typeof ms === "number" && ms > 1_000_000) long.add(timer)
      return timer
    }) as typeof setTimeout
    globalThis.clearTimeout = ((timer: NodeJS.Timeout | undefined) => {
      long.delete(timer)
      realClearTimeout(timer)
    }) as typeof clearTimeout
    try {
      let runs = 0
      const { t, stream, consumer } = await setup({
        defaultPolicy: { maxAttempts: 5, backoffMs: 20 },
        handlers: {
          "demo.item.changed.v1": async (event, ctx) => {
            runs++
            if (event.ver === 1) {
              throw Object.assign(new Error("rate limited"), { retryAfterMs: 3600_000 })
            }
            await recordEffect("w1")(event, ctx)
          },
        },
      })
      await publishEvent(nc, stream.site, { key: "wait", ver: 1, payload: { n: 1 } })
      await publishEvent(nc, stream.site, { key: "other", ver: 1, payload: { n: 1 } })
      await waitFor(() => consumer.status().retried === 2, { timeoutMs: 10_000, message: "failed" })
      // Each later version wakes the key, and each drain finds v1 still waiting.
      for (let ver = 2; ver <= 41; ver++) {
        await publishEvent(nc, stream.site, { key: "wait", ver, payload: { n: ver } })
        await new Promise((r) => setTimeout(r, 25))
      }
      await waitFor(
        async () =>
          (
            await sql<{
              n: number
            }>`select count(*)::int as n from keyway.inbox where key = 'wait'`.execute(t.db)
          ).rows[0]!.n === 41,
        { timeoutMs: 10_000, message: "all 41 versions stored" },
      )
      await new Promise((r) => setTimeout(r, 500))
      // A timer per drain of the waiting key piled up here: 40 more.
      assert.equal(long.size, 2, `${long.size} hour-long timers`)
      assert.equal(consumer.status().retriesDue, 2)
      assert.equal(runs, 2, "v1 of each key ran once; the later versions wait behind it")
      assert.deepEqual(await effects(t.db), [])
    } finally {
      globalThis.setTimeout = realSetTimeout
      globalThis.clearTimeout = realClearTimeout
    }
  })

  test("complete() called after the handler returned is refused with that reason, and writes nothing", async () => {
    let late: Error | undefined
    const { t, stream, consumer } = await setup({
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          // A handler that forgot to await work that completes later.
          setTimeout(() => {
            recordEffect("w1")(event, ctx).catch((err: Error) => {
              late = err
            })
          }, 50)
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "late", ver: 1, payload: { n: 1 } })
    await waitFor(() => late !== undefined, { timeoutMs: 10_000, message: "the late complete()" })
    // It was blamed on another worker taking the key, which nobody had.
    assert.match(late!.message, /complete\(\) was called after the handler .* had returned/)
    // The late call is refused at once; the task's own completion is counted once its round
    // trip is back, which a loaded Postgres may make later.
    await waitFor(() => consumer.status().done === 1, { timeoutMs: 10_000, message: "done" })
    assert.equal(consumer.status().fenced, 0)
    assert.deepEqual(await effects(t.db), [])
  })

  test("a suspect that loses its key while it runs alone, its worker alive, is not charged for it", async () => {
    // The task is a suspect from the start: a worker that died running it left its run open
    // (sql/0019). It runs alone; its Redis lock goes, another worker claims the key while the
    // first run still goes on, and the first then gives up. With one attempt allowed, taking
    // the first run for lost with its worker would make the task dead.
    const group = unique("g")
    let db: TestDatabase["db"] | undefined
    let runs = 0
    const { opened: running, open: entered } = gate()
    const { opened: reclaimed, open: reclaim } = gate()
    const handlers: KeyedConsumerConfig["handlers"] = {
      "demo.item.changed.v1": async (event, ctx) => {
        if (++runs === 1) {
          entered()
          await reclaimed
          if (!ctx.signal.aborted) {
            await new Promise((r) => ctx.signal.addEventListener("abort", r, { once: true }))
          }
          throw ctx.signal.reason
        }
        await recordEffect("w2")(event, ctx)
      },
    }
    const policy = { group, defaultPolicy: { maxAttempts: 1 }, leaseMs: 1500, handlers }
    const { t, stream, consumer } = await setup(
      (t) => {
        db = t.db
        return policy
      },
      async (stream) => {
        await ingestElsewhere(db!, group, stream.site, "lost", 1)
        await sql`update keyway.consumer_key
                     set run_ver = 1, run_state = 'open', lease_until = now() - interval '1 second'
                   where grp = ${group}`.execute(db!)
      },
    )
    await running
    const epochNow = async () =>
      Number(
        (
          await sql<{ epoch: string }>`
            select epoch from keyway.consumer_key where grp = ${group}`.execute(t.db)
        ).rows[0]!.epoch,
      )
    const first = await epochNow()
    const other = createKeyedConsumer({
      ...policy,
      stream: stream.name,
      nats: nc,
      db: t.db,
      redis,
      workerId: "w2",
      pollIntervalMs: 200,
      recoveryIntervalMs: 200,
    })
    cleanups.push(() => other.stop())
    await other.start()
    assert.equal(await redis.del(`keyway:${group}:demo.item:lost`), 1)
    await waitFor(async () => (await epochNow()) > first, {
      timeoutMs: 10_000,
      message: "the other worker claimed the key",
    })
    reclaim()
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 15_000,
      message: "run again, and done",
    })
    assert.equal(runs, 2)
    assert.equal(consumer.status().dead + other.status().dead, 0)
    assert.deepEqual(
      [consumer.status().suspectRuns, other.status().suspectRuns],
      [1, 1],
      "alone both times",
    )
    const task = await sql<{ attempts: number }>`
      select attempts from keyway.inbox where grp = ${group} and key = 'lost'`.execute(t.db)
    assert.deepEqual(task.rows, [{ attempts: 1 }], "the run that completed, alone")
    await other.stop()
  })

  test("a suspect whose turn does not come, behind a run that hangs, is put off longer each time", async () => {
    // A suspect runs alone, so it waits for the runs in progress, and those that come after
    // it wait behind it. Behind a run that hangs it gives up after a lease; woken again by
    // the next poll, it stood at the head of the gate again at once, and the worker started
    // no other run for as long as the hang lasted.
    const { opened: hanging, open: hangs } = gate()
    const { opened: released, open: release } = gate()
    const putOffFor: number[] = []
    const { t, stream, group, consumer } = await setup({
      leaseMs: 600,
      pollIntervalMs: 50,
      logger: {
        info() {},
        warn: (message: string, fields?: Record<string, unknown>) => {
          if (message.includes("put off") && fields?.key === "s")
            putOffFor.push(Number(fields.forMs))
        },
        error() {},
      },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.key === "hang") {
            hangs()
            await released // its signal unheard, as a vendor call without a timeout
          }
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    // Run first (cleanups run last first): stop() waits for the hung handler.
    cleanups.push(async () => release())
    await publishEvent(nc, stream.site, { key: "hang", ver: 1, payload: { n: 1 } })
    await hanging
    // "s" v1, a run of which was lost with its worker (sql/0019): a suspect.
    await ingestElsewhere(t.db, group, stream.site, "s", 1)
    await sql`update keyway.consumer_key
                 set run_ver = 1, run_state = 'open', lease_until = now() - interval '1 second'
               where grp = ${group} and key = 's'`.execute(t.db)
    // Put off for a lease, then two, four: not each time only until the next poll, when it
    // stood at the head of the gate again.
    await waitFor(() => putOffFor.length >= 3, {
      timeoutMs: 20_000,
      message: () => `put off three times (so far ${putOffFor.join(", ")} ms)`,
    })
    assert.deepEqual(putOffFor.slice(0, 3), [600, 1200, 2400])
    release()
    await waitFor(async () => (await effects(t.db)).length === 2, {
      timeoutMs: 15_000,
      message: "both done once the hang ends",
    })
    assert.equal(consumer.status().suspectRuns, 1)
  })

  for (const thrown of ["the abort", "an error of its own"]) {
    test(`a handler whose key's Redis lock was lost and that throws ${thrown} is ${thrown === "the abort" ? "not charged an attempt" : "charged as ever"}`, async () => {
      let runs = 0
      const { opened: running, open: entered } = gate()
      const { t, stream, group, consumer, admin } = await setup({
        defaultPolicy: { maxAttempts: 1, onDead: "block" },
        leaseMs: 1500,
        handlers: {
          "demo.item.changed.v1": async (event, ctx) => {
            if (++runs === 1) {
              entered()
              await new Promise<void>((resolve) => {
                ctx.signal.addEventListener("abort", () => resolve(), { once: true })
              })
              // A poison payload that blocked the event loop past the lease fails like this.
              throw thrown === "the abort" ? ctx.signal.reason : new Error("failed on its own")
            }
            await recordEffect("w1")(event, ctx)
          },
        },
      })
      await publishEvent(nc, stream.site, { key: "lost", ver: 1, payload: { n: 1 } })
      await running
      // The lock gone from Redis (a failover, an eviction): the next extension fails.
      assert.equal(await redis.del(`keyway:${group}:demo.item:lost`), 1)
      if (thrown === "the abort") {
        await waitFor(async () => (await effects(t.db)).length === 1, {
          timeoutMs: 15_000,
          message: "run again, and done",
        })
        // With one attempt allowed, counting the lost lock as a failure made the task dead.
        assert.equal(runs, 2)
        assert.equal(consumer.status().dead, 0)
      } else {
        await waitFor(() => consumer.status().dead === 1, { timeoutMs: 15_000, message: "dead" })
        assert.match((await admin.listDead())[0]!.lastError!, /failed on its own/)
        assert.equal(runs, 1)
      }
    })
  }

  test("a completion batch that fails while stopping charges none of its keys an attempt", {
    timeout: 30_000,
  }, async () => {
    // c1 and c2 hold both completion batches in flight, so that a and b, completing next,
    // share the third. a's effects throw once stop() has been called.
    const { opened: holdersIn, open: holdersSent } = gate()
    const { opened: released, open: release } = gate()
    let holders = 0
    const { opened: pairIn, open: pairSent } = gate()
    let pair = 0
    const { t, stream, group, consumer } = await setup({
      shutdownGraceMs: 10_000,
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.key.startsWith("c")) {
            const done = ctx.complete(async (trx) => {
              await released
              await sql`insert into effect (topic, key, ver, event_id, worker)
                        values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, 'w1')`.execute(
                trx,
              )
            })
            if (++holders === 2) holdersSent()
            await done
            return
          }
          await holdersIn
          const done = ctx.complete(
            async (trx) => {
              if (event.key === "a") throw new Error("a broke")
              await sql`insert into effect (topic, key, ver, event_id, worker)
                        values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, 'w1')`.execute(
                trx,
              )
            },
            { interleave: true },
          )
          if (++pair === 2) pairSent()
          await done
        },
      },
    })
    for (const key of ["c1", "c2"])
      await publishEvent(nc, stream.site, { key, ver: 1, payload: { n: 1 } })
    await holdersIn
    for (const key of ["a", "b"])
      await publishEvent(nc, stream.site, { key, ver: 1, payload: { n: 1 } })
    await pairIn
    const stopped = consumer.stop()
    release()
    await stopped
    const rows = await sql<{ key: string; state: string; attempts: number; error: string | null }>`
      select key, state, attempts, last_error as error from keyway.inbox
       where grp = ${group} and key in ('a', 'b') order by key`.execute(t.db)
    // b was charged a's failure, with a's message; a was charged with nobody knowing it was a.
    assert.deepEqual(rows.rows, [
      { key: "a", state: "pending", attempts: 0, error: null },
      { key: "b", state: "pending", attempts: 0, error: null },
    ])
    assert.deepEqual((await effects(t.db)).map((e) => e.key).sort(), ["c1", "c2"])
  })

  test("a handler that throws while its completion is in flight: the task is done with its effects, not dead", async () => {
    const { t, stream, admin, consumer } = await setup({
      defaultPolicy: { maxAttempts: 1, onDead: "block" },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          // A notification that fails beside the completion: Promise.all rejects at once,
          // while the effects, slowed here, are still on their way to a commit.
          await Promise.all([
            ctx.complete(async (trx) => {
              await new Promise((r) => setTimeout(r, 300))
              await sql`insert into effect (topic, key, ver, event_id, worker, payload)
                        values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, 'w1', '{}')`.execute(
                trx,
              )
            }),
            Promise.reject(new Error("notification failed")),
          ])
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "c", ver: 1, payload: { n: 1 } })
    await publishEvent(nc, stream.site, { key: "c", ver: 2, payload: { n: 2 } })
    await waitFor(async () => (await effects(t.db)).length === 2, {
      timeoutMs: 10_000,
      message: "both versions' effects",
    })
    await waitFor(() => consumer.status().done === 2, { timeoutMs: 5000, message: "both done" })
    assert.deepEqual(await admin.listDead(), [], "not dead: its effects are committed")
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver),
      [1, 2],
    )
  })

  test("a lease renewal stuck on Postgres does not keep the Redis lock from being extended", async () => {
    const { opened: started, open: start } = gate()
    const { opened: finishing, open: finish } = gate()
    const { t, stream, group } = await setup({
      leaseMs: 1500,
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          start()
          await finishing
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "h", ver: 1, payload: { n: 1 } })
    await started
    // Another session holds the key's row while the handler runs: the lease renewal's update
    // waits on it, for longer than the lock's ttl.
    const { opened: holding, open: held } = gate()
    const { opened: releasing, open: release } = gate()
    const holder = t.db.transaction().execute(async (trx) => {
      await sql`select 1 from keyway.consumer_key where grp = ${group} and key = 'h' for update`.execute(
        trx,
      )
      held()
      await releasing
    })
    let ttl: number
    try {
      await holding
      await new Promise((r) => setTimeout(r, 2500))
      ttl = await redis.pttl(`keyway:${group}:demo.item:h`)
    } finally {
      release()
      await holder
      finish()
    }
    assert.ok(ttl > 0, `the key's Redis lock is still held after 2.5 s (pttl ${ttl})`)
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "the effect, once",
    })
  })

  test("throwIfLost() passes while heartbeats extend the lock past its first ttl, and throws once the handler has returned", async () => {
    let kept: HandlerContext | undefined
    let during: unknown = "not called"
    let afterReturn: unknown = "not called"
    const { opened: v2Running, open: enterV2 } = gate()
    const { opened: v2Released, open: releaseV2 } = gate()
    const { t, stream } = await setup({
      leaseMs: 2000,
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.ver === 1) {
            kept = ctx
            // Two and a half leases: held only through the heartbeat's extensions.
            await new Promise((r) => setTimeout(r, 5000))
            try {
              ctx.throwIfLost()
              during = undefined
            } catch (err) {
              during = err
            }
          } else {
            enterV2()
            await v2Released
          }
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "held", ver: 1, payload: { n: 1 } })
    await publishEvent(nc, stream.site, { key: "held", ver: 2, payload: { n: 2 } })
    await v2Running
    // The same drain holds the key, for v2 now: v1's handler, returned, holds nothing.
    try {
      kept!.throwIfLost()
      afterReturn = undefined
    } catch (err) {
      afterReturn = err
    }
    releaseV2()
    await waitFor(async () => (await effects(t.db)).length === 2, {
      timeoutMs: 15_000,
      message: "both effects",
    })
    assert.equal(during, undefined, "the key was still held 2.5 leases in")
    assert.match(
      (afterReturn as Error)?.message ?? "",
      /v1 has returned: the key is no longer held for it/,
    )
  })

  // Ended by throwIfLost(), or by a vendor call's error saying when to come back (an AIMS
  // push given up on): that one was held for its Retry-After, and the hold closed the run, so
  // the stall was never charged and the task ran, stalled and was held again, for ever.
  for (const ending of ["throwIfLost()", "an error with retryAfterMs"] as const) {
    test(`a handler that stalls its worker past the lease every time is charged for it, alone, and dies (${ending})`, {
      timeout: 60_000,
    }, async () => {
      // The event loop blocked (a render far too long, say): the lock runs out meanwhile, and
      // throwIfLost() finds it lost. Cut short and uncharged each time, it ran again at every
      // poll for ever. As a stall, its run is left to the next claim, which counts it lost with
      // its worker (sql/0019): a suspect, then alone, then charged.
      let runs = 0
      const { t, stream, admin } = await setup({
        leaseMs: 1000,
        defaultPolicy: { maxAttempts: 2 },
        handlers: {
          "demo.item.changed.v1": async (event, ctx) => {
            if (event.key === "stall") {
              runs++
              const until = performance.now() + 1500
              while (performance.now() < until) {}
              if (ending === "throwIfLost()") ctx.throwIfLost()
              throw Object.assign(new Error("no answer in time"), { retryAfterMs: 300 })
            }
            await recordEffect("w1")(event, ctx)
          },
        },
      })
      await publishEvent(nc, stream.site, { key: "stall", ver: 1, payload: { n: 1 } })
      await publishEvent(nc, stream.site, { key: "other", ver: 1, payload: { n: 1 } })
      await waitFor(async () => (await admin.listDead()).length === 1, {
        timeoutMs: 40_000,
        message: "the stalling task dead",
      })
      const [dead] = await admin.listDead()
      assert.equal(dead!.key, "stall")
      assert.match(dead!.lastError ?? "", /lost with its worker/)
      // Uncharged until it ran alone: the first stall, then alone twice (2 attempts).
      assert.ok(runs >= 3 && runs <= 4, `ran ${runs} times`)
      assert.deepEqual(
        (await effects(t.db)).map((e) => e.key),
        ["other"],
        "the other key ran; the stalling one wrote nothing",
      )
    })
  }

  test("a completion ended by Postgres during another handler's stall is not charged to its task", {
    timeout: 60_000,
  }, async () => {
    // The innocent task's completion sits in its transaction when another handler blocks the
    // event loop past the lease: Postgres ends the idle session, and the completion fails.
    // Its run is lost with the stall, as with a death, and the task, not alone then, is not
    // charged: it is done on its next run with one attempt, its own.
    const { opened: inTransaction, open: entered } = gate()
    let stalledOnce = false
    let idledOnce = false
    const { t, stream } = await setup({
      leaseMs: 1000,
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.key === "stall" && !stalledOnce) {
            stalledOnce = true
            await inTransaction
            const until = performance.now() + 1600
            while (performance.now() < until) {}
          }
          await ctx.complete(async (trx) => {
            await sql`insert into effect (topic, key, ver, event_id, worker)
                      values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, 'w1')`.execute(
              trx,
            )
            if (event.key === "innocent" && !idledOnce) {
              idledOnce = true
              entered()
              await new Promise((r) => setTimeout(r, 100))
            }
          })
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "innocent", ver: 1, payload: { n: 1 } })
    await publishEvent(nc, stream.site, { key: "stall", ver: 1, payload: { n: 1 } })
    await waitFor(async () => (await effects(t.db)).length === 2, {
      timeoutMs: 30_000,
      message: "both done",
    })
    assert.ok(idledOnce, "the innocent completion was caught in the stall")
    const [row] = (
      await sql<{ attempts: number }>`
        select attempts from keyway.inbox where key = 'innocent' and ver = 1`.execute(t.db)
    ).rows
    assert.equal(row!.attempts, 1, "one attempt: the run that completed")
    assert.deepEqual((await effects(t.db)).map((e) => e.key).sort(), ["innocent", "stall"])
  })

  test("a completion left idle in its transaction past the lease gives its keys' rows back", async () => {
    // An effect idle in the shared transaction holds every row the completion locked: a
    // worker stopped there held them for as long as it stayed stopped, and every other
    // worker's claim of those keys waited. Here the effect sleeps instead (on its first
    // attempt only), which Postgres sees the same way.
    const { opened: idling, open: idle } = gate()
    const { t, stream, group } = await setup({
      leaseMs: 1000,
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          await ctx.complete(async (trx) => {
            await sql`insert into effect (topic, key, ver, event_id, worker)
                      values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, 'w1')`.execute(
              trx,
            )
            if (event.attempt === 1) {
              idle()
              // Longer than the lock_timeout below plus any lateness in starting it: without
              // the bound, the row stays held through the whole wait.
              await new Promise((r) => setTimeout(r, 8000))
            }
          })
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "idle", ver: 1, payload: { n: 1 } })
    await idling
    // Another session, as another worker's claim: it gets the key's row well before the
    // effect wakes.
    const got = await t.db.transaction().execute(async (trx) => {
      await sql`select set_config('lock_timeout', '3000ms', true)`.execute(trx)
      return sql`select 1 from keyway.consumer_key
                  where grp = ${group} and key = 'idle' for update`
        .execute(trx)
        .then(
          (r) => r.rows.length,
          (err: Error & { code?: string }) => err.code,
        )
    })
    assert.equal(got, 1, "the row was given back (55P03: still held past 3 s)")
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 20_000,
      message: "done on a later attempt, its effect once",
    })
  })

  test("an effect stuck on a row held elsewhere fails its attempt within a lease, and is retried", async () => {
    const { t, stream, group } = await setup({
      leaseMs: 1500,
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          await ctx.complete(async (trx) => {
            await sql`update blocker set n = n + 1 where id = 1`.execute(trx)
            await sql`insert into effect (topic, key, ver, event_id, worker)
                      values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, 'w1')`.execute(
              trx,
            )
          })
        },
      },
    })
    await sql`create table blocker (id int primary key, n int not null)`.execute(t.db)
    await sql`insert into blocker values (1, 0)`.execute(t.db)
    const { opened: holding, open: held } = gate()
    const { opened: releasing, open: release } = gate()
    const holder = t.db.transaction().execute(async (trx) => {
      await sql`select 1 from blocker where id = 1 for update`.execute(trx)
      held()
      await releasing
    })
    try {
      await holding
      await publishEvent(nc, stream.site, { key: "stuck", ver: 1, payload: { n: 1 } })
      // Before, the effect waited for the row as long as it was held: no attempt failed.
      await waitFor(
        async () =>
          (
            await sql<{ attempts: number; last_error: string | null }>`
              select attempts, last_error from keyway.inbox
               where grp = ${group} and key = 'stuck' and ver = 1`.execute(t.db)
          ).rows.some((r) => r.attempts >= 1 && /statement timeout/.test(r.last_error ?? "")),
        { timeoutMs: 20_000, message: "the attempt failed on the statement timeout" },
      )
    } finally {
      release()
      await holder
    }
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 30_000,
      message: "the effect, once the row is free",
    })
  })

  test("a gap closed by a version that dies is counted as a dead task, no longer as a gap", async () => {
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const scrape = async (name: string) => metricValue((await metrics.render()).body, name)
    const { stream, admin } = await setup({
      metrics,
      defaultPolicy: { maxAttempts: 1, onDead: "block" },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.ver === 2) throw new Error("no")
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "g", ver: 1, payload: { n: 1 } })
    await publishEvent(nc, stream.site, { key: "g", ver: 3, payload: { n: 3 } })
    await waitFor(async () => (await scrape("consumer_gap_keys")) === 1, {
      timeoutMs: 10_000,
      message: "the gap counted",
    })
    await publishEvent(nc, stream.site, { key: "g", ver: 2, payload: { n: 2 } })
    await waitFor(async () => (await admin.listDead()).length === 1, {
      timeoutMs: 10_000,
      message: "v2 dead",
    })
    // v3 waits behind the dead v2: blocked, not pending.
    assert.deepEqual(await admin.summarise(), ONE_KEY_BLOCKED)
    assert.equal(await scrape("consumer_gap_keys"), 0)
  })

  test("an error whose text Postgres cannot store (a NUL byte) still counts: retried, then dead with its text", async () => {
    let calls = 0
    const { stream, admin } = await setup({
      defaultPolicy: { maxAttempts: 2, backoffMs: 10, onDead: "block" },
      handlers: {
        "demo.item.changed.v1": async () => {
          calls++
          // A vendor's answer echoed in the message, binary and all.
          throw new Error("vendor said \u0000\u0001 garbage")
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "nul", ver: 1, payload: { n: 1 } })
    await waitFor(async () => (await admin.listDead()).length === 1, {
      timeoutMs: 10_000,
      message: () => `dead after 2 attempts; the handler ran ${calls} times`,
    })
    const [dead] = await admin.listDead()
    assert.equal(dead!.attempts, 2)
    assert.equal(dead!.lastError, "vendor said \\u0000\u0001 garbage")
    assert.equal(calls, 2, "two attempts, not one per poll for ever")
  })

  // The timeout turns a stop() that never returns (a handler not aborted) into a failure.
  test("stop() lets a running handler finish; one still running after the grace period is aborted, and its task stays pending", {
    timeout: 30_000,
  }, async () => {
    let entered = 0
    const { opened: bothRunning, open: allEntered } = gate()
    const { opened: quickMayFinish, open: finishQuick } = gate()
    // What happened, in order: the quick handler's finish (and whether its signal had been
    // aborted by then) and the slow handler's abort.
    const happened: string[] = []
    const reasons: unknown[] = []
    const { t, stream, consumer, group } = await setup({
      // Long beside the 100 ms the quick handler still takes once stop() is called.
      shutdownGraceMs: 2000,
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (++entered === 2) allEntered()
          if (event.key === "quick") {
            await quickMayFinish
            happened.push(`quick finished, aborted=${ctx.signal.aborted}`)
            await recordEffect("w1")(event, ctx)
            return
          }
          // "slow" never finishes on its own: only its signal ends it.
          if (!ctx.signal.aborted) {
            await new Promise<void>((resolve) => {
              ctx.signal.addEventListener("abort", () => resolve(), { once: true })
            })
          }
          happened.push("slow aborted")
          reasons.push(ctx.signal.reason)
          throw ctx.signal.reason
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "quick", ver: 1, payload: { n: 1 } })
    for (let ver = 1; ver <= 2; ver++)
      await publishEvent(nc, stream.site, { key: "slow", ver, payload: { n: ver } })
    await bothRunning
    const stopped = consumer.stop()
    setTimeout(finishQuick, 100)
    await stopped
    assert.deepEqual(happened, ["quick finished, aborted=false", "slow aborted"])
    assert.match(String((reasons[0] as Error).message), /shutting down/)
    // The quick key's task finished during the grace period; the slow key's v1 did not
    // complete, and its v2 did not start behind it.
    assert.deepEqual(
      (await effects(t.db)).map((e) => `${e.key}:${e.ver}`),
      ["quick:1"],
    )
    assert.equal(entered, 2)
    // Being stopped is not a failure: v1 waits for the next worker with no attempt counted.
    const slow = await sql<{ state: string; attempts: number; error: string | null }>`
      select state, attempts, last_error as error from keyway.inbox
       where grp = ${group} and key = 'slow' and ver = 1`.execute(t.db)
    assert.deepEqual(slow.rows, [{ state: "pending", attempts: 0, error: null }])
    // Nor a run lost with its worker: the run its claim opened is closed (sql/0019), so the
    // next worker neither counts it nor runs the task as a suspect, alone.
    const run = await sql<{ run_ver: number; run_state: string | null }>`
      select run_ver::int, run_state from keyway.consumer_key
       where grp = ${group} and key = 'slow'`.execute(t.db)
    assert.deepEqual(run.rows, [{ run_ver: 1, run_state: null }])
  })

  test("a handler cut short by stop() that says when its call may still land holds its task until then, uncharged", {
    timeout: 30_000,
  }, async () => {
    const { opened: running, open: started } = gate()
    const { t, stream, consumer, group } = await setup({
      shutdownGraceMs: 200,
      handlers: {
        "demo.item.changed.v1": async (_event, ctx) => {
          started()
          await new Promise<void>((resolve) => {
            ctx.signal.addEventListener("abort", () => resolve(), { once: true })
          })
          // As the ESL worker's AIMS client says of a push it had sent when aborted.
          throw Object.assign(
            new Error("push given up, maybe sent", { cause: ctx.signal.reason }),
            {
              retryAfterMs: 60_000,
            },
          )
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "sent", ver: 1, payload: { n: 1 } })
    await running
    await consumer.stop()
    const row = await sql<{ state: string; attempts: number; error: string; held_s: number }>`
      select state, attempts, last_error as error,
             extract(epoch from run_after - now())::float8 as held_s
        from keyway.inbox where grp = ${group} and key = 'sent' and ver = 1`.execute(t.db)
    const task = row.rows[0]!
    assert.equal(task.state, "pending")
    assert.equal(task.attempts, 0, "being stopped is not a failure")
    assert.match(task.error, /^cut short, held for what it sent: push given up, maybe sent/)
    assert.ok(task.held_s > 30 && task.held_s <= 60, `held for the minute asked (${task.held_s} s)`)
  })

  for (const interleave of [false, true]) {
    test(`effects that fail inside a shared completion transaction fail alone; the rest commit once (interleave: ${interleave})`, async () => {
      // Completions of keys that finish together share one transaction. Here one handler's
      // effects write a row and then throw, on the event's first attempt: the shared transaction
      // rolls back, the others are completed again on their own, and only the failing event is
      // retried. Interleaved, the other effects' statements are on the wire with it.
      let failed = false
      const { t, stream, consumer } = await setup({
        defaultPolicy: { maxAttempts: 5, backoffMs: 20 },
        handlers: {
          "demo.item.changed.v1": async (event, ctx) => {
            await ctx.complete(
              async (trx) => {
                await sql`insert into effect (topic, key, ver, event_id, worker)
                      values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, 'w1')`.execute(
                  trx,
                )
                if (event.key === "k7" && event.ver === 2 && event.attempt === 1) {
                  failed = true
                  throw new Error("effects failed after writing")
                }
              },
              { interleave },
            )
          },
        },
      })
      const keys = Array.from({ length: 40 }, (_, n) => `k${n}`)
      for (let ver = 1; ver <= 5; ver++)
        await Promise.all(
          keys.map((key) => publishEvent(nc, stream.site, { key, ver, payload: { n: ver } })),
        )
      await waitFor(async () => (await effects(t.db)).length >= 200, {
        timeoutMs: 20_000,
        message: "200 effects",
      })
      await new Promise((r) => setTimeout(r, 300)) // a duplicate would show up by now
      const rows = await effects(t.db)
      const { byKey, problems } = checkEffects(rows)
      assert.deepEqual(problems, [])
      assert.equal(rows.length, 200)
      assert.equal(byKey.size, 40)
      assert.ok(failed)
      assert.equal(consumer.status().retried, 1)
      assert.equal(consumer.status().done, 200)
    })
  }

  test("effects that read a shared row and write it back run one after another: no update lost", async () => {
    // What the default protects: each effect reads a counter, locking it against the other
    // completion transaction in flight, and writes it back plus one. Had the keys' effects
    // interleaved in their shared transaction, two would read the same value and one
    // increment would be lost: a transaction's own row lock does not keep it from itself.
    const { t, stream, consumer } = await setup({
      handlers: {
        "demo.item.changed.v1": async (_event, ctx) => {
          await ctx.complete(async (trx) => {
            const { rows } = await sql<{ n: number }>`select n from counter for update`.execute(trx)
            await sql`update counter set n = ${rows[0]!.n + 1}`.execute(trx)
          })
        },
      },
    })
    await sql`create table counter (n int not null)`.execute(t.db)
    await sql`insert into counter values (0)`.execute(t.db)
    const keys = Array.from({ length: 60 }, (_, n) => `c${n}`)
    await Promise.all(
      keys.map((key) => publishEvent(nc, stream.site, { key, ver: 1, payload: { n: 1 } })),
    )
    await waitFor(() => consumer.status().done === 60, {
      timeoutMs: 20_000,
      message: "60 events done",
    })
    const { rows } = await sql<{ n: number }>`select n from counter`.execute(t.db)
    assert.equal(rows[0]!.n, 60)
  })

  test("max attempts then dead, policy block: later versions wait until an admin retry", async () => {
    let broken = true
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const gauge = async (name: string) => metricValue((await metrics.render()).body, name)
    const { t, stream, admin } = await setup({
      metrics,
      defaultPolicy: { maxAttempts: 3, backoffMs: 10, onDead: "block" },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.ver === 2 && broken) throw new Error("vendor says no")
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    for (let ver = 1; ver <= 4; ver++)
      await publishEvent(nc, stream.site, { key: "b", ver, payload: { n: ver } })
    await publishEvent(nc, stream.site, { key: "free", ver: 1, payload: { n: 1 } })
    await waitFor(async () => (await admin.listDead()).length === 1, {
      timeoutMs: 10_000,
      message: "dead",
    })
    const [dead] = await admin.listDead()
    assert.equal(dead!.key, "b")
    assert.equal(Number(dead!.ver), 2)
    assert.equal(dead!.attempts, 3)
    assert.equal(dead!.lastError, "vendor says no")
    assert.equal(dead!.blocking, true)
    assert.deepEqual(
      (await admin.listBlocked()).map((b) => [b.key, Number(b.ver)]),
      [["b", 2]],
    )
    assert.equal(await gauge("consumer_dead_tasks"), 1)
    assert.equal(await gauge("consumer_blocked_keys"), 1)
    assert.deepEqual(
      await admin.summarise(),
      ONE_KEY_BLOCKED,
      "the admin's summary says what the metrics say",
    )
    await new Promise((r) => setTimeout(r, 600))
    assert.deepEqual(
      (await effects(t.db)).filter((e) => e.key === "b").map((e) => e.ver),
      [1],
      "v3 and v4 wait behind the dead v2",
    )
    assert.ok(
      (await effects(t.db)).some((e) => e.key === "free"),
      "other keys are not held up",
    )
    broken = false
    assert.equal(await admin.retry({ topic: "demo.item", key: "b" }), 1)
    await waitFor(async () => (await effects(t.db)).filter((e) => e.key === "b").length === 4, {
      timeoutMs: 10_000,
      message: "key resumed after retry",
    })
    assert.deepEqual(
      (await effects(t.db)).filter((e) => e.key === "b").map((e) => e.ver),
      [1, 2, 3, 4],
    )
    assert.deepEqual(await admin.listDead(), [])
    assert.equal(await gauge("consumer_dead_tasks"), 0, "the retry took the task out of dead")
    assert.equal(await gauge("consumer_blocked_keys"), 0)
    assert.equal((await admin.summarise()).deadTasks, 0)
  })

  test("max attempts then dead, policy park: later versions run and the dead task stays listed", async () => {
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const { t, stream, admin, consumer } = await setup({
      metrics,
      policies: { "demo.item": { maxAttempts: 2, backoffMs: 10, onDead: "park" } },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.ver === 2) throw new Error("always fails")
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    // v1 from a site whose clock runs an hour ahead of this worker's.
    const ahead = { createdAt: new Date(Date.now() + 3600_000).toISOString() }
    for (let ver = 1; ver <= 4; ver++)
      await publishEvent(nc, stream.site, {
        key: "p",
        ver,
        payload: { n: ver },
        raw: ver === 1 ? ahead : {},
      })
    await waitFor(async () => (await effects(t.db)).length === 3, {
      timeoutMs: 10_000,
      message: "3 effects",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver),
      [1, 3, 4],
    )
    const dead = await admin.listDead()
    assert.equal(dead.length, 1)
    assert.equal(Number(dead[0]!.ver), 2)
    assert.equal(dead[0]!.blocking, false)
    assert.deepEqual(await admin.listBlocked(), [])
    assert.equal(consumer.status().dead, 1)
    // The same counts on /metrics (DESIGN.md §7), once v4's completion is back: its effect
    // shows at its commit, and it is counted and timed after.
    const timed = async () =>
      metricValue((await metrics.render()).body, "consumer_commit_to_done_seconds_count")
    await waitFor(async () => (await timed()) === 3, { timeoutMs: 10_000, message: "3 timed" })
    const body = (await metrics.render()).body
    const value = (name: string) => metricValue(body, name)
    assert.equal(value("consumer_ingested_total"), 4)
    assert.equal(value("consumer_done_total"), 3)
    assert.equal(value("consumer_retried_total"), 1)
    assert.equal(value("consumer_dead_total"), 1)
    assert.equal(value("consumer_commit_to_done_seconds_count"), 3)
    // Counted as no time rather than as an hour less: it would pull every quantile down.
    assert.ok(value("consumer_commit_to_done_seconds_sum")! >= 0)
    // Each handler attempt is one run step: v1, v2 twice, v3, v4. With one worker every drain
    // gets the lock, so each that started waited, locked, claimed and released once: at least
    // the first drain and the retry's. Read once no drain is in flight.
    await waitFor(() => consumer.status().drainingKeys === 0, {
      timeoutMs: 5000,
      message: "drains over",
    })
    const steps = (await metrics.render()).body
    const step = (name: string) =>
      metricValue(steps, `consumer_drain_step_seconds_count{step="${name}"}`)!
    assert.equal(step("run"), 5)
    const drains = step("wait")
    assert.ok(drains >= 2, `the first drain and the retry's: ${drains}`)
    for (const name of ["lock", "claim", "release"]) assert.equal(step(name), drains, name)
    assert.equal(value("consumer_dead_tasks"), 1, "parked: listed and counted")
    assert.equal(value("consumer_blocked_keys"), 0, "but blocks nothing")
    // An operator deleting the row by hand (retention never deletes dead rows) uncounts it.
    await sql`delete from keyway.inbox where state = 'dead'`.execute(t.db)
    assert.equal(metricValue((await metrics.render()).body, "consumer_dead_tasks"), 0)
  })

  test("policy park: a last failure that says when to come back holds its key until then", async () => {
    // A push given up without an answer may still be applied until then (the ESL worker's
    // AIMS), and a Retry-After is the vendor's for the next version's call as well.
    const ran: number[] = []
    let diedAt = 0
    const { t, stream, admin, consumer } = await setup({
      policies: { "demo.item": { maxAttempts: 1, onDead: "park" } },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.key === "h") ran.push(event.ver)
          if (event.ver === 1) {
            if (event.key === "h") diedAt = Date.now()
            throw Object.assign(new Error("no answer in time"), { retryAfterMs: 2500 })
          }
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "h", ver: 1, payload: { n: 1 } })
    await publishEvent(nc, stream.site, { key: "h", ver: 2, payload: { n: 2 } })
    // Held as well, with nothing behind it: nothing of "solo" waits.
    await publishEvent(nc, stream.site, { key: "solo", ver: 1, payload: { n: 1 } })
    await waitFor(() => consumer.status().dead === 2, { timeoutMs: 10_000, message: "v1s dead" })
    // Held until the time asked, 2.5 s from its death: v2 waits for that.
    const heldMs = (await runAfterMs(t.db, "h", 1)) - diedAt
    assert.ok(heldMs >= 2400 && heldMs <= 3500, `held ${Math.round(heldMs)} ms from its death`)
    // Held: listed as in the key's way, and not as blocked for good.
    const [dead] = await admin.listDead()
    assert.equal(Number(dead!.ver), 1)
    assert.equal(dead!.blocking, true)
    assert.deepEqual(await admin.listBlocked(), [])
    // And its later versions wait, as behind a pending task: h's v2, not solo.
    assert.equal((await admin.summarise()).pendingKeys, 1)
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "v2 done once the hold is over",
    })
    assert.deepEqual(ran, [1, 2])
    assert.equal((await admin.listDead())[0]!.blocking, false, "the key moved past it, still dead")
  })

  test("policy park: an operator's skip of a held dead task keeps the hold; the next version waits for it", async () => {
    // Skipping gives up on the task, not on the wait for its call, which may still land.
    let v2StartedAt = 0
    const { t, stream, admin, consumer } = await setup({
      policies: { "demo.item": { maxAttempts: 1, onDead: "park" } },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.ver === 1) {
            throw Object.assign(new Error("no answer in time"), { retryAfterMs: 2500 })
          }
          v2StartedAt = Date.now()
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "hs", ver: 1, payload: { n: 1 } })
    await waitFor(() => consumer.status().dead === 1, { timeoutMs: 10_000, message: "v1 dead" })
    const holdEnds = await runAfterMs(t.db, "hs", 1)
    assert.equal(await admin.skip({ topic: "demo.item", key: "hs", fromVer: 1, toVer: 1 }), 1)
    // Its ingest wakes the key at once: the drain meets the skipped v1 before the hold ends.
    await publishEvent(nc, stream.site, { key: "hs", ver: 2, payload: { n: 2 } })
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "v2 done once the hold is over",
    })
    assert.ok(
      v2StartedAt >= holdEnds - 50,
      `v2 ran ${holdEnds - v2StartedAt} ms before the hold it was behind ended`,
    )
  })

  test("policy park, after a retry of one dead version: the key walks past the others still dead", async () => {
    const failing = new Set([2, 4])
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    // What each run was told of later versions already done: [ver, supersededBy].
    const told: [number, number | undefined][] = []
    const { t, stream, group, admin } = await setup({
      metrics,
      // The policy comes from the default, with another topic listed as the exception: the
      // walk and the polling loop must both read it that way.
      defaultPolicy: { maxAttempts: 1, onDead: "park" },
      policies: { "other.topic": { onDead: "block" } },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          told.push([event.ver, event.supersededBy])
          if (failing.has(event.ver)) throw new Error(`v${event.ver} fails`)
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    for (let ver = 1; ver <= 6; ver++)
      await publishEvent(nc, stream.site, { key: "p", ver, payload: { n: ver } })
    const doneVer = async () =>
      Number(
        (
          await sql<{ done_ver: number }>`
            select done_ver from keyway.consumer_key where grp = ${group} and key = 'p'`.execute(
            t.db,
          )
        ).rows[0]?.done_ver,
      )
    await waitFor(async () => (await doneVer()) === 6, { timeoutMs: 10_000, message: "v6" })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver),
      [1, 3, 5, 6],
    )
    failing.delete(2)
    assert.equal(await admin.retry({ topic: "demo.item", key: "p", fromVer: 2, toVer: 2 }), 1)
    // The retry rewound the key to v1: v2 runs, then the walk passes v3, v4 (still dead) and
    // v5, v6 without running them. Stopping at v4 would leave done_ver at 3 for good.
    await waitFor(async () => (await doneVer()) === 6, {
      timeoutMs: 10_000,
      message: "the key back at v6 after the retry",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver).sort((a, b) => a - b),
      [1, 2, 3, 5, 6],
      "v2 ran once, nothing else ran again",
    )
    // The first runs were told of nothing; the retried v2 that v6 had run after it (v4, still
    // dead, never ran). A handler whose tasks each carry the key's whole state skips it.
    assert.deepEqual(told, [
      [1, undefined],
      [2, undefined],
      [3, undefined],
      [4, undefined],
      [5, undefined],
      [6, undefined],
      [2, 6],
    ])
    const dead = await admin.listDead()
    assert.deepEqual(
      dead.map((d) => [Number(d.ver), d.attempts, d.blocking]),
      [[4, 1, false]],
      "v4 still dead, with its one attempt, and blocking nothing",
    )
    assert.deepEqual(await admin.listBlocked(), [])
    assert.equal(metricValue((await metrics.render()).body, "consumer_dead_tasks"), 1)

    // A drain cut off right before the dead v4 (a crash, a lost lock) leaves the key standing
    // there. The polling and recovery loops must take such a key up again. Made here by hand,
    // then a v7 stored as another worker's ingest would: only a drain of the key runs it.
    await sql`
      update keyway.consumer_key set done_ver = 3, epoch = epoch + 1
       where grp = ${group} and key = 'p'`.execute(t.db)
    await ingestElsewhere(t.db, group, stream.site, "p", 7)
    await waitFor(async () => (await doneVer()) === 7, {
      timeoutMs: 10_000,
      message: "the polling loop took the key up at the parked v4",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver).sort((a, b) => a - b),
      [1, 2, 3, 5, 6, 7],
    )
  })

  test("admin skip moves a blocked key past its dead task; redrive runs a range again in order", async () => {
    let v2Failed = false
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const gauge = async (name: string) => metricValue((await metrics.render()).body, name)
    const told: (number | undefined)[] = []
    const { t, stream, admin } = await setup({
      metrics,
      defaultPolicy: { maxAttempts: 1, onDead: "block" },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          told.push(event.supersededBy)
          if (event.ver === 2 && !v2Failed) {
            v2Failed = true
            throw new Error("v2 fails once")
          }
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    for (let ver = 1; ver <= 4; ver++)
      await publishEvent(nc, stream.site, { key: "s", ver, payload: { n: ver } })
    await waitFor(async () => (await admin.listBlocked()).length === 1, {
      timeoutMs: 10_000,
      message: "blocked",
    })
    assert.equal(await gauge("consumer_blocked_keys"), 1)
    assert.equal(await admin.skip({ topic: "demo.item", key: "s", fromVer: 2, toVer: 2 }), 1)
    assert.equal(await gauge("consumer_dead_tasks"), 0, "skipped is no longer dead")
    assert.equal(await gauge("consumer_blocked_keys"), 0)
    await waitFor(async () => (await effects(t.db)).length === 3, {
      timeoutMs: 10_000,
      message: "v3, v4 ran",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver),
      [1, 3, 4],
      "v2 skipped, not run",
    )
    // Redrive versions 2..4: the skipped v2 runs now (its first failure is history), then 3, 4.
    assert.equal(await admin.redrive({ topic: "demo.item", key: "s", fromVer: 2, toVer: 4 }), 3)
    await waitFor(async () => (await effects(t.db)).length === 6, {
      timeoutMs: 10_000,
      message: "redriven",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.ver),
      [1, 3, 4, 2, 3, 4],
    )
    // Up to the newest version, nothing done lies above the range. Below it, v4 does.
    assert.deepEqual(new Set(told), new Set([undefined]))
    assert.equal(await admin.redrive({ topic: "demo.item", key: "s", fromVer: 2, toVer: 3 }), 2)
    await waitFor(async () => (await effects(t.db)).length === 8, {
      timeoutMs: 10_000,
      message: "redriven below the newest",
    })
    assert.deepEqual(told.slice(-2), [4, 4])
    // Up to the newest again: v4 runs after v2 and v3, so nothing supersedes them, whatever
    // the redrive before recorded.
    assert.equal(await admin.redrive({ topic: "demo.item", key: "s", fromVer: 2, toVer: 4 }), 3)
    await waitFor(async () => (await effects(t.db)).length === 11, {
      timeoutMs: 10_000,
      message: "redriven to the newest again",
    })
    assert.deepEqual(told.slice(-3), [undefined, undefined, undefined])
  })

  test("retention deletes finished inbox rows past their age and keeps dead and pending ones", async () => {
    const { t, stream, admin } = await setup({
      retentionMs: 1, // everything finished is old enough at once
      pruneIntervalMs: 100,
      recoveryIntervalMs: 100,
      defaultPolicy: { maxAttempts: 1, onDead: "block" },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.key === "dead") throw new Error("no")
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    for (let ver = 1; ver <= 3; ver++)
      await publishEvent(nc, stream.site, { key: "old", ver, payload: { n: ver } })
    await publishEvent(nc, stream.site, { key: "dead", ver: 1, payload: { n: 1 } })
    await publishEvent(nc, stream.site, { key: "dead", ver: 2, payload: { n: 2 } })
    await waitFor(
      async () => (await effects(t.db)).length === 3 && (await admin.listDead()).length === 1,
      {
        timeoutMs: 10_000,
        message: "three done, one dead",
      },
    )
    await waitFor(
      async () => (await t.db.selectFrom("keyway.inbox").select("key").execute()).length === 2,
      { timeoutMs: 10_000, message: "the finished rows pruned" },
    )
    const left = await t.db
      .selectFrom("keyway.inbox")
      .select(["key", "ver", "state"])
      .orderBy("ver")
      .execute()
    assert.deepEqual(
      left.map((r) => `${r.key}${r.ver}:${r.state}`),
      ["dead1:dead", "dead2:pending"],
    )
  })

  test("rejects past their retention are deleted; newer ones and other groups' stay", async () => {
    const { t, group } = await setup({
      rejectRetentionMs: 24 * 3600_000,
      pruneIntervalMs: 100,
      recoveryIntervalMs: 100,
    })
    await sql`
      insert into keyway.inbox_reject (grp, stream_seq, subject, reason, data, received_at)
      values (${group}, 1, 's.x', 'not JSON', '\\x00', now() - interval '25 hours'),
             (${group}, 2, 's.x', 'not JSON', '\\x00', now() - interval '23 hours'),
             ('another-group', 1, 's.x', 'not JSON', '\\x00', now() - interval '25 hours')
    `.execute(t.db)
    const left = async () =>
      (
        await sql<{ g: string; seq: number }>`
          select grp as g, stream_seq as seq from keyway.inbox_reject order by grp, stream_seq`.execute(
          t.db,
        )
      ).rows.map((r) => `${r.g === group ? "ours" : r.g}:${r.seq}`)
    await waitFor(async () => !(await left()).includes("ours:1"), {
      timeoutMs: 10_000,
      message: "the old reject deleted",
    })
    assert.deepEqual(await left(), ["another-group:1", "ours:2"])
  })

  test("retention keeps finished rows above where their key stands: one skipped ahead of a dead version is stepped over after the retry", async () => {
    let broken = true
    const { t, stream, admin } = await setup({
      retentionMs: 1,
      pruneIntervalMs: 100,
      recoveryIntervalMs: 100,
      defaultPolicy: { maxAttempts: 1, onDead: "block" },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          if (event.key === "b" && event.ver === 2 && broken) throw new Error("no")
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    for (let ver = 1; ver <= 4; ver++)
      await publishEvent(nc, stream.site, { key: "b", ver, payload: { n: ver } })
    await waitFor(async () => (await admin.listDead()).length === 1, {
      timeoutMs: 10_000,
      message: "b v2 dead",
    })
    // The operator decides ahead of time that v3 must not run; the key still stands at v1.
    assert.equal(await admin.skip({ topic: "demo.item", key: "b", fromVer: 3, toVer: 3 }), 1)
    // A row finished after the skip and pruned: a prune pass ran with b v3 skipped and old.
    await publishEvent(nc, stream.site, { key: "c", ver: 1, payload: { n: 1 } })
    const inbox = async () =>
      (await t.db.selectFrom("keyway.inbox").select(["key", "ver", "state"]).execute())
        .map((r) => `${r.key}${r.ver}:${r.state}`)
        .sort()
    await waitFor(
      async () =>
        (await effects(t.db)).some((e) => e.key === "c") && !(await inbox()).includes("c1:done"),
      { timeoutMs: 10_000, message: "c v1 handled and pruned" },
    )
    assert.deepEqual(await inbox(), ["b2:dead", "b3:skipped", "b4:pending"])
    broken = false
    assert.equal(await admin.retry({ topic: "demo.item", key: "b" }), 1)
    await waitFor(async () => (await effects(t.db)).filter((e) => e.key === "b").length === 3, {
      timeoutMs: 10_000,
      message: "b resumed past the skipped v3",
    })
    assert.deepEqual(
      (await effects(t.db)).filter((e) => e.key === "b").map((e) => e.ver),
      [1, 2, 4],
    )
  })

  test("retention keeps the inbox's storage bounded: the space of pruned rows is reused", async () => {
    const { t, stream } = await setup({
      retentionMs: 1,
      pruneIntervalMs: 100,
      recoveryIntervalMs: 100,
      vacuumEvery: 500,
    })
    // Whether autovacuum runs, and when, is the server's business (this project's shared
    // server has it off): retention must not depend on it.
    await sql`alter table keyway.inbox set (autovacuum_enabled = false)`.execute(t.db)
    const versions = new Map<string, number>()
    const sizes: number[] = []
    let published = 0
    for (let wave = 1; wave <= 10; wave++) {
      for (let chunk = 0; chunk < 10; chunk++) {
        await Promise.all(
          Array.from({ length: 100 }, (_, i) => {
            const key = `k${i % 50}`
            const ver = (versions.get(key) ?? 0) + 1
            versions.set(key, ver)
            return publishEvent(nc, stream.site, { key, ver, payload: { n: ver } })
          }),
        )
      }
      published += 1000
      await waitFor(async () => (await effects(t.db)).length === published, {
        timeoutMs: 60_000,
        message: () => `wave ${wave}: ${published} effects`,
      })
      await waitFor(
        async () => (await t.db.selectFrom("keyway.inbox").select("key").execute()).length === 0,
        { timeoutMs: 30_000, message: () => `wave ${wave}: every finished row pruned` },
      )
      const r = await sql<{
        bytes: number
      }>`select pg_total_relation_size('keyway.inbox')::float8 as bytes`.execute(t.db)
      sizes.push(r.rows[0]!.bytes)
    }
    // Without a vacuum the freed space is never handed out again: each wave's rows land in
    // new pages, and every wave grows the table and its indexes by about as much (measured:
    // 524288 bytes after the first wave, then 350,000-385,000 more after each of the nine
    // others). With it the size stops growing after the first waves, but not every wave: one
    // that ends before its vacuum has run, or whose vacuum meets a snapshot still holding the
    // pruned rows, can grow by a wave's worth (a fresh-clone CI run on a busy machine: one
    // wave of nine grew by 483,328 bytes, the others by 0-155,648). So the check counts the
    // waves that grew by more than half the first one's size: all nine without a vacuum.
    const grew = sizes.slice(1).filter((size, i) => size - sizes[i]! > sizes[0]! / 2).length
    assert.ok(grew <= 2, `inbox bytes after each wave: ${sizes.join(", ")}`)
  })

  test("stop() waits for a polling round in hand: nothing of the consumer runs after it returns", async () => {
    const { t, group, consumer } = await setup({ pollIntervalMs: 100 })
    // A key first seen at v5, at stream sequence 1: once the ack floor (0 here) is within one
    // of it, the polling loop settles its start, locking the key first (sql/0015).
    await sql`
      select keyway.ingest(${group}, ${["demo.item"]}::text[], ${["late"]}::text[],
        ${[5]}::bigint[], ${["x:late5"]}::text[], ${["demo.item.changed.v1"]}::text[],
        ${[JSON.stringify({ n: 5 })]}::jsonb[], ${[null]}::jsonb[],
        ${[new Date().toISOString()]}::timestamptz[], ${[1]}::bigint[])`.execute(t.db)
    // Held here, so that a round waits on it.
    const holder = new pg.Client({ connectionString: t.url })
    await holder.connect()
    try {
      await holder.query("begin")
      await holder.query(
        "select 1 from keyway.consumer_key where grp = $1 and key = 'late' for share",
        [group],
      )
      const waiting = async () =>
        (
          await sql`select 1 from pg_stat_activity
                     where datname = current_database() and wait_event_type = 'Lock'`.execute(t.db)
        ).rows.length
      await waitFor(async () => (await waiting()) === 1, {
        timeoutMs: 10_000,
        message: "a polling round waiting on the key",
      })
      let stopped = false
      const stopping = consumer.stop().then(() => {
        stopped = true
      })
      await new Promise((r) => setTimeout(r, 1000))
      assert.equal(stopped, false, "stop() returned with the round still running")
      await holder.query("commit")
      await stopping
      assert.equal(await waiting(), 0)
    } finally {
      await holder.end()
    }
    // The round finished: the key is settled.
    const key = await sql<{ baseline_stream_seq: number | null }>`
      select baseline_stream_seq from keyway.consumer_key where grp = ${group} and key = 'late'`.execute(
      t.db,
    )
    assert.deepEqual(key.rows, [{ baseline_stream_seq: null }])
  })

  test("stop() while start() is on its way: nothing of the consumer runs after both return, and it cannot start again", async () => {
    const { t, stream, consumer } = await unstarted({ pollIntervalMs: 100 })
    const starting = consumer.start()
    await consumer.stop()
    await starting
    await publishEvent(nc, stream.site, { key: "a", ver: 1, payload: { n: 1 } })
    // Ten polling intervals: a loop forked by the start() would have stored and run it.
    await new Promise((r) => setTimeout(r, 1000))
    const inbox = await sql<{ n: number }>`select count(*)::int as n from keyway.inbox`.execute(
      t.db,
    )
    assert.equal(inbox.rows[0]!.n, 0, "nothing ingested after stop()")
    assert.deepEqual(await effects(t.db), [])
    await assert.rejects(consumer.start(), /start\(\) after stop\(\); make a new consumer/)
  })

  test("the consumer made to replace a stopped one reports on the same metrics registry", async () => {
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const { t, stream, consumer } = await setup({ metrics })
    await publishEvent(nc, stream.site, { key: "a", ver: 1, payload: { n: 1 } })
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "the first effect",
    })
    await consumer.stop()
    // Its names were refused as registered already: "make a new consumer" could not be done.
    const { consumer: next } = await setup({ metrics, group: unique("g2") })
    assert.equal(next.status().done, 0)
    const body = (await metrics.render()).body
    assert.match(body, /^consumer_done_total 0$/m, "the new one's count, not the stopped one's")
    assert.match(body, /^consumer_commit_to_done_seconds_count 1$/m, "the histogram goes on")
  })

  test("a setting out of range is refused by name: a lease with a fraction used to stop every drain", async () => {
    const t = await createTestDatabase()
    cleanups.push(() => t.drop())
    const make = (overrides: Partial<KeyedConsumerConfig>) => () =>
      createKeyedConsumer({
        group: "g",
        stream: "S",
        nats: nc,
        db: t.db,
        redis,
        handlers: {},
        ...overrides,
      })
    // redlock refuses a duration with a fraction, and the refusal read as a key held elsewhere.
    assert.throws(
      make({ leaseMs: 10_000 / 3 }),
      (err: Error) =>
        err instanceof KeyedConsumerConfigError &&
        /leaseMs must be an integer of at least 100, not 3333\.3/.test(err.message),
    )
    assert.throws(
      make({ concurrency: 0, policies: { "demo.item": { maxAttempts: 0 } } }),
      /concurrency must be an integer of at least 1, not 0; policies\["demo.item"\]\.maxAttempts must be an integer of at least 1, not 0/,
    )
    assert.throws(make({ pollIntervalMs: Number.NaN }), /pollIntervalMs must be a number/)
  })

  test("a second stop() (a dispose after a signal's) waits for the first to finish", async () => {
    let started = false
    let finished = false
    const { t, stream, consumer } = await setup({
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          started = true
          await new Promise((r) => setTimeout(r, 500))
          await recordEffect("w1")(event, ctx)
          finished = true
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "a", ver: 1, payload: { n: 1 } })
    await waitFor(() => started, { timeoutMs: 10_000, message: "the handler started" })
    const first = consumer.stop()
    await consumer[Symbol.asyncDispose]()
    assert.ok(finished, "the task in hand finished before the second stop returned")
    assert.equal(consumer.status().drainingKeys, 0)
    assert.equal((await effects(t.db)).length, 1)
    await first
  })

  for (const where of ["before its effects", "in its effects"]) {
    test(`stop() returns a moment after its grace though a handler hangs ${where}, unheard; that handler keeps neither its key nor its effects`, async () => {
      const { opened: running, open: runs } = gate()
      const { opened: released, open: release } = gate()
      const errors: string[] = []
      const { t, stream, group, consumer } = await setup({
        shutdownGraceMs: 300,
        leaseMs: 1000,
        logger: { info() {}, warn() {}, error: (message) => errors.push(message) },
        handlers: {
          "demo.item.changed.v1": async (event, ctx) => {
            runs()
            if (where === "before its effects") {
              await released // its signal unheard
              await recordEffect("w1")(event, ctx)
            } else {
              // The completion sent, its transaction open: a commit after stop() returned.
              await ctx.complete(async (trx) => {
                await released
                await sql`insert into effect (topic, key, ver, event_id, worker)
                        values (${event.topic}, ${event.key}, ${event.ver}, ${event.id}, 'w1')`.execute(
                  trx,
                )
              })
            }
          },
        },
      })
      // Run first (cleanups run last first): the handler ends, and its drain with it.
      cleanups.push(async () => release())
      await publishEvent(nc, stream.site, { key: "a", ver: 1, payload: { n: 1 } })
      await running
      // It waited for the handler for as long as it ran: here, for ever.
      await consumer.stop()
      assert.deepEqual(errors, [
        "stopped with handlers still running: they did not end when aborted",
      ])
      assert.equal(consumer.status().drainingKeys, 1, "left running")
      // The caller keeps its pool and Redis (for the consumer that replaces this one, say). The
      // abandoned drain had its lock extended for as long as the handler hung, and its effects
      // written once it returned, after stop(): no more.
      await new Promise((r) => setTimeout(r, 1500))
      assert.equal(await redis.exists(`keyway:${group}:demo.item:a`), 0, "its lock ran out")
      release()
      await waitFor(() => consumer.status().drainingKeys === 0, {
        timeoutMs: 5000,
        message: "the handler ended",
      })
      assert.deepEqual(await effects(t.db), [], "nothing written after stop()")
    })
  }

  test("start() called twice at once starts one set of loops, which stop() stops", async () => {
    const { t, stream, consumer } = await unstarted({ pollIntervalMs: 100 })
    await Promise.all([consumer.start(), consumer.start()])
    await publishEvent(nc, stream.site, { key: "a", ver: 1, payload: { n: 1 } })
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "the first effect",
    })
    await consumer.stop()
    await publishEvent(nc, stream.site, { key: "a", ver: 2, payload: { n: 2 } })
    await new Promise((r) => setTimeout(r, 1000))
    const inbox = await sql<{ n: number }>`select count(*)::int as n from keyway.inbox`.execute(
      t.db,
    )
    assert.equal(inbox.rows[0]!.n, 1, "nothing ingested after stop()")
  })

  test("stop() cancels an inbox vacuum in progress instead of waiting for it", async () => {
    const { t, stream, consumer } = await setup((t) => {
      // This consumer's sessions vacuum at a crawl: a sleep for every page or so, long enough
      // to outlast any shutdown budget. The settings touch nothing but VACUUM.
      const url = new URL(t.url)
      url.searchParams.set("options", "-c vacuum_cost_delay=100 -c vacuum_cost_limit=1")
      const crawling = createDb({ connectionString: url.toString(), max: 4 })
      cleanups.push(() => crawling.destroy())
      return {
        db: crawling,
        retentionMs: 1,
        pruneIntervalMs: 100,
        recoveryIntervalMs: 100,
        vacuumEvery: 200,
      }
    })
    await Promise.all(
      Array.from({ length: 500 }, (_, i) =>
        publishEvent(nc, stream.site, {
          key: `k${i % 50}`,
          ver: Math.floor(i / 50) + 1,
          payload: { n: i },
        }),
      ),
    )
    const inboxVacuums = async () =>
      (
        await sql<{ pid: number }>`
          select pid from pg_stat_activity
           where datname = current_database() and state = 'active'
             and query ilike 'vacuum%keyway.inbox%'`.execute(t.db)
      ).rows
    await waitFor(async () => (await inboxVacuums()).length === 1, {
      timeoutMs: 30_000,
      message: "a vacuum of the inbox running",
    })
    // Counts vacuums run to the end (autovacuum has a count of its own).
    const completed = async () =>
      (
        await sql<{ n: number }>`
          select vacuum_count::int as n from pg_stat_user_tables
           where relid = 'keyway.inbox'::regclass`.execute(t.db)
      ).rows[0]!.n
    const before = await completed()
    await consumer.stop()
    assert.deepEqual(await inboxVacuums(), [], "no vacuum left running after stop()")
    assert.equal(await completed(), before, "the vacuum was cancelled, not waited for")
  })

  test("where a key starts: a group started late, or after retention, does not wait for version 1", async () => {
    const t = await createTestDatabase()
    cleanups.push(() => t.drop())
    await createEffectTable(t.db)
    const stream = await createTestStream(nc)
    cleanups.push(() => stream.delete())
    // Before any group exists: key "late" gets v1..v3, key "pruned" v1..v5.
    for (let ver = 1; ver <= 3; ver++)
      await publishEvent(nc, stream.site, { key: "late", ver, payload: { n: ver } })
    for (let ver = 1; ver <= 5; ver++)
      await publishEvent(nc, stream.site, { key: "pruned", ver, payload: { n: ver } })
    // Retention took the first two versions of "pruned" (stream seqs 4 and 5).
    const jsm = await jetstreamManager(nc)
    await jsm.streams.deleteMessage(stream.name, 4)
    await jsm.streams.deleteMessage(stream.name, 5)
    const start = async (startPosition: "all" | "new") => {
      const c = createKeyedConsumer({
        group: unique("g"),
        stream: stream.name,
        startPosition,
        nats: nc,
        db: t.db,
        redis,
        handlers: { "demo.item.changed.v1": recordEffect(startPosition) },
        pollIntervalMs: 200,
      })
      cleanups.push(() => c.stop())
      await c.start()
      return c
    }
    const fromNow = await start("new")
    const fromAll = await start("all")
    await publishEvent(nc, stream.site, { key: "late", ver: 4, payload: { n: 4 } })
    await publishEvent(nc, stream.site, { key: "late", ver: 5, payload: { n: 5 } })
    const byGroup = async (worker: string) =>
      (await effects(t.db)).filter((e) => e.worker === worker).map((e) => `${e.key}:${e.ver}`)
    await waitFor(
      async () => (await byGroup("new")).length === 2 && (await byGroup("all")).length === 8,
      {
        timeoutMs: 15_000,
        message: "both groups settled where their keys start",
      },
    )
    assert.deepEqual(
      await byGroup("new"),
      ["late:4", "late:5"],
      "a group from now starts each key at the first version it sees",
    )
    assert.deepEqual(
      (await byGroup("all")).filter((e) => e.startsWith("pruned")),
      ["pruned:3", "pruned:4", "pruned:5"],
      "a group from the start begins a key at the oldest version the stream still holds",
    )
    assert.deepEqual(
      (await byGroup("all")).filter((e) => e.startsWith("late")),
      ["late:1", "late:2", "late:3", "late:4", "late:5"],
    )
    await fromNow.stop()
    await fromAll.stop()
  })

  test("a poison payload is dead at once with its reason; other keys carry on", async () => {
    let calls = 0
    const { t, stream, admin } = await setup({
      defaultPolicy: { maxAttempts: 5, onDead: "block" },
      handlers: {
        "demo.item.changed.v1": async (event, ctx) => {
          calls++
          if ((event.payload as { n: number }).n < 0)
            throw new PoisonError("n must not be negative")
          await recordEffect("w1")(event, ctx)
        },
      },
    })
    await publishEvent(nc, stream.site, { key: "bad", ver: 1, payload: { n: "not a number" } })
    await publishEvent(nc, stream.site, { key: "bad2", ver: 1, payload: { n: -1 } })
    await publishEvent(nc, stream.site, {
      key: "bad3",
      ver: 1,
      payload: {},
      type: "no.such.type.v1",
    })
    for (let ver = 1; ver <= 5; ver++)
      await publishEvent(nc, stream.site, { key: "good", ver, payload: { n: ver } })
    // Not even an event: rejected at ingest, kept, and the rest flows.
    await nc.publish(`${stream.site}.demo.item`, "this is not json")
    await waitFor(async () => (await admin.listDead()).length === 3, {
      timeoutMs: 10_000,
      message: "3 dead",
    })
    await waitFor(async () => (await effects(t.db)).length === 5, {
      timeoutMs: 10_000,
      message: "good key done",
    })
    const dead = Object.fromEntries((await admin.listDead()).map((d) => [d.key, d]))
    assert.match(dead.bad!.lastError!, /^poison: invalid demo\.item\.changed\.v1 event: .*\["n"\]/s)
    assert.equal(dead.bad!.attempts, 1, "dead at once, not retried")
    assert.match(dead.bad2!.lastError!, /poison: n must not be negative/)
    assert.match(dead.bad3!.lastError!, /no schema for event type no\.such\.type\.v1/)
    assert.equal(calls, 6, "the handler never saw the schema failure; bad2 once; good five times")
    const refused = await rejects(t.db)
    assert.equal(refused.length, 1)
    assert.match(refused[0]!.reason, /not JSON/)
  })
  test("a message whose subject holds a NUL is kept as a reject, its NUL written out; the rest flows", async () => {
    const { t, stream } = await setup()
    // The stream takes it (its filter is `site.>`); Postgres cannot store the NUL.
    await nc.publish(`${stream.site}.demo.item\u0000x`, "this is not json")
    for (let ver = 1; ver <= 3; ver++)
      await publishEvent(nc, stream.site, { key: "good", ver, payload: { n: ver } })
    await waitFor(async () => (await effects(t.db)).length === 3, {
      timeoutMs: 10_000,
      message: "the events behind it stored and handled",
    })
    const kept = await sql<{ subject: string }>`
      select subject from keyway.inbox_reject`.execute(t.db)
    assert.deepEqual(kept.rows, [{ subject: `${stream.site}.demo.item\\u0000x` }])
  })

  test("an event that collides with another at its version is rejected with the reason", async () => {
    const { t, stream } = await setup()
    await publishEvent(nc, stream.site, { key: "c", ver: 1, payload: { n: 1 }, seq: 1 })
    await publishEvent(nc, stream.site, { key: "c", ver: 2, payload: { n: 2 }, seq: 2 })
    // Another outbox's v2 of the same key, with an id of its own.
    await publishEvent(nc, stream.site, {
      key: "c",
      ver: 2,
      payload: { n: 22 },
      seq: 3,
      raw: { id: "othersite:2" },
    })
    await publishEvent(nc, stream.site, { key: "c", ver: 3, payload: { n: 3 }, seq: 4 })
    await waitFor(async () => (await effects(t.db)).length === 3, {
      timeoutMs: 10_000,
      message: "v1..v3 handled",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => `${e.ver}:${e.event_id}`),
      [`1:${stream.site}:1`, `2:${stream.site}:2`, `3:${stream.site}:4`],
    )
    const refused = await rejects(t.db)
    assert.deepEqual(
      refused.map((r) => Number(r.stream_seq)),
      [3],
    )
    assert.match(refused[0]!.reason, /already held by another event, .*:2, and this is othersite:2/)
  })
  test("an event whose values Postgres refuses is rejected with the reason; its batch goes in", async () => {
    const { t, stream, admin } = await setup()
    const raw = (e: Partial<EventEnvelope> & { key: string; ver: number }, seq: number) =>
      publishEvent(nc, stream.site, { payload: { n: e.ver }, seq, ...e, raw: e })
    // One burst, so that the bad ones share their inbox batch with good ones. Each passes the
    // envelope's schema; Postgres refuses a value in each (22007, 22021, 22P05).
    await Promise.all([
      raw({ key: "g1", ver: 1 }, 1),
      raw({ key: "when", ver: 1, createdAt: "2026-02-30T10:00:00Z" }, 2),
      raw({ key: "g2", ver: 1 }, 3),
      raw({ key: "nul\u0000key", ver: 1 }, 4),
      raw({ key: "g3", ver: 1 }, 5),
      raw({ key: "nulpayload", ver: 1, payload: { n: 1, s: "a\u0000b" } }, 6),
      raw({ key: "g4", ver: 1 }, 7),
      // The version's place is held by a placeholder, which must not carry the NUL along.
      raw({ key: "nultype", ver: 1, type: "demo.item.changed.v1\u0000" }, 8),
      raw({ key: "nulid", ver: 1, id: "id\u0000" }, 9),
    ])
    await waitFor(async () => (await effects(t.db)).length === 4, {
      timeoutMs: 10_000,
      message: "the good events of the batch handled",
    })
    const refused = await rejects(t.db)
    assert.deepEqual(
      refused.map((r) => Number(r.stream_seq)),
      [2, 4, 6, 8, 9],
    )
    // A NUL in the key the envelope refuses, as the writer does: no key to hold a place in.
    for (const r of refused.filter((r) => Number(r.stream_seq) !== 4))
      assert.match(r.reason, /^Postgres refuses a value in it: /)
    assert.match(refused[1]!.reason, /must not hold control characters[\s\S]*\["key"\]/)
    assert.match(refused[0]!.reason, /out of range: "2026-02-30T10:00:00Z"/)
    // The group goes on; the refused version holds its key's place, dead with its reason.
    await raw({ key: "g1", ver: 2 }, 10)
    await raw({ key: "when", ver: 2 }, 11)
    await waitFor(async () => (await effects(t.db)).length === 5, {
      timeoutMs: 10_000,
      message: "a later event handled",
    })
    const dead = await admin.listDead()
    assert.deepEqual(dead.map((d) => [d.key, d.ver]).sort(), [
      ["nulid", 1],
      ["nulpayload", 1],
      ["nultype", 1],
      ["when", 1],
    ])
    for (const d of dead) assert.match(d.lastError!, /^poison: refused at ingest: Postgres refuses/)
    await new Promise((r) => setTimeout(r, 500))
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.key).sort(),
      ["g1", "g1", "g2", "g3", "g4"],
      "when@2 waits behind its dead version 1 (policy block)",
    )
  })
  test("an event whose payload names another key than its own is dead with the reason; its key's next runs", async () => {
    // The writer refuses such an event; one that reached the stream anyway (another
    // publisher, a writer from before the check) ran in the order of a key it did not belong
    // to, and pushed the other label's image out of that label's order.
    const { t, stream, admin } = await setup({
      defaultPolicy: { maxAttempts: 5, onDead: "park" },
      handlers: { "esl.label.render.v1": recordEffect("w1") },
    })
    const label = (key: string, ver: number, labelCode: string) =>
      publishEvent(nc, stream.site, {
        key,
        ver,
        topic: "esl.label",
        type: "esl.label.render.v1",
        payload: {
          labelCode,
          jobId: `j${ver}`,
          page: 1,
          frontPage: true,
          productId: "P1",
          productName: "Butter 250 g",
          priceMinor: 279,
          currency: "EUR",
        },
      })
    await label("AAAAAAAAAAAA", 1, "BBBBBBBBBBBB")
    await label("AAAAAAAAAAAA", 2, "AAAAAAAAAAAA")
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "version 2 handled past the parked version 1",
    })
    const [dead] = await admin.listDead()
    assert.equal(dead?.ver, 1)
    assert.match(
      dead!.lastError!,
      /^poison: invalid esl\.label\.render\.v1 event: its key must be its labelCode, "BBBBBBBBBBBB"/,
    )
    assert.equal(dead!.attempts, 1, "dead at once, not retried")
    assert.deepEqual(
      (await effects(t.db)).map((e) => [e.key, e.ver]),
      [["AAAAAAAAAAAA", 2]],
    )
  })

  test("an event whose payload is not UTF-8 holds its version dead with the reason, not a gap", async () => {
    const { t, stream, admin } = await setup({ defaultPolicy: { maxAttempts: 5, onDead: "park" } })
    const envelope = (ver: number, note: string): EventEnvelope => ({
      id: `${stream.site}:${ver}`,
      site: stream.site,
      seq: ver,
      topic: "demo.item",
      key: "k",
      ver,
      type: "demo.item.changed.v1",
      payload: { n: ver, note },
      createdAt: new Date().toISOString(),
    })
    const body = encodeEnvelope(envelope(1, "caf?"))
    // A Latin-1 "é" where UTF-8 wanted two bytes, in the payload: the key reads whole.
    body[body.lastIndexOf(0x3f)] = 0xe9
    const js = jetstream(nc)
    await js.publish(`${stream.site}.demo.item`, body, { msgID: `${stream.site}:1` })
    await js.publish(`${stream.site}.demo.item`, encodeEnvelope(envelope(2, "ok")), {
      msgID: `${stream.site}:2`,
    })
    // Rejected with no place kept, version 1 was a gap, and version 2 waited behind it until
    // an operator skipped it.
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "version 2 handled past the dead version 1",
    })
    const [dead] = await admin.listDead()
    assert.equal(dead?.ver, 1)
    assert.match(dead!.lastError!, /^poison: refused at ingest: message body is not UTF-8/)
    assert.deepEqual(await admin.listGaps(), [])
    assert.deepEqual(
      (await rejects(t.db)).map((r) => [Number(r.stream_seq), r.reason]),
      [[1, "message body is not UTF-8"]],
    )
  })

  test("an envelope whose time has no zone, or whose topic is not its type's, holds its version dead with the reason", async () => {
    const { t, stream, admin } = await setup()
    const raw = (e: Partial<EventEnvelope> & { key: string; ver: number }, seq: number) =>
      publishEvent(nc, stream.site, { payload: { n: e.ver }, seq, ...e, raw: e })
    // Postgres takes each of the first three: a handler got Infinity for a date, or a time
    // read in the session's zone.
    await raw({ key: "inf", ver: 1, createdAt: "infinity" }, 1)
    await raw({ key: "now", ver: 1, createdAt: "now" }, 2)
    await raw({ key: "local", ver: 1, createdAt: "2026-12-07 10:00:00" }, 3)
    await raw({ key: "topic", ver: 1, topic: "demo.command" }, 4)
    await raw({ key: "fine", ver: 1, createdAt: "2026-12-07T10:00:00.123+01:00" }, 5)
    await waitFor(async () => (await admin.listDead()).length === 4, {
      timeoutMs: 10_000,
      message: "four dead",
    })
    const dead = new Map((await admin.listDead()).map((d) => [d.key, d.lastError!]))
    for (const key of ["inf", "now", "local"]) {
      assert.match(
        dead.get(key)!,
        /^poison: refused at ingest: createdAt .* is not an ISO 8601 time with its zone/,
      )
    }
    assert.match(
      dead.get("topic")!,
      /type demo\.item\.changed\.v1 belongs to topic demo\.item, not "demo\.command"/,
    )
    assert.deepEqual(
      (await rejects(t.db)).map((r) => Number(r.stream_seq)),
      [1, 2, 3, 4],
    )
    await waitFor(async () => (await effects(t.db)).length === 1, {
      timeoutMs: 10_000,
      message: "the good one handled",
    })
    assert.deepEqual(
      (await effects(t.db)).map((e) => e.key),
      ["fine"],
    )
  })

  test("names longer than an envelope allows, or empty, are rejected, saying which; the rest goes in", async () => {
    const { t, stream } = await setup()
    const raw = (e: Partial<EventEnvelope> & { key: string }, seq: number) =>
      publishEvent(nc, stream.site, { ver: 1, payload: { n: 1 }, seq, ...e, raw: e })
    // Random, so that Postgres cannot compress them under btree's limit on an index entry:
    // stored, the long key failed its whole batch, retried for ever, and everything behind it.
    const long = randomBytes(5000).toString("hex")
    await Promise.all([
      raw({ key: "g1" }, 1),
      raw({ key: long }, 2),
      raw({ key: "g2" }, 3),
      raw({ key: "longid", id: long }, 4),
      raw({ key: "g3" }, 5),
      raw({ key: "" }, 6),
      raw({ key: "noid", id: "" }, 7),
      raw({ key: "badseq", seq: 1.5 } as never, 8),
    ])
    await waitFor(async () => (await effects(t.db)).length === 3, {
      timeoutMs: 10_000,
      message: "the good events handled",
    })
    await waitFor(async () => (await rejects(t.db)).length === 5, {
      timeoutMs: 10_000,
      message: "five rejected",
    })
    const refused = await rejects(t.db)
    assert.deepEqual(
      refused.map((r) => Number(r.stream_seq)),
      [2, 4, 6, 7, 8],
    )
    assert.match(refused[0]!.reason, /at most 256[\s\S]*\["key"\]/)
    assert.match(refused[1]!.reason, /at most 256[\s\S]*\["id"\]/)
    assert.match(refused[2]!.reason, /must not be empty[\s\S]*\["key"\]/)
    assert.match(refused[3]!.reason, /must not be empty[\s\S]*\["id"\]/)
    assert.match(refused[4]!.reason, /integer[\s\S]*\["seq"\]/)
  })
  for (const made of ["by the worker", "earlier, with an ack_wait of its own"]) {
    test(`an ingest held up past ack_wait asks for more time: nothing is redelivered meanwhile (durable made ${made})`, async () => {
      const group = unique("g")
      const earlier = made !== "by the worker"
      const { t, stream } = await setup(
        // The durable's own ack_wait is what counts, not the one the worker would have used.
        { group, ackWaitMs: earlier ? 30_000 : 2000 },
        async (s) => {
          if (!earlier) return
          await (await jetstreamManager(nc)).consumers.add(s.name, {
            durable_name: group,
            ack_policy: AckPolicy.Explicit,
            ack_wait: 2000 * 1e6,
          })
        },
      )
      // Another session keeps the inbox from taking rows for two and a half ack_waits.
      const blocker = new pg.Client({ connectionString: t.url })
      await blocker.connect()
      try {
        await blocker.query("begin")
        await blocker.query("lock table keyway.inbox in share row exclusive mode")
        await publishEvent(nc, stream.site, { key: "slow", ver: 1, payload: { n: 1 } })
        await new Promise((r) => setTimeout(r, 5000))
        // Without working() the server handed the message out again after each ack_wait.
        const info = await (await jetstreamManager(nc)).consumers.info(stream.name, group)
        assert.equal(info.delivered.consumer_seq, 1, "delivered once")
        await blocker.query("commit")
      } finally {
        await blocker.end()
      }
      await waitFor(async () => (await effects(t.db)).length === 1, {
        timeoutMs: 10_000,
        message: "stored and handled once the lock went",
      })
    })
  }

  test("messages behind several quick batches, together longer than ack_wait, are not handed out again", async () => {
    const { t, stream, group, consumer } = await unstarted({
      ackWaitMs: 2000,
      ingestBatchSize: 1,
    })
    // Each batch (one event) takes 0.4 s: under half an ack_wait, while the eighth waits
    // behind seven of them, 2.8 s.
    await sql`
      create function slow_inbox() returns trigger language plpgsql
      as $$ begin perform pg_sleep(0.4); return new; end $$`.execute(t.db)
    await sql`
      create trigger slow before insert on keyway.inbox
      for each row execute function slow_inbox()`.execute(t.db)
    for (let ver = 1; ver <= 8; ver++) {
      await publishEvent(nc, stream.site, { key: `q${ver}`, ver: 1, payload: { n: ver } })
    }
    await consumer.start()
    await waitFor(async () => (await effects(t.db)).length === 8, {
      timeoutMs: 20_000,
      message: "8 effects",
    })
    const info = await (await jetstreamManager(nc)).consumers.info(stream.name, group)
    // Handed out again after ack_wait, the last ones were delivered twice: 12 in all.
    assert.equal(info.delivered.consumer_seq, 8, "delivered once each")
  })

  test("an existing durable the group cannot work with is refused at start, saying what is wrong", async () => {
    const t = await createTestDatabase()
    cleanups.push(() => t.drop())
    const stream = await createTestStream(nc)
    cleanups.push(() => stream.delete())
    const jsm = await jetstreamManager(nc)
    const cases: [Record<string, unknown>, RegExp, Partial<KeyedConsumerConfig>?][] = [
      // One worker's ack would cover what another had not stored.
      [{ ack_policy: AckPolicy.All }, /its ack policy is all, not explicit/],
      // The server refuses every pull of 512 and nats.js waits on: nothing ingested, unsaid.
      [{ max_batch: 100 }, /its max_batch 100 is below the 512 a pull asks for/],
      // A message unacked five times (Postgres away) would never come again: a gap for good.
      [{ max_deliver: 5 }, /its max_deliver 5 gives up on a message the group has not stored/],
      // Postgres away, a worker would buffer the whole stream.
      [{ max_ack_pending: -1 }, /its max_ack_pending is unlimited/],
      // Made by an earlier release without a filter: kept, the group took every event of the
      // stream, whatever filter the worker was now told to use.
      [
        {},
        new RegExp(`its filter is "", not the "${stream.site}\\.demo\\.item" asked for`),
        { filterSubject: `${stream.site}.demo.item` },
      ],
    ]
    for (const [made, message, more] of cases) {
      const group = unique("g")
      await jsm.consumers.add(stream.name, {
        durable_name: group,
        ack_policy: AckPolicy.Explicit,
        ...made,
      })
      const consumer = createKeyedConsumer({
        group,
        stream: stream.name,
        nats: nc,
        db: t.db,
        redis,
        handlers: { "demo.item.changed.v1": recordEffect("w1") },
        ...more,
      })
      // Stopped however the assertion ends: one that started would keep the file running.
      cleanups.push(() => consumer.stop())
      await assert.rejects(consumer.start(), message)
    }
  })

  test("the group's durable deleted under it is created again; every effect once, in order", async () => {
    const { t, stream, group } = await setup()
    for (let ver = 1; ver <= 3; ver++)
      for (const key of ["a", "b"])
        await publishEvent(nc, stream.site, { key, ver, payload: { n: ver } })
    await waitFor(async () => (await effects(t.db)).length === 6, {
      timeoutMs: 10_000,
      message: "first events handled",
    })
    const jsm = await jetstreamManager(nc)
    await jsm.consumers.delete(stream.name, group)
    for (let ver = 4; ver <= 6; ver++)
      for (const key of ["a", "b"])
        await publishEvent(nc, stream.site, { key, ver, payload: { n: ver } })
    await waitFor(async () => (await effects(t.db)).length >= 12, {
      timeoutMs: 30_000,
      message: "events published after the deletion handled",
    })
    // The new durable started from the beginning of the stream: the first six came again.
    await waitFor(
      async () => (await jsm.consumers.info(stream.name, group)).num_ack_pending === 0,
      {
        timeoutMs: 10_000,
        message: "the redelivered events acked",
      },
    )
    const rows = await effects(t.db)
    assert.equal(rows.length, 12, "nothing twice")
    assert.deepEqual(checkEffects(rows).problems, [])
  })
  test("a group that starts at new events does not make its deleted durable again, and says why", async () => {
    const lines: string[] = []
    const logger = {
      info() {},
      warn: (message: string, fields?: Record<string, unknown>) =>
        lines.push(`${message} ${JSON.stringify(fields)}`),
      error: (message: string, fields?: Record<string, unknown>) =>
        lines.push(`${message} ${JSON.stringify(fields)}`),
    }
    const { stream, group } = await setup({ startPosition: "new", logger })
    const jsm = await jetstreamManager(nc)
    await jsm.consumers.delete(stream.name, group)
    await publishEvent(nc, stream.site, { key: "a", ver: 1, payload: { n: 1 } })
    await waitFor(() => lines.some((l) => /an operator must create it again/.test(l)), {
      timeoutMs: 60_000,
      message: () => `the worker said why it stopped ingesting; it logged ${lines.join("\n")}`,
    })
    await assert.rejects(jsm.consumers.info(stream.name, group), /consumer not found/)
  })
})
