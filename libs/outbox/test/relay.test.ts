import assert from "node:assert/strict"
import { after, before, describe, test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { fileURLToPath } from "node:url"
import { connectNats } from "@keyway/nats"
import { createRelay, enqueue, type Relay, type RelayConfig } from "@keyway/outbox"
import { createMetricsRegistry } from "@keyway/telemetry"
import {
  createTcpProxy,
  createTestDatabase,
  gate,
  metricValue,
  type NatsServerHandle,
  readStream,
  spawnTs,
  startNatsServer,
  streamCount,
  type TestDatabase,
  waitFor,
} from "@keyway/testkit"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { sql } from "kysely"
import pg from "pg"
import { claimBatch, unmarkRecent } from "../src/internal/relay-sql.ts"
import {
  createSiteStream,
  deleteStream,
  uniqueSite,
  unpublishedCount,
  versionsByKey,
} from "./support.ts"

const SHARED_NATS = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
const relayChild = fileURLToPath(new URL("./fixtures/relay-child.ts", import.meta.url))
const relayApp = fileURLToPath(new URL("../../../apps/relay/src/main.ts", import.meta.url))

const item = (key: string, n: number) => ({ type: "demo.item.changed.v1", key, payload: { n } })

/** Enqueues `count` events, one transaction per event, spread over `keys` keys. */
async function write(db: TestDatabase["db"], count: number, keys: number, from = 0) {
  for (let i = from; i < from + count; i++) {
    await db.transaction().execute((trx) => enqueue(trx, item(`k${i % keys}`, i)))
  }
}

/** Every event exactly once, and each key's versions 1..n in stream order. */
function assertExactlyOnceInOrder(
  events: Awaited<ReturnType<typeof readStream>>,
  expected: number,
) {
  const ids = new Set(events.map((e) => e.id))
  assert.equal(ids.size, events.length, "no event twice in the stream")
  assert.equal(events.length, expected, "every event in the stream")
  for (const [key, versions] of versionsByKey(events)) {
    assert.deepEqual(
      versions,
      versions.map((_, i) => i + 1),
      `${key}: versions 1..n in stream order`,
    )
  }
}

describe("relay", () => {
  let t: TestDatabase
  let nc: NatsConnection
  let site: string
  let stream: string
  let relay: Relay | undefined

  before(async () => {
    nc = await connectNats({ servers: SHARED_NATS })
  })

  // Each test gets its own database, site and stream.
  const fresh = async () => {
    await relay?.stop()
    relay = undefined
    if (t) await t.drop()
    if (stream) await deleteStream(nc, stream)
    t = await createTestDatabase({ poolSize: 20 })
    site = uniqueSite()
    stream = await createSiteStream(nc, site)
  }
  /** Starts the test's relay on its database, polling every 100 ms unless told otherwise. */
  const startRelay = async (options: Partial<RelayConfig> = {}) => {
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      site,
      pollIntervalMs: 100,
      ...options,
      connection: options.connection ?? nc,
    })
    await relay.start()
    return relay
  }
  /**
   * Runs `body` with a private NATS server (for tests that stop it) holding the test's site
   * stream; the test's relay is stopped, and the connection closed, however it ends.
   */
  const withPrivateNats = async (
    body: (p: { server: NatsServerHandle; nc: NatsConnection; stream: string }) => Promise<void>,
  ) => {
    await using server = await startNatsServer()
    const nc = await connectNats({ servers: server.url })
    try {
      await body({ server, nc, stream: await createSiteStream(nc, site) })
    } finally {
      await relay?.stop()
      relay = undefined
      await nc.close()
    }
  }
  /** Waits until the outbox holds no unpublished row. */
  const untilPublished = (message: string, timeoutMs: number) =>
    waitFor(async () => (await unpublishedCount(t.db)) === 0, { timeoutMs, message })
  /** Waits until the stream holds `inStream` events and `kept` rows stay unpublished. */
  const untilSplit = (
    conn: NatsConnection,
    name: string,
    inStream: number,
    kept: number,
    message: string,
  ) =>
    waitFor(
      async () =>
        (await streamCount(conn, name)) === inStream && (await unpublishedCount(t.db)) === kept,
      { timeoutMs: 10_000, message },
    )
  /** The flag that tells writers to NOTIFY: the relay is idle and waits for one. */
  const listening = async () =>
    (await sql<{ l: boolean }>`select listening as l from keyway.relay_state`.execute(t.db))
      .rows[0]!.l
  after(async () => {
    await relay?.stop()
    await t?.drop()
    if (stream) await deleteStream(nc, stream)
    await nc.close()
  })

  test("20 concurrent writers x 500 events over 50 keys: every event once, in version order per key", async () => {
    await fresh()
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
      window: 64,
    })
    await relay.start()
    // Writers mix single-event transactions with batches of several keys.
    await Promise.all(
      Array.from({ length: 20 }, (_, w) =>
        (async () => {
          let n = 0
          while (n < 500) {
            const size = n % 50 === 0 ? 10 : 1
            const events = Array.from({ length: size }, (_, j) =>
              item(`k${Math.floor(Math.random() * 50)}`, w * 1000 + n + j),
            )
            await t.db.transaction().execute((trx) => enqueue(trx, events))
            n += size
          }
        })(),
      ),
    )
    const heads = await sql<{ key: string; ver: number }>`
      select key, ver from keyway.outbox_key_head
    `.execute(t.db)
    assert.equal(
      heads.rows.reduce((s, r) => s + r.ver, 0),
      10_000,
    )
    const versions = await sql<{ key: string; vers: number[] }>`
      select key, array_agg(ver order by ver) as vers from keyway.outbox group by key
    `.execute(t.db)
    for (const r of versions.rows) {
      assert.deepEqual(
        r.vers.map(Number),
        r.vers.map((_, i) => i + 1),
        `key ${r.key} gapless`,
      )
    }
    await untilPublished("relay published the backlog", 60_000)
    assertExactlyOnceInOrder(await readStream(nc, stream), 10_000)
  })

  test("a site that could not name events or subjects is refused at creation", () => {
    for (const bad of ["", "cloud.eu", "*", "a b", "x".repeat(65)]) {
      assert.throws(
        () =>
          createRelay({
            connectionString: "postgres://u@127.0.0.1/db",
            jetstream: jetstream(nc),
            connection: nc,
            site: bad,
          }),
        /site .* must be 1-64 letters, digits/,
        JSON.stringify(bad),
      )
    }
  })

  test("settings that would publish nothing, or spin, are refused at creation by name", () => {
    const make = (more: Partial<RelayConfig>) =>
      createRelay({
        connectionString: "postgres://u@127.0.0.1/db",
        jetstream: jetstream(nc),
        connection: nc,
        site: "s",
        ...more,
      })
    for (const [more, said] of [
      [{ batchSize: 0 }, /batchSize must be a whole number of at least 1, not 0/],
      [{ batchSize: 2.5 }, /batchSize must be a whole number/],
      [{ window: 0 }, /window must be a whole number of at least 1/],
      [{ pollIntervalMs: 0 }, /pollIntervalMs must be a number above 0, not 0/],
      [{ busyPollMs: Number.NaN }, /busyPollMs must be a number above 0/],
      [{ subjectPrefix: "" }, /subjectPrefix "" must be NATS subject tokens/],
      [{ subjectPrefix: "cloud.*" }, /subjectPrefix "cloud\.\*" must be/],
      [{ subjectPrefix: "a b" }, /subjectPrefix "a b" must be/],
      [{ subjectPrefix: "cloud." }, /subjectPrefix "cloud\." must be/],
      // Each check of a NaN is false: pruning off, a leader without NATS never stepping down.
      [{ retentionMs: Number.NaN }, /retentionMs must be a number of at least 0, not NaN/],
      [{ stepDownAfterMs: -1 }, /stepDownAfterMs must be a number of at least 0, not -1/],
      [{ republishWindowMs: Number.POSITIVE_INFINITY }, /republishWindowMs must be a number/],
    ] as const) {
      assert.throws(() => make(more), said, JSON.stringify(more))
    }
    // A prefix may be a path of tokens.
    assert.ok(make({ subjectPrefix: "eu.cloud" }))
  })

  test("a batch ends at its payload bytes as well as its rows, one row at least; all go, in order", async () => {
    await fresh()
    await write(t.db, 3, 1)
    // 64 kB of text each, stored compressed to a few hundred bytes: the bound counts the text,
    // which is what the relay holds.
    await sql`update keyway.outbox
                 set payload = jsonb_build_object('n', seq, 'blob', repeat('abcdefgh', 8000))`.execute(
      t.db,
    )
    const sizes = (
      await sql<{ size: number }>`
        select octet_length(payload::text) as size from keyway.outbox order by seq`.execute(t.db)
    ).rows.map((r) => Number(r.size))
    const client = new pg.Client({ connectionString: t.url })
    await client.connect()
    try {
      const claim = async (maxBytes: number) => {
        const { rows, full } = await claimBatch(client, 500, maxBytes, [], [])
        return [rows.map((r) => Number(r.seq)), full]
      }
      assert.deepEqual(await claim(10 * 1024 * 1024), [[1, 2, 3], false])
      // The second row starts under the bound, the third past it.
      assert.deepEqual(await claim(sizes[0]! + 1), [[1, 2], true])
      assert.deepEqual(await claim(1), [[1], true], "one row, whatever its size")
      assert.deepEqual(await claim(0), [[1], true], "one row, whatever the bound")
      // Rows the re-publish unmarked, in stream order. Two stream_seqs alike (an earlier stream
      // of the same name) are told apart by seq, and still give one row at least.
      await sql`update keyway.outbox set stream_seq = 7`.execute(t.db)
      const resent = async (maxBytes: number) => {
        const { rows, full } = await claimBatch(client, 500, maxBytes, [], [], true)
        return [rows.map((r) => Number(r.seq)), full]
      }
      assert.deepEqual(await resent(10 * 1024 * 1024), [[1, 2, 3], false])
      assert.deepEqual(await resent(1), [[1], true])
    } finally {
      await client.end()
    }
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
      batchBytes: 1,
    })
    await relay.start()
    await untilPublished("published a row at a time", 10_000)
    assertExactlyOnceInOrder(await readStream(nc, stream), 3)
  })

  test("the sequence trap: a low seq that commits after a higher one is still published", async () => {
    await fresh()
    await startRelay()
    // A takes its seq first and stays open; B takes a higher seq and commits.
    let releaseA!: () => void
    const aMayCommit = new Promise<void>((r) => (releaseA = r))
    let aSeq = 0
    const aEnqueued = new Promise<void>((resolve) => {
      void t.db.transaction().execute(async (trx) => {
        aSeq = (await enqueue(trx, item("late", 1)))[0]!.seq
        resolve()
        await aMayCommit
      })
    })
    await aEnqueued
    const [b] = await t.db.transaction().execute((trx) => enqueue(trx, item("early", 2)))
    assert.ok(b!.seq > aSeq)
    await waitFor(async () => (await streamCount(nc, stream)) === 1, {
      timeoutMs: 10_000,
      message: "B published",
    })
    // The relay has now published seq B > seq A. A cursor relay would never look back.
    releaseA()
    await waitFor(async () => (await streamCount(nc, stream)) === 2, {
      timeoutMs: 10_000,
      message: "A published after committing late",
    })
    const events = await readStream(nc, stream)
    assert.deepEqual(
      events.map((e) => e.seq),
      [b!.seq, aSeq],
    )
  })

  test("an idle relay listens: a NOTIFY wakes it long before its fallback poll", async () => {
    await fresh()
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
      pollIntervalMs: 120_000, // a test that passes cannot be explained by polling
      settleMs: 50,
    })
    await relay.start()
    await waitFor(listening, { timeoutMs: 10_000, message: "relay says it listens" })
    for (let i = 1; i <= 3; i++) {
      await write(t.db, 1, 1, i)
      await waitFor(async () => (await streamCount(nc, stream)) === i, {
        timeoutMs: 10_000,
        message: `event ${i} published on NOTIFY`,
      })
      await waitFor(listening, { timeoutMs: 10_000, message: "relay listens again after settling" })
    }
    // Several events in one transaction take the other path, keyway.enqueue(), which must
    // notify as well.
    await t.db
      .transaction()
      .execute((trx) => enqueue(trx, [item("a", 1), item("b", 2), item("a", 3), item("c", 4)]))
    await waitFor(async () => (await streamCount(nc, stream)) === 7, {
      timeoutMs: 10_000,
      message: "a transaction of four events published on NOTIFY",
    })
    await relay.stop()
    relay = undefined
    assert.equal(await listening(), false, "a stopped relay does not ask writers to notify")
  })

  test("a steady flow with slow PubAcks never asks writers to notify", async () => {
    await fresh()
    // Every change of the flag, as writers see it: each raise makes them NOTIFY, which
    // serialises their commits.
    await sql`create table flag_change (listening boolean not null)`.execute(t.db)
    await sql`create function record_flag_change() returns trigger language plpgsql as $$
                begin insert into flag_change values (new.listening); return new; end $$`.execute(
      t.db,
    )
    await sql`create trigger flag_change after update on keyway.relay_state for each row
                when (old.listening is distinct from new.listening)
                execute function record_flag_change()`.execute(t.db)
    // Each batch, held 80 ms before its mark (slow PubAcks: longer than settleMs from its
    // claim to its mark), writes the next event meanwhile: the next claim always finds one,
    // as in a steady flow, and no pause of the test's own can look like the flow's end.
    const events = 20
    let written = 0
    const writeNext = async () => {
      if (written >= events) return
      await write(t.db, 1, 10, written)
      written++
    }
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
      settleMs: 50,
      beforeMark: async () => {
        await writeNext()
        await new Promise((r) => setTimeout(r, 80))
      },
    })
    await relay.start()
    await waitFor(listening, { timeoutMs: 10_000, message: "relay listens while idle" })
    await sql`delete from flag_change`.execute(t.db)
    await writeNext()
    await waitFor(async () => (await streamCount(nc, stream)) === events, {
      timeoutMs: 20_000,
      message: "every event published",
    })
    await waitFor(listening, { timeoutMs: 10_000, message: "relay listens again afterwards" })
    const changes = await sql<{ listening: boolean }>`select listening from flag_change`.execute(
      t.db,
    )
    // Down when the flow starts, up when it is over. Counting the mark-to-claim gap as idle
    // raised the flag after every batch.
    assert.deepEqual(
      changes.rows.map((r) => r.listening),
      [false, true],
    )
  })

  test("metrics: the backlog and its age while publishing is held, then the totals", async () => {
    await fresh()
    await write(t.db, 30, 6)
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const value = async (name: string) => metricValue((await metrics.render()).body, name)
    const { opened: held, open: release } = gate()
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
      metrics,
      beforeMark: () => held,
    })
    await relay.start()
    try {
      await waitFor(async () => (await value("relay_active")) === 1, {
        timeoutMs: 10_000,
        message: "relay active",
      })
      assert.equal(await value("outbox_pending"), 30, "published, not yet marked: still pending")
      assert.ok((await value("outbox_oldest_pending_seconds"))! > 0)
      assert.equal(await value("outbox_published_total"), 0)
      // A second relay on the same outbox stands by and owns none of that backlog.
      const standbyMetrics = createMetricsRegistry({ defaultMetrics: false })
      const standbyValue = async (name: string) =>
        metricValue((await standbyMetrics.render()).body, name)
      await using standby = createRelay({
        connectionString: t.url,
        jetstream: jetstream(nc),
        connection: nc,
        site,
        metrics: standbyMetrics,
        standbyRetryMs: 100,
      })
      await standby.start()
      await waitFor(() => standby.status().role === "standby", {
        timeoutMs: 10_000,
        message: "second relay on standby",
      })
      assert.equal(await standbyValue("relay_active"), 0)
      assert.equal(await standbyValue("outbox_pending"), 0, "a standby reports no backlog")
      assert.equal(await standbyValue("outbox_oldest_pending_seconds"), 0)
      assert.equal(await value("outbox_pending"), 30, "the active relay still does")
    } finally {
      // stop() finishes the batch in flight: a held batch would hold the test's end too.
      release()
    }
    await waitFor(async () => (await value("outbox_published_total")) === 30, {
      timeoutMs: 10_000,
      message: "30 published",
    })
    assert.equal(await value("outbox_pending"), 0)
    assert.equal(await value("outbox_oldest_pending_seconds"), 0)
    assert.equal(await value("outbox_publish_seconds_count"), 30)
  })

  test("metrics: a re-publish of rows already marked counts duplicates only; a row never marked is counted once", async () => {
    await fresh()
    await write(t.db, 20, 4)
    await startRelay()
    await untilPublished("the first relay published all", 10_000)
    await relay!.stop()
    // As if the first relay had crashed after the PubAcks of seqs 1-5, before marking them:
    // stored, never counted.
    await sql`update keyway.outbox set published_at = null, stream_seq = null where seq <= 5`.execute(
      t.db,
    )
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const value = async (name: string) => metricValue((await metrics.render()).body, name)
    // The next leader sends the last 2 minutes again, in case its predecessor's marks outran
    // what the server synced: every one a duplicate, 6-20 already counted.
    await startRelay({ metrics })
    await waitFor(async () => (await value("outbox_duplicates_total")) === 20, {
      timeoutMs: 10_000,
      message: "20 duplicates",
    })
    await untilPublished("all marked again", 10_000)
    assert.equal(await value("outbox_published_total"), 5)
    assert.equal(await value("outbox_publish_seconds_count"), 5)
    assert.equal(await streamCount(nc, stream), 20)
  })

  test("rows sent again after a loss go first, in the order the stream had them", async () => {
    // A stream that lost its unsynced tail in a crash numbers what it takes next from the
    // first sequence it lost, and a copy sourcing it (FACTORY_IN) resumes after the last
    // sequence it copied. A new event that took one of the lost sequences, sent among the
    // lost ones, was never copied where the copy had copied past it before the crash. Here the
    // loss is the whole stream, made again empty; the new rows are on other keys, which the
    // relay otherwise sends beside a key's chain of versions.
    await fresh()
    for (let n = 1; n <= 10; n++) {
      await t.db.transaction().execute((trx) => enqueue(trx, item("lost", n)))
    }
    await startRelay()
    await untilPublished("the ten published", 10_000)
    await relay!.stop()
    await deleteStream(nc, stream)
    assert.equal(await createSiteStream(nc, site), stream)
    await write(t.db, 10, 10)
    await startRelay()
    await untilPublished("all published", 10_000)
    const events = await readStream(nc, stream)
    assert.deepEqual(
      events.slice(0, 10).map((e) => `${e.key} v${e.ver}`),
      Array.from({ length: 10 }, (_, i) => `lost v${i + 1}`),
      "the lost ones first, in their order",
    )
    assertExactlyOnceInOrder(events, 20)
  })

  test("metrics: rows from a writer whose clock runs ahead of the relay's are timed as no time", async () => {
    await fresh()
    await write(t.db, 5, 1)
    // The database's clock an hour ahead of this host's, as far as these rows tell.
    await sql`update keyway.outbox set created_at = created_at + interval '1 hour'`.execute(t.db)
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const value = async (name: string) => metricValue((await metrics.render()).body, name)
    await startRelay({ metrics })
    await untilPublished("all published", 10_000)
    // Timed once the mark's answer is back, after the rows show marked.
    await waitFor(async () => (await value("outbox_publish_seconds_count")) === 5, {
      timeoutMs: 10_000,
      message: "5 timed",
    })
    // Not an hour less each, which pulled every quantile down.
    assert.equal(await value("outbox_publish_seconds_sum"), 0)
  })

  /** A relay logger that keeps what it was told. */
  const recordingLogger = () => {
    const lines: { level: string; message: string; fields?: Record<string, unknown> }[] = []
    const at = (level: string) => (message: string, fields?: Record<string, unknown>) =>
      lines.push({ level, message, fields })
    return { lines, logger: { info: at("info"), warn: at("warn"), error: at("error") } }
  }
  // A note of 600 characters makes an event of about 900 bytes; the others are about 300.
  const bigItem = (key: string, n: number) => ({
    type: "demo.item.changed.v1",
    key,
    payload: { n, note: "x".repeat(600) },
  })

  test("an event the stream refuses for good holds its key only; raised limit, it goes on in order", async () => {
    await fresh()
    const jsm = await jetstreamManager(nc)
    const info = await jsm.streams.info(stream)
    await jsm.streams.update(stream, { ...info.config, max_msg_size: 600 })
    await t.db.transaction().execute((trx) => enqueue(trx, bigItem("big", 1)))
    // More of the held key than a batch holds: claims must leave the key out, or its rows
    // would fill every batch and nothing else would move.
    for (let n = 2; n <= 12; n++)
      await t.db.transaction().execute((trx) => enqueue(trx, item("big", n)))
    await write(t.db, 40, 8)
    const { lines, logger } = recordingLogger()
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
      logger,
      metrics,
      batchSize: 10,
      heldRetryMs: 60_000,
    })
    await relay.start()
    // Published and marked: a row reaches the stream before its batch is marked published.
    await waitFor(
      async () => (await streamCount(nc, stream)) === 40 && (await unpublishedCount(t.db)) === 12,
      {
        timeoutMs: 10_000,
        message: "every other key published, every version of the held key kept",
      },
    )
    assert.equal(relay.status().heldKeys, 1)
    assert.equal(metricValue((await metrics.render()).body, "outbox_held_keys"), 1)
    const refusals = lines.filter((l) => l.level === "error")
    assert.equal(refusals.length, 1, "said once, not on every claim")
    assert.equal(refusals[0]!.fields!.key, "big")
    assert.equal(refusals[0]!.fields!.ver, 1)
    assert.match(String(refusals[0]!.fields!.reason), /max_msg_size/)
    assert.ok(
      !lines.some((l) => l.message.startsWith("publish failed")),
      "no pause for a retry: the batch went on",
    )
    await relay.stop()

    // Raised limit: a relay tries the key again (a new one at once, a running one after
    // heldRetryMs) and its versions follow everything else, in order.
    await jsm.streams.update(stream, { ...info.config, max_msg_size: -1 })
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
      logger,
    })
    await relay.start()
    await untilPublished("the held key published", 10_000)
    assertExactlyOnceInOrder(await readStream(nc, stream), 52)
  })

  test("each held key is tried again heldRetryMs after its own refusal", async () => {
    await fresh()
    const jsm = await jetstreamManager(nc)
    const info = await jsm.streams.info(stream)
    await jsm.streams.update(stream, { ...info.config, max_msg_size: 600 })
    const { lines, logger } = recordingLogger()
    const refusalsOf = (key: string) =>
      lines.filter((l) => l.level === "error" && l.fields?.key === key).length
    relay = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
      logger,
      pollIntervalMs: 100,
      heldRetryMs: 3000,
    })
    await relay.start()
    await t.db.transaction().execute((trx) => enqueue(trx, bigItem("first", 1)))
    await waitFor(async () => refusalsOf("first") === 1, {
      timeoutMs: 10_000,
      message: "first held",
    })
    // Held 1.5 s later than the first, so due 1.5 s after it: far more than a turn of the
    // relay's loop (100 ms here) apart.
    await sleep(1500)
    await t.db.transaction().execute((trx) => enqueue(trx, bigItem("second", 1)))
    await waitFor(async () => refusalsOf("second") === 1, {
      timeoutMs: 10_000,
      message: "second held",
    })
    await waitFor(async () => refusalsOf("first") === 2, {
      timeoutMs: 10_000,
      message: "first tried again",
    })
    assert.equal(refusalsOf("second"), 1, "the second key is not due yet")
    await waitFor(async () => refusalsOf("second") === 2, {
      timeoutMs: 10_000,
      message: "second tried again, at its own time",
    })
    assert.equal(relay.status().heldKeys, 2)
    await relay.stop()
    await jsm.streams.update(stream, { ...info.config, max_msg_size: -1 })
  })

  test("an event over the server's max_payload holds its key only", async () => {
    await fresh()
    await using server = await startNatsServer({ config: "max_payload: 700" })
    const privateNc = await connectNats({ servers: server.url })
    try {
      const privateStream = await createSiteStream(privateNc, site)
      await t.db.transaction().execute((trx) => enqueue(trx, bigItem("big", 1)))
      await write(t.db, 20, 4)
      const { lines, logger } = recordingLogger()
      await startRelay({ jetstream: jetstream(privateNc), logger, heldRetryMs: 60_000 })
      // Published and marked (see the test above).
      await untilSplit(
        privateNc,
        privateStream,
        20,
        1,
        "every other key published, the big event kept",
      )
      // Said once the batch's mark is back, after the rows show marked.
      await waitFor(() => lines.some((l) => l.level === "error"), {
        timeoutMs: 10_000,
        message: "the refusal said",
      })
      const refusal = lines.find((l) => l.level === "error")
      assert.equal(refusal?.fields?.key, "big")
      assert.match(String(refusal?.fields?.reason), /max_payload/)
    } finally {
      await relay?.stop()
      relay = undefined
      await privateNc.close()
    }
  })

  test("a topic no stream takes is held with its keys; the other topics go on, and it follows once a stream takes it", async () => {
    await fresh()
    const jsm = await jetstreamManager(nc)
    const info = await jsm.streams.info(stream)
    // A service author added demo.command events but not yet a stream for them.
    await jsm.streams.update(stream, { ...info.config, subjects: [`${site}.demo.item`] })
    const command = (key: string, n: number) => ({
      type: "demo.command.sent.v1",
      key,
      payload: { n, command: "print" },
    })
    // The commands come first in seq order, and more of them than a batch holds: claims
    // must leave the topic out, or its rows would fill every batch.
    for (let n = 0; n < 12; n++)
      await t.db.transaction().execute((trx) => enqueue(trx, command(`c${n % 3}`, n)))
    await write(t.db, 40, 8)
    const { lines, logger } = recordingLogger()
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const running = await startRelay({ logger, metrics, batchSize: 10, retryDelayMs: 200 })
    await untilSplit(nc, stream, 40, 12, "every demo.item event published, every command kept")
    assert.equal(running.status().heldTopics, 1)
    assert.equal(running.status().heldKeys, 0, "the topic is held, not its keys one by one")
    assert.equal(metricValue((await metrics.render()).body, "outbox_held_topics"), 1)
    const refusal = lines.find((l) => l.level === "error")
    assert.equal(refusal?.fields?.topic, "demo.command")
    assert.match(String(refusal?.fields?.reason), /no stream/)
    assert.ok(
      !lines.some((l) => l.message.startsWith("publish failed")),
      "no pause for the whole outbox: the batch went on",
    )

    // The stream now takes the topic: the running relay tries it again by itself and its
    // keys follow in order.
    await jsm.streams.update(stream, { ...info.config, subjects: [`${site}.>`] })
    await untilPublished("the held topic published", 20_000)
    assertExactlyOnceInOrder(await readStream(nc, stream), 52)
    assert.equal(running.status().heldTopics, 0)
  })

  /**
   * A private server with an `admin` user who may do anything and a `relay` user who may
   * publish only to `allow`, and a connection as each (closed by the test).
   */
  const serverWithRelayUser = async (allow: string[]) => {
    const server = await startNatsServer({
      config: `authorization {
        users = [
          { user: admin, password: admin }
          { user: relay, password: relay, permissions: {
              publish: { allow: ${JSON.stringify(allow)} }
              subscribe: { allow: ["_INBOX.>"] } } }
        ]
      }`,
    })
    const adminNc = await connectNats({ servers: server.url, user: "admin", pass: "admin" })
    const relayNc = await connectNats({
      servers: server.url,
      user: "relay",
      pass: "relay",
      inboxPrefix: "_INBOX",
    })
    return Object.assign(server, { adminNc, relayNc })
  }

  test("a topic the relay's NATS user may not publish to is held; the other topics go on", async () => {
    await fresh()
    // The site's permissions were written before demo.command existed: its relay user may
    // publish demo.item only (and use the JetStream API for its replies).
    await using server = await serverWithRelayUser([`${site}.demo.item`, "$JS.API.>"])
    const { adminNc, relayNc } = server
    try {
      const privateStream = await createSiteStream(adminNc, site)
      // More commands than a batch holds, first in seq order: the batch must not stop at them.
      for (let n = 0; n < 12; n++) {
        await t.db.transaction().execute((trx) =>
          enqueue(trx, {
            type: "demo.command.sent.v1",
            key: `c${n % 3}`,
            payload: { n, command: "print" },
          }),
        )
      }
      await write(t.db, 40, 8)
      const { lines, logger } = recordingLogger()
      const running = await startRelay({
        jetstream: jetstream(relayNc),
        connection: relayNc,
        logger,
        batchSize: 10,
        retryDelayMs: 200,
        heldRetryMs: 60_000,
      })
      await untilSplit(
        adminNc,
        privateStream,
        40,
        12,
        "every demo.item event published, every command kept",
      )
      assert.equal(running.status().heldTopics, 1)
      const refusal = lines.find((l) => l.level === "error")
      assert.equal(refusal?.fields?.topic, "demo.command")
      assert.match(String(refusal?.fields?.reason), /may not publish/)
    } finally {
      await relay?.stop()
      relay = undefined
      await relayNc.close()
      await adminNc.close()
    }
  })

  test("kill -9 between publish and mark, then restart: nothing missing, nothing twice", async () => {
    await fresh()
    await write(t.db, 3000, 30)
    const env = { DATABASE_URL: t.url, NATS_URL: SHARED_NATS, SITE: site, BATCH_SIZE: "200" }
    const doomed = spawnTs(relayChild, { ...env, KILL_AT_BATCH: "4" })
    const { signal } = await doomed.exited()
    assert.equal(signal, "SIGKILL")
    // The fourth batch is in the stream but not marked: those 200 must not be stored twice.
    const inStream = await streamCount(nc, stream)
    const unpublished = await unpublishedCount(t.db)
    assert.equal(inStream, 800)
    assert.equal(unpublished, 3000 - 600)

    const survivor = spawnTs(relayChild, env)
    await untilPublished("restarted relay published the rest", 30_000)
    survivor.kill("SIGTERM")
    await survivor.exited()
    const stopped = JSON.parse(survivor.lines.find((l) => l.includes("stopped"))!).stopped
    // The new leader also re-publishes every row of the last two minutes (the server may
    // have lost them); all 800 already in the stream come back as duplicates.
    assert.equal(stopped.duplicates, 800, "re-published rows deduplicated by the stream")
    assertExactlyOnceInOrder(await readStream(nc, stream), 3000)
  })

  test("an outbox restored from a backup gives seqs out again: those events are held, not taken for published", async () => {
    await fresh()
    await write(t.db, 5, 5)
    await startRelay()
    await untilPublished("the first events published", 10_000)
    await relay!.stop()
    // The database goes back to a backup taken before those five: its sequence and key heads
    // with it. The next events take seqs 1..5 again, so their ids are the stream's.
    await sql`delete from keyway.outbox`.execute(t.db)
    await sql`delete from keyway.outbox_key_head`.execute(t.db)
    await sql`select setval('keyway.outbox_seq', 1, false)`.execute(t.db)
    for (let i = 0; i < 7; i++) {
      await t.db.transaction().execute((trx) => enqueue(trx, item(`after${i}`, 100 + i)))
    }
    const { lines, logger } = recordingLogger()
    await startRelay({ logger, heldRetryMs: 60_000 })
    // Seqs 6 and 7 are new to the stream; 1..5 are taken by the events before the restore.
    await untilSplit(nc, stream, 7, 5, "two new events published, five held")
    // Held, and said, once the batch's mark is back, after the rows show marked.
    await waitFor(() => relay!.status().heldKeys === 5, { timeoutMs: 10_000, message: "5 held" })
    await waitFor(() => lines.filter((l) => l.level === "error").length === 5, {
      timeoutMs: 10_000,
      message: "five said",
    })
    const held = lines.filter((l) => l.level === "error")
    assert.deepEqual(held.map((l) => l.fields!.seq).sort(), [1, 2, 3, 4, 5])
    for (const l of held) assert.match(String(l.fields!.reason), /gave the seq out twice/)
    assert.match(String(held[0]!.fields!.reason), /by another event \(demo\.item\/k\d v1/)
    const events = await readStream(nc, stream)
    assert.deepEqual(
      events.slice(5).map((e) => [e.id, e.key]),
      [
        [`${site}:6`, "after5"],
        [`${site}:7`, "after6"],
      ],
    )
  })

  test("a relay whose NATS user may not read its stream back holds a duplicate it cannot check, and says what to grant", async () => {
    await fresh()
    await using server = await serverWithRelayUser([`${site}.>`])
    const { adminNc, relayNc } = server
    try {
      const privateStream = await createSiteStream(adminNc, site)
      await write(t.db, 4, 4)
      await startRelay({ jetstream: jetstream(relayNc) })
      await untilPublished("the first events published", 10_000)
      await relay!.stop()
      // As if the relay had crashed after the PubAcks of seqs 1 and 2, before marking them.
      await sql`update keyway.outbox set published_at = null, stream_seq = null where seq <= 2`.execute(
        t.db,
      )
      const { lines, logger } = recordingLogger()
      await startRelay({ jetstream: jetstream(relayNc), logger, heldRetryMs: 60_000 })
      // Seqs 3 and 4 come back in the re-publish of recent rows, with their stream_seq known:
      // no read, published. 1 and 2 cannot be told from another event's.
      const held = () => lines.filter((l) => l.level === "error")
      await waitFor(async () => held().length === 2 && relay!.status().duplicates === 2, {
        timeoutMs: 10_000,
        message: "two duplicates held, two re-published",
      })
      assert.equal(await streamCount(adminNc, privateStream), 4, "nothing stored twice")
      assert.equal(await unpublishedCount(t.db), 2)
      assert.deepEqual(
        held()
          .map((l) => l.fields!.seq)
          .sort(),
        [1, 2],
      )
      assert.match(String(held()[0]!.fields!.reason), /\$JS\.API\.STREAM\.MSG\.GET\./)
      await relay!.stop()

      // With the right (the admin user here), the read shows the same events: published.
      await startRelay({ jetstream: jetstream(adminNc) })
      await untilSplit(adminNc, privateStream, 4, 0, "the duplicates checked and marked")
    } finally {
      await relay?.stop()
      relay = undefined
      await relayNc.close()
      await adminNc.close()
    }
  })

  test("two relay processes: one publishes, the other stands by and takes over on kill -9", async () => {
    await fresh()
    const env = {
      DATABASE_URL: t.url,
      NATS_URL: SHARED_NATS,
      KEYWAY_SITE: site,
      RELAY_POLL_MS: "100",
      RELAY_BATCH_SIZE: "50",
      METRICS_PORT: "0",
    }
    const relays = [spawnTs(relayApp, env), spawnTs(relayApp, env)]
    const isActive = (i: number) => relays[i]!.lines.some((l) => l.includes('"relay active"'))
    await waitFor(() => isActive(0) || isActive(1), {
      timeoutMs: 15_000,
      message: "one relay active",
    })
    const active = isActive(0) ? 0 : 1
    const standby = 1 - active
    // Each process serves /metrics (DESIGN.md §7); only the active one owns the backlog.
    const scrape = async (i: number) => {
      await waitFor(() => relays[i]!.json().some((l) => l.metrics), {
        timeoutMs: 15_000,
        message: `relay ${i} started`,
      })
      const url = relays[i]!.json().find((l) => l.metrics)!.metrics
      const body = await (await fetch(`${url}/metrics`)).text()
      return (name: string) => metricValue(body, name)
    }
    await write(t.db, 20, 5)
    await untilPublished("first 20 published", 15_000)
    const activeMetrics = await scrape(active)
    assert.equal(activeMetrics("keyway_relay_active"), 1)
    assert.equal(activeMetrics("keyway_outbox_published_total"), 20)
    assert.equal(activeMetrics("keyway_outbox_publish_seconds_count"), 20)
    assert.equal(activeMetrics("keyway_outbox_pending"), 0)
    const standbyMetrics = await scrape(standby)
    assert.equal(standbyMetrics("keyway_relay_active"), 0)
    assert.equal(standbyMetrics("keyway_outbox_published_total"), 0)
    assert.equal(standbyMetrics("keyway_outbox_pending"), 0, "a standby reports no backlog")
    // Write while the active one runs, kill it mid-flow, keep writing.
    const writing = write(t.db, 2000, 40)
    await waitFor(async () => (await streamCount(nc, stream)) >= 300, {
      timeoutMs: 15_000,
      message: "active relay publishing",
    })
    assert.equal(
      isActive(standby),
      false,
      "the standby stayed passive while the other held the lock",
    )
    relays[active]!.kill("SIGKILL")
    await relays[active]!.exited()
    await writing
    await waitFor(() => isActive(standby), { timeoutMs: 15_000, message: "standby took over" })
    await untilPublished("standby published the rest", 30_000)
    relays[standby]!.kill("SIGTERM")
    const { code } = await relays[standby]!.exited()
    assert.equal(code, 0, "SIGTERM exits 0")
    assertExactlyOnceInOrder(await readStream(nc, stream), 2020)
  })

  test("retention deletes published rows past their age, batch after batch, and keeps the newer ones", async () => {
    await fresh()
    await startRelay({
      retentionMs: 60_000,
      pruneIntervalMs: 100,
    })
    for (let batch = 0; batch < 5; batch++) {
      await t.db.transaction().execute((trx) =>
        enqueue(
          trx,
          Array.from({ length: 500 }, (_, i) => item(`k${i % 50}`, batch * 500 + i)),
        ),
      )
    }
    await untilPublished("the first 2,500 published", 30_000)
    // Published two minutes ago, as far as retention can tell: two and a half batches' worth.
    await sql`update keyway.outbox set published_at = now() - interval '2 minutes'`.execute(t.db)
    await write(t.db, 100, 10)
    await untilPublished("the newer 100 published", 10_000)
    const rows = async () =>
      (
        await sql<{ old: number; newer: number }>`
          select count(*) filter (where published_at < now() - interval '1 minute')::int as old,
                 count(*) filter (where published_at >= now() - interval '1 minute')::int as newer
            from keyway.outbox`.execute(t.db)
      ).rows[0]!
    await waitFor(async () => (await rows()).old === 0, {
      timeoutMs: 20_000,
      message: "every row past retention pruned",
    })
    assert.deepEqual(await rows(), { old: 0, newer: 100 })
    assert.equal(await streamCount(nc, stream), 2600, "pruning takes nothing from the stream")
  })

  test("a prune that fails is reported and publishing goes on, without a new session", async () => {
    await fresh()
    // As for a relay whose role may not delete. A statement trigger: every prune fails,
    // whether or not a row is old enough.
    await sql`create function refuse_delete() returns trigger language plpgsql as $$
                begin raise exception 'deletes refused'; end $$`.execute(t.db)
    await sql`create trigger refuse_delete before delete on keyway.outbox
                for each statement execute function refuse_delete()`.execute(t.db)
    await write(t.db, 300, 30)
    const { lines, logger } = recordingLogger()
    await startRelay({ logger, retentionMs: 60_000, pruneIntervalMs: 100, batchSize: 100 })
    await untilPublished("the 300 events published", 20_000)
    await waitFor(async () => lines.some((l) => l.message.startsWith("prune failed")), {
      timeoutMs: 10_000,
      message: "the failed prune reported",
    })
    assert.ok(
      !lines.some((l) => l.message.startsWith("relay session ended")),
      "the session went on: a new one would re-publish its window first",
    )
    assertExactlyOnceInOrder(await readStream(nc, stream), 300)
  })

  test("with no re-publish window, pruning goes on after a NATS blip", async () => {
    await fresh()
    const shared = new URL(SHARED_NATS)
    await using proxy = await createTcpProxy({ host: shared.hostname, port: Number(shared.port) })
    const cutNc = await connectNats({ servers: `nats://${proxy.host}:${proxy.port}` })
    try {
      await startRelay({
        jetstream: jetstream(cutNc),
        connection: cutNc,
        republishWindowMs: 0,
        retentionMs: 60_000,
        pruneIntervalMs: 100,
      })
      await write(t.db, 100, 10)
      await untilPublished("the first 100 published", 10_000)
      await blip(proxy, cutNc)
      // Past retention, as far as the relay can tell. The loss a blip anchors was cleared only
      // with a window to re-publish: with none, pruning waited for it the rest of the session.
      await sql`update keyway.outbox set published_at = now() - interval '2 minutes'`.execute(t.db)
      await waitFor(
        async () =>
          (await sql<{ n: number }>`select count(*)::int as n from keyway.outbox`.execute(t.db))
            .rows[0]!.n === 0,
        { timeoutMs: 10_000, message: "every row past retention pruned after the blip" },
      )
    } finally {
      await relay?.stop()
      relay = undefined
      await cutNc.close()
    }
  })

  test("retention goes on during a backlog that fills every batch", async () => {
    await fresh()
    // Rows published long ago (as far as retention can tell), then a backlog of 3,000 that
    // takes the relay 300 full batches.
    await t.db.transaction().execute((trx) =>
      enqueue(
        trx,
        Array.from({ length: 300 }, (_, i) => item(`k${i % 50}`, i)),
      ),
    )
    await sql`update keyway.outbox set published_at = now() - interval '1 hour', stream_seq = 0`.execute(
      t.db,
    )
    for (let batch = 0; batch < 6; batch++) {
      await t.db.transaction().execute((trx) =>
        enqueue(
          trx,
          Array.from({ length: 500 }, (_, i) => item(`k${i % 50}`, 300 + batch * 500 + i)),
        ),
      )
    }
    await startRelay({
      batchSize: 10,
      retentionMs: 60_000,
      // Rows an hour old were never in this stream; not re-published on becoming active.
      republishWindowMs: 0,
      pruneIntervalMs: 100,
    })
    let seen: { old: number; unpublished: number } | undefined
    await waitFor(
      async () => {
        seen = (
          await sql<{ old: number; unpublished: number }>`
            select count(*) filter (where published_at < now() - interval '1 minute')::int as old,
                   count(*) filter (where published_at is null)::int as unpublished
              from keyway.outbox`.execute(t.db)
        ).rows[0]!
        return seen.old === 0
      },
      { timeoutMs: 30_000, message: "the rows past retention pruned" },
    )
    // Before the fix, every full batch went straight to the next claim, past retention.
    assert.ok(
      seen!.unpublished > 0,
      `pruned only once the backlog was gone: ${JSON.stringify(seen)}`,
    )
    await untilPublished("the backlog published", 30_000)
    assert.equal(await streamCount(nc, stream), 3000)
  })

  for (const outage of [
    "brief",
    "longer than the re-publish window",
    "longer than the outbox's retention",
  ]) {
    test(`NATS lost acked messages in an unclean restart after a ${outage} outage: the relay re-publishes them`, async () => {
      await fresh()
      await withPrivateNats(async ({ server, nc: privateNc, stream: privateStream }) => {
        relay = createRelay({
          connectionString: t.url,
          jetstream: jetstream(privateNc),
          connection: privateNc,
          site,
          pollIntervalMs: 100,
          retryDelayMs: 100,
          publishTimeoutMs: 1000,
          republishWindowMs: 5000,
          // Pruning meanwhile deleted the rows the re-publish was for.
          ...(outage.includes("retention") ? { retentionMs: 3000, pruneIntervalMs: 200 } : {}),
        })
        await relay.start()
        await write(t.db, 300, 10)
        await untilPublished("published", 10_000)
        // What an fsync that never happened looks like after the host comes back: acked
        // messages missing from the store. Deleting them and restarting the server rebuilds
        // its duplicate window from what is left, as a crash would. The stop is a clean one:
        // after a kill -9 the deletes, unsynced like any write, could come back from disk,
        // and the test would pass whether or not the relay re-published.
        const jsm = await jetstreamManager(privateNc)
        for (let seq = 101; seq <= 150; seq++)
          await jsm.streams.deleteMessage(privateStream, seq, false)
        assert.equal(await streamCount(privateNc, privateStream), 250)
        await server.stop()
        // Longer than the window: a window that ended at the reconnect would hold none of them.
        if (outage !== "brief") await new Promise((r) => setTimeout(r, 6000))
        await server.start()
        await waitFor(async () => (await streamCount(privateNc, privateStream)) === 300, {
          timeoutMs: 30_000,
          message: "the lost messages are back after the reconnect",
        })
        // Restored messages land at the end of the stream, after later versions of their keys:
        // stream order is lost with the data, and consumers order by version anyway. What must
        // hold is every event, once.
        const events = await readStream(privateNc, privateStream)
        assert.equal(new Set(events.map((e) => e.id)).size, 300, "every event")
        assert.equal(events.length, 300, "none twice")
      })
    })
  }

  test("the re-publish after a loss takes the rows marked after it too: acked just before the crash", async () => {
    await fresh()
    await write(t.db, 3, 3)
    // Marked one minute, one second before the loss, and three seconds after it: the last as
    // a batch in flight is, whose other PubAcks timed out first.
    const lostAt = new Date(Date.now() - 10_000)
    const at = (offsetMs: number) => new Date(lostAt.getTime() + offsetMs).toISOString()
    await sql`update keyway.outbox
                 set published_at = (array[${at(-60_000)}, ${at(-1000)}, ${at(3000)}]::timestamptz[])[seq],
                     stream_seq = seq`.execute(t.db)
    const client = new pg.Client({ connectionString: t.url })
    await client.connect()
    try {
      assert.equal(await unmarkRecent(client, 30_000, Date.now() - lostAt.getTime()), 2)
    } finally {
      await client.end()
    }
    const rows = await sql<{ seq: number; published: boolean }>`
      select seq::int, published_at is not null as published from keyway.outbox order by seq`.execute(
      t.db,
    )
    assert.deepEqual(
      rows.rows.map((r) => r.published),
      [true, false, false],
      "published a minute before the loss: on disk, left alone",
    )
  })

  test("a loss after a quiet spell re-publishes nothing from before it: those rows were on disk", async () => {
    await fresh()
    await write(t.db, 2, 2)
    // The last publishes ten and nine and a half minutes before the loss, then nothing.
    const lostAt = new Date(Date.now() - 1000)
    const at = (offsetMs: number) => new Date(lostAt.getTime() + offsetMs).toISOString()
    await sql`update keyway.outbox
                 set published_at = (array[${at(-600_000)}, ${at(-570_000)}]::timestamptz[])[seq],
                     stream_seq = seq`.execute(t.db)
    const client = new pg.Client({ connectionString: t.url })
    await client.connect()
    try {
      assert.equal(await unmarkRecent(client, 30_000, Date.now() - lostAt.getTime()), 0)
      // A relay starting next, not knowing the loss, starts where that window did: no earlier.
      assert.equal(await unmarkRecent(client, 60_000), 0)
    } finally {
      await client.end()
    }
  })

  test("sessions that end before re-sending their window do not walk it back: the next one unmarks nothing older", async () => {
    await fresh()
    await write(t.db, 3, 3)
    // Published ten, six and two minutes ago, then nothing: relays starting one after another
    // (NATS away, each stepping down before it sends anything) each re-publish from the newest.
    const ago = (minutes: number) => new Date(Date.now() - minutes * 60_000).toISOString()
    await sql`update keyway.outbox
                 set published_at = (array[${ago(10)}, ${ago(6)}, ${ago(2)}]::timestamptz[])[seq],
                     stream_seq = seq`.execute(t.db)
    const client = new pg.Client({ connectionString: t.url })
    await client.connect()
    try {
      assert.equal(await unmarkRecent(client, 180_000), 1, "the newest, once")
      assert.equal(await unmarkRecent(client, 180_000), 0, "the next session: nothing older")
      assert.equal(await unmarkRecent(client, 180_000), 0)
    } finally {
      await client.end()
    }
    const rows = await sql<{ published: boolean }>`
      select published_at is not null as published from keyway.outbox order by seq`.execute(t.db)
    assert.deepEqual(
      rows.rows.map((r) => r.published),
      [true, true, false],
    )
  })

  test("a window anchored at a loss, its rows not yet sent again, is where the next session's starts", async () => {
    await fresh()
    await write(t.db, 4, 4)
    // Published four, three, one and a half and half a minute ago; the loss just now.
    const ago = (s: number) => new Date(Date.now() - s * 1000).toISOString()
    await sql`update keyway.outbox
                 set published_at = (array[${ago(240)}, ${ago(180)}, ${ago(90)}, ${ago(30)}]::timestamptz[])[seq],
                     stream_seq = seq`.execute(t.db)
    const client = new pg.Client({ connectionString: t.url })
    await client.connect()
    try {
      assert.equal(await unmarkRecent(client, 120_000, 0), 2, "the two minutes before the loss")
      // The session ends before sending them again; the next one knows of no loss.
      assert.equal(await unmarkRecent(client, 120_000), 0, "nothing from before that window")
    } finally {
      await client.end()
    }
    const rows = await sql<{ published: boolean }>`
      select published_at is not null as published from keyway.outbox order by seq`.execute(t.db)
    assert.deepEqual(
      rows.rows.map((r) => r.published),
      [true, true, false, false],
    )
  })

  test("a standby's NATS blip does not anchor the re-publish it makes once it leads", async () => {
    await fresh()
    const shared = new URL(SHARED_NATS)
    await using proxy = await createTcpProxy({ host: shared.hostname, port: Number(shared.port) })
    const standbyNc = await connectNats({ servers: `nats://${proxy.host}:${proxy.port}` })
    const leader = createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site,
    })
    const { lines, logger } = recordingLogger()
    const standby = createRelay({
      connectionString: t.url,
      jetstream: jetstream(standbyNc),
      connection: standbyNc,
      site,
      logger,
      standbyRetryMs: 100,
      republishWindowMs: 2000,
    })
    try {
      await leader.start()
      await waitFor(() => leader.status().role === "active", { timeoutMs: 10_000, message: "A" })
      await standby.start()
      await waitFor(() => standby.status().role === "standby", {
        timeoutMs: 10_000,
        message: "B on standby",
      })
      // A publishes 10; B's link to NATS blips; much later A publishes 20 more, and stops.
      await write(t.db, 10, 10)
      await untilPublished("A published the first 10", 10_000)
      await blip(proxy, standbyNc)
      await sleep(4000)
      await write(t.db, 20, 10, 10)
      await untilPublished("A published 20 more", 10_000)
      await leader.stop()
      // B leads and re-publishes the window before A's newest publish: the 20. Anchored at its
      // blip it would take the 10 from just before the blip too, or, ending there, only them.
      await waitFor(() => lines.some((l) => l.message === "re-publishing recent rows"), {
        timeoutMs: 10_000,
        message: () => `B re-published; it said ${JSON.stringify(lines)}`,
      })
      const said = lines.find((l) => l.message === "re-publishing recent rows")!
      assert.equal(said.fields!.rows, 20)
      await untilPublished("B published them again", 10_000)
      assertExactlyOnceInOrder(await readStream(nc, stream), 30)
    } finally {
      await leader.stop()
      await standby.stop()
      await standbyNc.close()
    }
  })

  /** Cuts `proxy` for 200 ms and returns once `nc`, connected through it, has reconnected. */
  async function blip(proxy: { cut(): void; restore(): void }, nc: NatsConnection) {
    const reconnected = (async () => {
      for await (const s of nc.status()) if (s.type === "reconnect") return
    })()
    proxy.cut()
    await sleep(200)
    proxy.restore()
    await reconnected
  }

  /**
   * Relay A on a link to NATS the test can cut (a TCP proxy), relay B on the shared
   * connection; start() makes A lead and B wait. Disposing stops both and closes A's link.
   */
  async function leaderAndStandby() {
    const shared = new URL(SHARED_NATS)
    const proxy = await createTcpProxy({ host: shared.hostname, port: Number(shared.port) })
    const cutNc = await connectNats({ servers: `nats://${proxy.host}:${proxy.port}` })
    const common = {
      connectionString: t.url,
      site,
      standbyRetryMs: 100,
      retryDelayMs: 100,
      publishTimeoutMs: 1000,
      stepDownAfterMs: 1500,
    }
    const a = createRelay({ ...common, jetstream: jetstream(cutNc), connection: cutNc })
    const b = createRelay({ ...common, jetstream: jetstream(nc), connection: nc })
    return {
      proxy,
      cutNc,
      a,
      b,
      async start() {
        await a.start()
        await waitFor(() => a.status().role === "active", { timeoutMs: 10_000, message: "A leads" })
        await b.start()
        await waitFor(() => b.status().role === "standby", {
          timeoutMs: 10_000,
          message: "B waits",
        })
      },
      async [Symbol.asyncDispose]() {
        await a.stop()
        await b.stop()
        await cutNc.close()
        await proxy.close()
      },
    }
  }

  test("a leader cut off from NATS gives way to a standby that reaches it, and does not take the lead back until its NATS is back", async () => {
    await fresh()
    await using pair = await leaderAndStandby()
    const { proxy, a, b } = pair
    await pair.start()
    await write(t.db, 10, 10)
    await untilPublished("A published the first 10", 10_000)
    // A's link to NATS is gone; Postgres is fine, so A kept the lock, and B never published.
    proxy.cut()
    await write(t.db, 20, 10, 10)
    await untilPublished("B took over and published the 20", 30_000)
    assert.equal(b.status().role, "active")
    // A, without NATS, stays out of the way even with the lock free: leading, it would
    // publish nothing. Back on NATS, it leads again.
    await b.stop()
    await sleep(1000)
    assert.notEqual(a.status().role, "active")
    proxy.restore()
    await waitFor(() => a.status().role === "active", {
      timeoutMs: 15_000,
      message: "A leads once its NATS is back",
    })
    await write(t.db, 5, 5, 30)
    await untilPublished("A published 5 more", 10_000)
    assertExactlyOnceInOrder(await readStream(nc, stream), 35)
  })

  test("a leader cut off from NATS steps down on time though the wall clock is stepped back meanwhile", {
    timeout: 90_000,
  }, async () => {
    await fresh()
    await using pair = await leaderAndStandby()
    const { proxy, cutNc, b } = pair
    const wallClock = Date.now
    try {
      await pair.start()
      const disconnected = (async () => {
        for await (const status of cutNc.status()) if (status.type === "disconnect") return
      })()
      proxy.cut()
      await write(t.db, 10, 10)
      // NTP steps the clock back an hour just after A has seen NATS go (its pings unanswered).
      // Measured on that clock, A's outage stayed below stepDownAfterMs for the hour.
      await disconnected
      await sleep(200)
      Date.now = () => wallClock() - 3_600_000
      const deadline = performance.now() + 45_000
      while (b.status().role !== "active" && performance.now() < deadline) await sleep(100)
      Date.now = wallClock
      assert.equal(b.status().role, "active", "B leads: A gave way on the monotonic clock")
      await untilPublished("B published the 10", 20_000)
    } finally {
      Date.now = wallClock
    }
  })

  test("a relay started while its NATS is down does not lead, and shows the backlog meanwhile", async () => {
    await fresh()
    const shared = new URL(SHARED_NATS)
    await using proxy = await createTcpProxy({ host: shared.hostname, port: Number(shared.port) })
    const cutNc = await connectNats({ servers: `nats://${proxy.host}:${proxy.port}` })
    // Dropped before the relay starts, and known to the client by then: the relay, which
    // listens from its start, hears of no disconnect.
    proxy.cut()
    await assert.rejects(cutNc.flush())
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const value = async (name: string) => metricValue((await metrics.render()).body, name)
    const a = createRelay({
      connectionString: t.url,
      site,
      jetstream: jetstream(cutNc),
      connection: cutNc,
      standbyRetryMs: 100,
      retryDelayMs: 100,
      publishTimeoutMs: 1000,
      metrics,
    })
    try {
      await a.start()
      await write(t.db, 5, 5)
      await waitFor(async () => (await value("outbox_pending")) === 5, {
        timeoutMs: 10_000,
        message: "the backlog shown by a relay without NATS",
      })
      // Leading, it would hold the lock and publish nothing.
      assert.notEqual(a.status().role, "active")
      // Stopped, it reports no backlog; started again, still without NATS, it waits again.
      await a.stop()
      assert.equal(await value("outbox_pending"), 0)
      await a.start()
      await sleep(500)
      assert.notEqual(a.status().role, "active")
      proxy.restore()
      await waitFor(() => a.status().role === "active", {
        timeoutMs: 15_000,
        message: "A leads once its NATS is back",
      })
      await untilPublished("published once back", 10_000)
      assertExactlyOnceInOrder(await readStream(nc, stream), 5)
    } finally {
      await a.stop()
      await cutNc.close()
    }
  })

  test("NATS down for a while: the outbox keeps the backlog and the same relay catches up, once", async () => {
    await fresh()
    await withPrivateNats(async ({ server, nc: privateNc, stream: privateStream }) => {
      relay = createRelay({
        connectionString: t.url,
        jetstream: jetstream(privateNc),
        connection: privateNc,
        site,
        pollIntervalMs: 100,
        retryDelayMs: 100,
        publishTimeoutMs: 1000,
      })
      await relay.start()
      await write(t.db, 200, 10)
      await untilPublished("first events published", 10_000)
      await server.stop()
      await write(t.db, 1000, 10, 200)
      await waitFor(() => relay!.status().lastError !== undefined, {
        timeoutMs: 10_000,
        message: "the relay tried and failed against the dead server",
      })
      assert.equal(await unpublishedCount(t.db), 1000, "backlog kept in the outbox")
      // The relay that failed is the one that publishes once the server is back.
      await server.start()
      await untilPublished("the relay caught up after NATS came back", 30_000)
      assert.equal(relay.status().role, "active")
      assertExactlyOnceInOrder(await readStream(privateNc, privateStream), 1200)
    })
  })

  test("while NATS is down the backlog is on /metrics, read on a connection of its own; a relay stopped meanwhile reports none", async () => {
    await fresh()
    await withPrivateNats(async ({ server, nc: privateNc, stream: privateStream }) => {
      const metrics = createMetricsRegistry({ defaultMetrics: false })
      const value = async (name: string) => metricValue((await metrics.render()).body, name)
      const config = {
        connectionString: t.url,
        jetstream: jetstream(privateNc),
        connection: privateNc,
        site,
        pollIntervalMs: 100,
        retryDelayMs: 100,
        publishTimeoutMs: 1000,
      }
      relay = createRelay({ ...config, metrics })
      await relay.start()
      await write(t.db, 200, 10)
      await untilPublished("first events published", 10_000)
      await server.stop()
      await write(t.db, 1000, 10, 200)
      await waitFor(() => relay!.status().lastError !== undefined, {
        timeoutMs: 10_000,
        message: "the relay tried and failed against the dead server",
      })
      await waitFor(async () => (await value("outbox_pending")) === 1000, {
        timeoutMs: 10_000,
        message: "the backlog on /metrics",
      })
      await waitFor(async () => (await value("outbox_oldest_pending_seconds"))! > 0, {
        timeoutMs: 10_000,
        message: "and its age",
      })
      // Scrapes read on a connection of their own, not in line with claims and marks.
      const connections = async (name: string) =>
        (
          await sql<{ n: number }>`select count(*)::int as n from pg_stat_activity
                                    where application_name = ${name}`.execute(t.db)
        ).rows[0]!.n
      assert.equal(await connections(`keyway-relay-metrics:${site}`), 1)
      assert.equal(await connections(`keyway-relay:${site}`), 1)
      // A relay that stops owns no backlog any more: its last figure must not linger on
      // /metrics (the alert takes the max over relays). Another relay takes the work up.
      await relay.stop()
      assert.equal(await value("relay_active"), 0)
      assert.equal(await value("outbox_pending"), 0, "a stopped relay reports no backlog")
      assert.equal(await value("outbox_oldest_pending_seconds"), 0)
      await waitFor(async () => (await connections(`keyway-relay-metrics:${site}`)) === 0, {
        timeoutMs: 5000,
        message: "stop() closed the scrape's connection",
      })
      relay = createRelay(config)
      await relay.start()
      await server.start()
      await untilPublished("the next relay caught up after NATS came back", 30_000)
      assertExactlyOnceInOrder(await readStream(privateNc, privateStream), 1200)
    })
  })

  /** A relay that reaches the test's database through `proxy`; writers and checks go direct. */
  const relayThrough = (
    proxy: { host: string; port: number },
    params = {},
    options: Partial<RelayConfig> = {},
  ) => {
    const url = new URL(t.url)
    url.host = `${proxy.host}:${proxy.port}`
    for (const [name, value] of Object.entries(params)) url.searchParams.set(name, String(value))
    return createRelay({
      connectionString: url.toString(),
      jetstream: jetstream(nc),
      site,
      pollIntervalMs: 100,
      retryDelayMs: 100,
      ...options,
      connection: options.connection ?? nc,
    })
  }
  test("stop() during the pause after a failed publish ends the pause, and the next relay publishes the rest", {
    // The pause below is ten minutes: a stop() that waited it out fails the test instead.
    timeout: 60_000,
  }, async () => {
    await fresh()
    await withPrivateNats(async ({ server, nc: privateNc, stream: privateStream }) => {
      const config = {
        connectionString: t.url,
        jetstream: jetstream(privateNc),
        connection: privateNc,
        site,
        pollIntervalMs: 100,
        publishTimeoutMs: 300,
        stopTimeoutMs: 1000,
      }
      relay = createRelay({ ...config, retryDelayMs: 600_000 })
      await relay.start()
      await write(t.db, 20, 5)
      await untilPublished("first events published", 10_000)
      await server.stop()
      await write(t.db, 30, 5, 20)
      await waitFor(() => relay!.status().lastError !== undefined, {
        timeoutMs: 10_000,
        message: "a publish against the stopped server failed",
      })
      await relay.stop()
      assert.equal(relay.status().role, "stopped")
      relay = createRelay({ ...config, retryDelayMs: 100 })
      await relay.start()
      await server.start()
      await untilPublished("the next relay published the rest", 30_000)
      assertExactlyOnceInOrder(await readStream(privateNc, privateStream), 50)
    })
  })

  test("start() while a stop() is finishing: the new session leads and says so", async () => {
    await fresh()
    const r = await startRelay()
    await waitFor(() => r.status().role === "active", { timeoutMs: 10_000, message: "active" })
    const stopped = r.stop()
    await r.start()
    await stopped
    await write(t.db, 20, 10)
    await untilPublished("published by the new session", 10_000)
    // The old session's end used to set the status it shares with the new one: "stopped".
    assert.equal(r.status().role, "active")
  })

  test("a relay that loses leadership reports no held keys: they are not its to hold", async () => {
    await fresh()
    const jsm = await jetstreamManager(nc)
    const info = await jsm.streams.info(stream)
    await jsm.streams.update(stream, { ...info.config, max_msg_size: 600 })
    const proxy = await createTcpProxy({ host: "127.0.0.1", port: 5432 })
    try {
      const metrics = createMetricsRegistry({ defaultMetrics: false })
      relay = relayThrough(proxy, {}, { metrics, heldRetryMs: 60_000 })
      await relay.start()
      await t.db.transaction().execute((trx) => enqueue(trx, bigItem("big", 1)))
      await waitFor(() => relay!.status().heldKeys === 1, { timeoutMs: 10_000, message: "held" })
      proxy.cut()
      await waitFor(() => relay!.status().role === "connecting", {
        timeoutMs: 5000,
        message: "the relay saw its connection go",
      })
      assert.equal(relay.status().heldKeys, 0)
      assert.equal(metricValue((await metrics.render()).body, "outbox_held_keys"), 0)
      // Back in the lead, it finds the refused event again and holds its key anew.
      proxy.restore()
      await waitFor(() => relay!.status().heldKeys === 1, {
        timeoutMs: 10_000,
        message: "held again once active",
      })
      assert.equal(await unpublishedCount(t.db), 1)
    } finally {
      await relay?.stop()
      relay = undefined
      await proxy.close()
      await jsm.streams.update(stream, { ...info.config, max_msg_size: -1 })
    }
  })
  test("Postgres out of reach for a while: the relay reconnects and publishes the rest, once", async () => {
    await fresh()
    // The relay reaches Postgres through a proxy the test cuts: its connection drops, with
    // it the advisory lock, and every reconnect fails until restore(). Writers go direct.
    const proxy = await createTcpProxy({ host: "127.0.0.1", port: 5432 })
    try {
      relay = relayThrough(proxy)
      await relay.start()
      await write(t.db, 200, 10)
      await untilPublished("first events published", 10_000)
      proxy.cut()
      await waitFor(() => relay!.status().role === "connecting", {
        timeoutMs: 5000,
        message: "the relay saw its connection go",
      })
      await write(t.db, 500, 10, 200)
      await new Promise((r) => setTimeout(r, 1000))
      assert.equal(await unpublishedCount(t.db), 500, "the backlog waits in the outbox")
      assert.equal(relay.status().role, "connecting", "and the relay keeps trying")
      proxy.restore()
      await untilPublished("published after Postgres came back", 30_000)
      assert.equal(relay.status().role, "active")
      assertExactlyOnceInOrder(await readStream(nc, stream), 700)
    } finally {
      await relay?.stop()
      relay = undefined
      await proxy.close()
    }
  })
  test("stop() with Postgres stalled under a statement: the connection is closed after stopTimeoutMs, and nothing is lost", {
    // Unbounded, stop() would wait for as long as Postgres does: fail instead.
    timeout: 60_000,
  }, async () => {
    await fresh()
    const proxy = await createTcpProxy({ host: "127.0.0.1", port: 5432 })
    const { lines, logger } = recordingLogger()
    try {
      relay = relayThrough(proxy, {}, { logger, stopTimeoutMs: 1000 })
      await relay.start()
      await write(t.db, 100, 10)
      await untilPublished("published", 10_000)
      // The relay's next statements (its claims) go out and get no answer.
      proxy.stall()
      await write(t.db, 10, 10, 100)
      await sleep(300)
      await relay.stop()
      assert.ok(
        lines.some((l) => l.message.startsWith("the relay's stop is waiting on Postgres")),
        "the stop said why it closed the connection",
      )
      assert.equal(relay.status().role, "stopped")
      proxy.resume()
      relay = undefined
      await startRelay()
      await untilPublished("the rest published by the next relay", 10_000)
      assertExactlyOnceInOrder(await readStream(nc, stream), 110)
    } finally {
      proxy.resume()
      await relay?.stop()
      relay = undefined
      await proxy.close()
    }
  })

  test("stop() with the relay's statement waiting on a lock: its server session is ended too, leadership and the listening flag with it", {
    timeout: 60_000,
  }, async () => {
    await fresh()
    const { lines, logger } = recordingLogger()
    await write(t.db, 20, 5)
    await startRelay({ logger, stopTimeoutMs: 1000 })
    await untilPublished("published", 10_000)
    // Idle, it listens: the flag is up.
    await waitFor(listening, { timeoutMs: 10_000, message: "the relay listens" })
    const app = `keyway-relay:${site}`
    const backends = async () =>
      (
        await sql<{ n: number }>`select count(*)::int as n from pg_stat_activity
                                  where application_name = ${app}`.execute(t.db)
      ).rows[0]!.n
    assert.equal(await backends(), 1)
    // Someone's long transaction holds the outbox: the relay's next claim waits on it.
    const holder = new pg.Client({ connectionString: t.url })
    await holder.connect()
    try {
      await holder.query("begin")
      await holder.query("lock table keyway.outbox in access exclusive mode")
      await sleep(1500)
      await relay!.stop()
      relay = undefined
      assert.ok(lines.some((l) => l.message.startsWith("the relay's stop is waiting on Postgres")))
      assert.equal(await backends(), 0, "the relay's session is gone from the server")
      assert.equal(await listening(), false, "writers no longer NOTIFY for a relay that is gone")
      const leader = await sql<{ n: number }>`
        select count(*)::int as n from pg_locks where locktype = 'advisory' and granted
           and database = (select oid from pg_database where datname = current_database())`.execute(
        t.db,
      )
      assert.equal(leader.rows[0]!.n, 0, "no session holds the leadership")
    } finally {
      await holder.query("rollback").catch(() => {})
      await holder.end()
    }
    await write(t.db, 5, 5, 20)
    await startRelay()
    await untilPublished("the next relay publishes the rest", 10_000)
    assertExactlyOnceInOrder(await readStream(nc, stream), 25)
  })

  test("a Postgres that accepts and never answers: each connect gives up after connect_timeout, and the relay publishes once it answers", {
    // Unbounded, the connect (and stop(), which waits for it) would hang: fail instead.
    timeout: 90_000,
  }, async () => {
    await fresh()
    // A stalled link (or a server too overloaded to answer) takes the connection and says
    // nothing: pg, unbounded, would wait on the login for ever and the relay with it.
    const proxy = await createTcpProxy({ host: "127.0.0.1", port: 5432 })
    try {
      proxy.stall()
      relay = relayThrough(proxy, { connect_timeout: "2" })
      await relay.start()
      await write(t.db, 100, 10)
      await waitFor(() => /timeout/i.test(relay!.status().lastError ?? ""), {
        timeoutMs: 20_000,
        message: () => `a connect timed out; status ${JSON.stringify(relay!.status())}`,
      })
      assert.equal(relay.status().role, "connecting")
      assert.equal(await unpublishedCount(t.db), 100, "nothing was published meanwhile")
      proxy.resume()
      await untilPublished("published once Postgres answered", 30_000)
      assert.equal(relay.status().role, "active")
      assertExactlyOnceInOrder(await readStream(nc, stream), 100)
    } finally {
      await relay?.stop()
      relay = undefined
      await proxy.close()
    }
  })
})
