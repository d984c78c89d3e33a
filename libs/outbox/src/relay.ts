import type { Socket } from "node:net"
import { setTimeout as sleep } from "node:timers/promises"
import {
  connectTimeoutMillis,
  keepaliveSettings,
  keepaliveSql,
  PreparingClient,
  pgTypes,
} from "@keyway/db"
import { type MetricsRegistry, oldestAnswerSeconds, perScrape } from "@keyway/telemetry"
import type { JetStreamClient } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import pg from "pg"
import { errorMessage } from "./internal/error-message.ts"
import type { OutboxRow, PublishedRow } from "./internal/outbox-row.ts"
import { type PublishBatchOptions, publishBatch } from "./internal/publish-batch.ts"
import {
  claimBatch,
  endSession,
  markPublished,
  pendingSummary,
  prunePublished,
  setListening,
  tryTakeLeadership,
  unmarkRecent,
  vacuumOutbox,
} from "./internal/relay-sql.ts"
import { WakeSignal } from "./internal/wake-signal.ts"

export interface RelayLogger {
  info(message: string, fields?: Record<string, unknown>): void
  warn(message: string, fields?: Record<string, unknown>): void
  error(message: string, fields?: Record<string, unknown>): void
}

export interface RelayConfig {
  /**
   * Postgres holding the outbox. The relay's work and its leadership lock are on one
   * dedicated connection; metrics scrapes and the outbox's vacuum open their own.
   */
  connectionString: string
  /** A JetStream client on a connection the caller owns (see `connectNats`). */
  jetstream: JetStreamClient
  /**
   * The connection under `jetstream` (a JetStreamClient does not expose it). Every reconnect
   * re-publishes the rows of the last `republishWindowMs`: the server may have restarted and
   * lost recent writes. And the relay leads only while it reaches NATS (see
   * `stepDownAfterMs`). Required: left out, a server that lost acked writes had them pruned
   * from the outbox as published, and a leader without NATS never gave way.
   */
  connection: NatsConnection
  /**
   * How long the active relay goes on without NATS (its `connection` disconnected) before it
   * gives up leadership, so that a standby that reaches NATS can publish; a relay without NATS
   * does not compete for leadership until it is back. Default 30 s: a blip is cheaper to ride
   * out than a change of leader, which re-publishes its window.
   */
  stepDownAfterMs?: number
  /** How far back to re-publish on becoming active and after a reconnect. Default 2 min; 0 never. */
  republishWindowMs?: number
  /** This site's name: message ids are `<site>:<seq>`. */
  site: string
  /** Subjects are `<subjectPrefix>.<topic>`. Defaults to `site`. */
  subjectPrefix?: string
  /** Rows claimed per batch. Default 500. */
  batchSize?: number
  /**
   * Payload bytes (of JSON text) claimed per batch, at least one row whatever its size.
   * Default 16 MiB: with payloads of up to 1 MiB, rows alone would let a batch hold hundreds
   * of megabytes.
   */
  batchBytes?: number
  /** Publishes awaiting their PubAck at once. Default 256. */
  window?: number
  /** Fallback poll while listening, in case no NOTIFY arrives. Default 1000 ms. */
  pollIntervalMs?: number
  /**
   * While work was seen within `settleMs`: the pause before the next claim, after an empty
   * claim and after a batch that was not full alike. Default 3 ms.
   */
  busyPollMs?: number
  /** How long after the last work the relay keeps polling at `busyPollMs`. Default 50 ms. */
  settleMs?: number
  /**
   * How long a key whose event NATS refuses for good (larger than the server or stream
   * allows) is left out of claims before the relay tries it again; also the longest a held
   * topic waits between tries (see {@link RelayStatus.heldTopics}). Default 60 s.
   */
  heldRetryMs?: number
  /**
   * How long stop() waits for the session to finish what it has in hand before it closes the
   * session's Postgres connection under it and ends its server session (3 s at most more).
   * Default 6 s: with the rest of a process's stop (the metrics pool 1 s, NATS 2 s, telemetry
   * 2 s), within the 14 s a Keyway process gives its stop (handleStopSignals).
   */
  stopTimeoutMs?: number
  /** How often a standby retries to become active. Default 1000 ms. */
  standbyRetryMs?: number
  /** Pause after a failed publish or a lost connection. Default 500 ms. */
  retryDelayMs?: number
  /** Per-publish PubAck timeout. Default 5000 ms. */
  publishTimeoutMs?: number
  /** Published rows older than this are deleted. Default 24 h; 0 disables pruning. */
  retentionMs?: number
  /** How often retention runs. Default 60 s. */
  pruneIntervalMs?: number
  /** Vacuum the outbox once caught up after publishing this many rows. Default 20,000; 0 never. */
  vacuumEvery?: number
  logger?: RelayLogger
  /**
   * Where the relay registers its metrics (DESIGN.md §7): published and duplicate totals,
   * whether it is the active relay, commit-to-PubAck latency, and, read at each scrape while
   * active, the backlog and the age of its oldest row.
   */
  metrics?: MetricsRegistry
  /**
   * Fault injection for tests: runs after the PubAcks of a batch arrived and before the rows
   * are marked published — the window where a crash forces a re-publish.
   */
  beforeMark?: (rows: readonly PublishedRow[]) => void | Promise<void>
}

export type RelayRole = "stopped" | "connecting" | "standby" | "active"

export interface RelayStatus {
  role: RelayRole
  /**
   * Rows this process published and marked since start, each once: a row sent again after
   * it was marked (the re-publish of recent rows) is not counted again.
   */
  published: number
  /**
   * Rows this process published and marked that the stream already held (a duplicate
   * PubAck): re-publishes after a crash, a failover or a reconnect.
   */
  duplicates: number
  /**
   * Keys held back because NATS refuses one of their events for good, or because a duplicate
   * PubAck for one could not be shown to be that event: the stream holds its id for another
   * (the outbox gave a seq out twice, after a restore), the message under it is gone, or this
   * relay may not read it back.
   */
  heldKeys: number
  /**
   * Topics held back because NATS refuses their subject: no stream takes it, or its stream
   * refuses messages (full, sealed). Tried again after `retryDelayMs`, then twice as long each
   * time up to `heldRetryMs`, and at once after a NATS reconnect.
   */
  heldTopics: number
  lastError?: string
}

export interface Relay {
  start(): Promise<void>
  /** Finishes the batch in flight, releases leadership and closes the connection. */
  stop(): Promise<void>
  status(): RelayStatus
  [Symbol.asyncDispose](): Promise<void>
}

export class RelayError extends Error {
  override name = "RelayError"
}

const quietLogger: RelayLogger = {
  info() {},
  warn(message, fields) {
    console.warn(JSON.stringify({ level: "warn", message, ...fields }))
  },
  error(message, fields) {
    console.error(JSON.stringify({ level: "error", message, ...fields }))
  },
}

/** Rows per retention delete: few enough locks and little enough time per statement. */
const PRUNE_BATCH = 1000

/**
 * The scrape's connection: never a seq scan (see the session's), and bounded in time, so a
 * Postgres that does not answer fails the scrape's backlog gauges instead of hanging the
 * scrape or stop().
 */
function openMetricsPool(connectionString: string, site: string): pg.Pool {
  const pool = new pg.Pool({
    connectionString,
    // Its 'error' listener: a scrape on a connection that drops must fail, not crash.
    Client: PreparingClient,
    max: 1,
    idleTimeoutMillis: 30_000,
    connectionTimeoutMillis: 2000,
    query_timeout: 6000,
    application_name: `keyway-relay-metrics:${site}`,
    ...keepaliveSettings,
  })
  // An idle connection that dies reports here; the next scrape opens another.
  pool.on("error", () => {})
  // Per session, not as a startup `options` parameter, for the reasons of keepaliveSql: it
  // would replace the connection string's own options, and PgBouncer refuses it.
  pool.on(
    "connect",
    (client) =>
      void client
        .query(`${keepaliveSql}; set enable_seqscan = off; set statement_timeout = 5000`)
        .catch(() => {}),
  )
  return pool
}

// What a forced stop spends on ending the stuck session from a second connection: in all,
// and per step (connect, terminate, the listening flag).
const END_SESSION_MS = 3000
const END_SESSION_STEP_MS = 1500

/**
 * The relay: publishes outbox rows to JetStream, each exactly once in the stream.
 *
 * Exactly once comes from two halves. Rows are marked only after their PubAck, so a crash
 * re-publishes instead of losing; and the message id `<site>:<seq>` makes JetStream drop the
 * re-publish as a duplicate within the stream's duplicate_window. A duplicate for a row the
 * relay did not know published is read back first: after a restore of the outbox's database
 * the id can be an earlier event's, and the row is held instead (publish-batch.ts).
 */
export function createRelay(config: RelayConfig): Relay {
  // The site names every event (`<site>:<seq>`) and, unless told otherwise, its subjects: an
  // empty one, or one with a dot or a wildcard, made events every consumer group rejects.
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(config.site ?? "")) {
    throw new RelayError(
      `site ${JSON.stringify(config.site)} must be 1-64 letters, digits, "_" or "-"`,
    )
  }
  const settings = {
    // Read here, so that a bad connect_timeout fails createRelay() rather than every session.
    connectTimeoutMs: connectTimeoutMillis(config.connectionString),
    batchSize: config.batchSize ?? 500,
    batchBytes: config.batchBytes ?? 16 * 1024 * 1024,
    pollIntervalMs: config.pollIntervalMs ?? 1000,
    busyPollMs: config.busyPollMs ?? 3,
    settleMs: config.settleMs ?? 50,
    standbyRetryMs: config.standbyRetryMs ?? 1000,
    retryDelayMs: config.retryDelayMs ?? 500,
    retentionMs: config.retentionMs ?? 24 * 3600_000,
    pruneIntervalMs: config.pruneIntervalMs ?? 60_000,
    vacuumEvery: config.vacuumEvery ?? 20_000,
    republishWindowMs: config.republishWindowMs ?? 120_000,
    heldRetryMs: config.heldRetryMs ?? 60_000,
    stopTimeoutMs: config.stopTimeoutMs ?? 6000,
    stepDownAfterMs: config.stepDownAfterMs ?? 30_000,
  }
  // Refused by name: a batch of 0 claimed nothing and the relay polled for ever without a
  // word, a poll of 0 spun, a fraction of a row or a window of 0 published nothing.
  const counts = { batchSize: settings.batchSize, window: config.window ?? 256 }
  for (const [name, value] of Object.entries(counts)) {
    if (!Number.isInteger(value) || value < 1) {
      throw new RelayError(`${name} must be a whole number of at least 1, not ${value}`)
    }
  }
  const positive = {
    batchBytes: settings.batchBytes,
    pollIntervalMs: settings.pollIntervalMs,
    busyPollMs: settings.busyPollMs,
    standbyRetryMs: settings.standbyRetryMs,
    retryDelayMs: settings.retryDelayMs,
    publishTimeoutMs: config.publishTimeoutMs ?? 5000,
  }
  for (const [name, value] of Object.entries(positive)) {
    if (!(value > 0) || !Number.isFinite(value)) {
      throw new RelayError(`${name} must be a number above 0, not ${value}`)
    }
  }
  // 0 is meaningful for these (never prune, never re-publish, …); NaN, from an unset variable
  // read as a number, turned each check of it false: pruning and re-publishing off without a
  // word, a leader without NATS never stepping down.
  const durations = {
    settleMs: settings.settleMs,
    retentionMs: settings.retentionMs,
    pruneIntervalMs: settings.pruneIntervalMs,
    vacuumEvery: settings.vacuumEvery,
    republishWindowMs: settings.republishWindowMs,
    heldRetryMs: settings.heldRetryMs,
    stopTimeoutMs: settings.stopTimeoutMs,
    stepDownAfterMs: settings.stepDownAfterMs,
  }
  for (const [name, value] of Object.entries(durations)) {
    if (!(value >= 0) || !Number.isFinite(value)) {
      throw new RelayError(`${name} must be a number of at least 0, not ${value}`)
    }
  }
  // A subject token each: empty, or with a wildcard or a space, every publish failed with
  // nothing but "publish failed; will retry". Dots are allowed: a prefix may be a path.
  const prefix = config.subjectPrefix ?? config.site
  if (!/^[^\s.*>]+(\.[^\s.*>]+)*$/.test(prefix)) {
    throw new RelayError(
      `subjectPrefix ${JSON.stringify(prefix)} must be NATS subject tokens joined by dots, without spaces, "*" or ">"`,
    )
  }
  const publishOptions: PublishBatchOptions = {
    site: config.site,
    subjectPrefix: prefix,
    window: counts.window,
    timeoutMs: config.publishTimeoutMs ?? 5000,
  }
  const log = config.logger ?? quietLogger
  const state: Omit<RelayStatus, "heldKeys" | "heldTopics"> = {
    role: "stopped",
    published: 0,
    duplicates: 0,
  }
  // Keys with an event NATS refuses for good, by `topic \u001f key`: left out of claims
  // until their retryAt, then tried again (the limit may have been raised meanwhile). Their
  // rows stay in the outbox, and KeywayOutboxStuck fires on the oldest of them.
  const held = new Map<string, { topic: string; key: string; retryAt: number }>()
  // Topics NATS refuses whole (see refusal() in publish-batch.ts), left out of claims until
  // their retryAt. Kept until one of their events is published, for the back-off: a topic
  // with no stream for a week is tried once a minute, not twice a second.
  const heldTopics = new Map<string, { retryAt: number; refusals: number }>()
  const wake = new WakeSignal()
  let fiber: Fiber.Fiber<never, never> | undefined
  let vacuumedAt = 0
  // Set on start (a new leader does not know what the previous one's server kept) and by
  // every NATS reconnect; consumed by the session loop before its next claim.
  let republishDue = true
  /**
   * When the NATS connection was lost (performance.now(): a wall clock stepped back meanwhile
   * would move the re-publish's window), until the re-publish after it has run.
   */
  let lostAt: number | undefined
  /**
   * Since when `config.connection` has been disconnected, or not yet known to be connected;
   * undefined while it is connected. `natsLosses` counts disconnects, so that a flush sent
   * before one cannot report the connection up after it.
   */
  let natsDownSince: number | undefined
  let natsLosses = 0
  // Every time kept here is on the monotonic clock (performance.now()), as lostAt is: a wall
  // clock stepped back an hour during an outage kept the leader on for that hour past
  // stepDownAfterMs, and one stepped back while idle kept it claiming every busyPollMs.
  let vacuuming: Promise<void> | undefined
  let vacuumAborter: AbortController | undefined
  /** The session's connection while it is open: stop() may have to close it under the session. */
  let sessionClient: pg.Client | undefined
  let stopStatuses: (() => void) | undefined
  // The backlog gauges read on a connection of their own: on the session's connection a
  // scrape's count(*) would wait in line behind claims and marks, and hold them up in turn,
  // exactly when the backlog is large. Made on the first scrape, closed by stop().
  let metricsPool: pg.Pool | undefined
  const publishSeconds = config.metrics?.histogram({
    name: "outbox_publish_seconds",
    help: "From the writer's enqueue to the stream's PubAck, per event, when first marked (a re-publish of rows already marked is not timed)",
  })
  if (config.metrics) {
    const m = config.metrics
    m.collectedCounter({
      name: "outbox_published_total",
      help: "Outbox rows this relay published and marked, each once (a re-publish of rows already marked is not counted)",
      collect: () => state.published,
    })
    m.collectedCounter({
      name: "outbox_duplicates_total",
      help: "PubAcks that reported a duplicate: re-publishes after a crash or a reconnect",
      collect: () => state.duplicates,
    })
    m.collectedGauge({
      name: "outbox_held_keys",
      help: "Keys this relay holds back: NATS refuses one of their events for good (too large), or a duplicate PubAck for one could not be shown to be that event (its id held by another after a restore of the outbox, its message gone, or no right to read it back)",
      collect: () => held.size,
    })
    m.collectedGauge({
      name: "outbox_held_topics",
      help: "Topics this relay holds back because NATS refuses their subject (no stream takes it, its stream is full or sealed, or the relay's user may not publish to it)",
      collect: () => heldTopics.size,
    })
    m.collectedGauge({
      name: "relay_active",
      help: "1 while this relay holds the outbox's leadership, 0 on standby",
      collect: () => (state.role === "active" ? 1 : 0),
    })
    // One query per scrape, shared by the two gauges below (the registry collects them
    // together). The active relay reads the backlog; a standby reports none, so a relay
    // that lost leadership does not keep its last figure (KeywayOutboxStuck takes the max).
    // So does a relay without NATS: none leads while NATS is down everywhere, and the
    // backlog of the outage must still show.
    const pending = perScrape(async () => {
      if (state.role !== "active" && natsDownSince === undefined) {
        return { pending: 0, oldestSeconds: 0 }
      }
      metricsPool ??= openMetricsPool(config.connectionString, config.site)
      return pendingSummary(metricsPool)
    })
    m.collectedGauge({
      name: "outbox_pending",
      help: "Outbox rows not yet published (read by the active relay and by any without NATS; 0 on a standby)",
      collect: async () => (await pending())?.pending,
    })
    m.collectedGauge({
      name: "outbox_oldest_pending_seconds",
      help: "Age of the oldest unpublished outbox row, 0 when there is none",
      collect: async () => (await pending())?.oldestSeconds,
    })
    m.collectedGauge({
      name: "outbox_metrics_read_age_seconds",
      help: "Since this relay's read of the backlog last answered: while it fails (Postgres away, a count past its statement timeout) the two gauges above keep their last values, and alerts on them see nothing",
      collect: () => oldestAnswerSeconds([pending]),
    })
  }

  const query = <A>(what: string, run: () => Promise<A>) =>
    Effect.tryPromise({
      try: run,
      catch: (cause) => new RelayError(`${what}: ${errorMessage(cause)}`, { cause }),
    })

  // A dedicated connection: it holds the advisory lock (session-scoped, so it is released
  // when the connection closes or the process dies) and receives the NOTIFYs.
  const connection = Effect.acquireRelease(
    query("connect to Postgres", async () => {
      const client = new PreparingClient({
        connectionString: config.connectionString,
        application_name: `keyway-relay:${config.site}`,
        types: pgTypes,
        // Above all here: this connection holds the leadership lock.
        ...keepaliveSettings,
        // Without it, a Postgres that accepts and never answers holds the session here for
        // ever, and the relay neither publishes nor logs why.
        connectionTimeoutMillis: settings.connectTimeoutMs,
      })
      // Known to stop() from here on: a Postgres that stalls in the statements below would
      // otherwise hold the stop (the acquisition of a resource is not interrupted).
      sessionClient = client
      // A dead connection shows up as failing queries (PreparingClient keeps pg's 'error'
      // event from crashing the process).
      client.on("notification", () => wake.notify())
      try {
        await client.connect()
        // Every relay statement is meant to walk an index (the unpublished partial index, the
        // primary key, the published_at index). On a young table the planner's size estimate
        // is stale until the first autovacuum and it chose seq scans of a 100k-row outbox for
        // the claim (measured: 221 seq scans reading 217k rows in one bench run). Forbidding
        // them on this session keeps the claim an index scan whatever the statistics say.
        await client.query("set enable_seqscan = off")
        await client.query(keepaliveSql)
      } catch (err) {
        // Not yet in the scope's hands: closed here, or every retry would leave one open.
        if (sessionClient === client) sessionClient = undefined
        await client.end().catch(() => {})
        throw err
      }
      return client
    }),
    (client) =>
      Effect.promise(async () => {
        await client.end().catch(() => {})
        if (sessionClient === client) sessionClient = undefined
      }),
  )

  const publishAndMark = (client: pg.Client, rows: OutboxRow[], inOrder: boolean) =>
    Effect.gen(function* () {
      const result = yield* Effect.promise(() =>
        publishBatch(config.jetstream, rows, { ...publishOptions, inOrder }),
      )
      if (config.beforeMark)
        yield* Effect.promise(async () => config.beforeMark?.(result.published))
      yield* query("mark published", () => markPublished(client, result.published))
      // A row sent again by the re-publish of recent rows (every new leader, every reconnect
      // makes one) was counted and timed when first marked; it keeps its stream_seq. Counted
      // again, each doubled the published rate and put minutes into the latency's p99. A row
      // never marked is counted now even if its PubAck says duplicate: an earlier send that
      // was stored but whose PubAck never came (a NATS stall past publishTimeoutMs, a crash
      // before the mark), and its latency is the incident's.
      const resent = new Set(rows.filter((r) => r.stream_seq !== null).map((r) => r.seq))
      const stored = result.published.filter((r) => !resent.has(r.seq))
      if (publishSeconds) {
        const now = Date.now()
        const createdAt = new Map(rows.map((r) => [r.seq, r.created_at.getTime()]))
        // Two clocks, the writer's database's and this host's: one ahead of the other by more
        // than the latency made a negative time, which lowered every quantile. Counted as none.
        for (const r of stored) {
          publishSeconds.observe(Math.max(0, now - createdAt.get(r.seq)!) / 1000)
        }
      }
      state.published += stored.length
      state.duplicates += result.published.filter((r) => r.duplicate).length
      if (heldTopics.size > 0) {
        const sent = new Set(result.published.map((p) => p.seq))
        for (const r of rows) {
          if (sent.has(r.seq) && heldTopics.delete(r.topic)) {
            log.info("a held topic is published again", { topic: r.topic })
          }
        }
      }
      for (const { row, holds, reason } of result.refused) {
        if (holds === "topic") {
          const refusals = (heldTopics.get(row.topic)?.refusals ?? 0) + 1
          const retryInMs = Math.min(
            settings.retryDelayMs * 2 ** Math.min(refusals - 1, 20),
            settings.heldRetryMs,
          )
          heldTopics.set(row.topic, { retryAt: performance.now() + retryInMs, refusals })
          // An error: nothing of this topic moves until someone declares or mends its stream.
          log.error("NATS refuses a topic; it is held, the other topics go on", {
            topic: row.topic,
            seq: row.seq,
            key: row.key,
            ver: row.ver,
            reason,
            refusals,
            retryInMs,
          })
          continue
        }
        const id = `${row.topic}\u001f${row.key}`
        if (held.has(id)) continue
        held.set(id, {
          topic: row.topic,
          key: row.key,
          retryAt: performance.now() + settings.heldRetryMs,
        })
        // An error, not a warning: nothing of this key moves until someone raises the limit
        // (or deletes the row and skips its version in the consumer groups). An id another
        // event holds is published once the stream's duplicate window has passed, and the
        // consumer groups then keep it among their rejects (the same id twice), for an
        // operator: `just admin rejects`.
        log.error("an event cannot be published; its key is held, the others go on", {
          seq: row.seq,
          topic: row.topic,
          key: row.key,
          ver: row.ver,
          reason,
          retryInMs: settings.heldRetryMs,
        })
      }
      if (result.error !== undefined) {
        // Not a session failure: leadership and the Postgres connection are fine. Unsent
        // rows stay unpublished and the next claim picks them up after a pause.
        state.lastError = errorMessage(result.error)
        log.warn("publish failed; will retry", {
          error: state.lastError,
          published: result.published.length,
          pending: rows.length - result.published.length,
        })
      }
      return result.error !== undefined
    })

  const session = Effect.gen(function* () {
    state.role = "connecting"
    const client = yield* connection
    state.role = "standby"
    // Not without NATS: leading, it would hold off a standby that can publish.
    while (
      natsDownSince !== undefined ||
      !(yield* query("take leadership", () => tryTakeLeadership(client)))
    ) {
      yield* Effect.sleep(settings.standbyRetryMs)
    }
    state.role = "active"
    // Leadership ends with this scope (the lock goes with the connection): from then on the
    // backlog is not this relay's to report, even while stop() still waits for a vacuum.
    // Nor are the held keys: on standby nothing would expire them, and the relay that leads
    // next, this one included, learns again which events NATS refuses. Nor is a loss of NATS
    // not yet re-published: it would anchor this relay's next re-publish, hours later perhaps,
    // on a time that tells nothing of what the leader meanwhile had acked.
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        state.role = "connecting"
        held.clear()
        heldTopics.clear()
        lostAt = undefined
      }),
    )
    log.info("relay active", { site: config.site })
    yield* query("listen", () => client.query("listen keyway_outbox"))
    // A relay that stops is not listening: without this, writers would keep paying for
    // NOTIFYs nobody receives until the next relay starts. (Runs before the connection closes:
    // finalizers run in reverse order.)
    yield* Effect.addFinalizer(() =>
      Effect.promise(() => setListening(client, false).catch(() => {})),
    )
    // Writers NOTIFY only while the relay says it is listening (asleep, waiting for one),
    // because NOTIFY serialises their commits. While work came in the last settleMs the
    // relay polls every busyPollMs instead, so a steady flow never flips the flag. After it
    // raises the flag it claims once more, busyPollMs later: that catches writers who read
    // "not listening" and committed just after. A writer slower than that is caught by the
    // fallback poll (DESIGN.md invariant 5).
    let listening: boolean | undefined
    let lastWorkAt = performance.now()
    let nextPruneAt = 0
    let prunedInRound = 0
    republishDue = true
    // While the rows the re-publish unmarked are being sent again.
    let resending = false
    for (;;) {
      // Ends the session, and leadership with it (the lock goes with the connection): relays
      // whose NATS is up compete for it, and this one waits until its own is back.
      if (
        natsDownSince !== undefined &&
        performance.now() - natsDownSince >= settings.stepDownAfterMs
      ) {
        return yield* Effect.fail(
          new RelayError(
            `no NATS for ${Math.round((performance.now() - natsDownSince) / 1000)} s: leadership given up until it is back`,
          ),
        )
      }
      if (republishDue) {
        republishDue = false
        const lostAgoMs = lostAt === undefined ? undefined : performance.now() - lostAt
        // Cleared with a window of 0 too: pruning waits for lostAt to clear, and stopped for
        // the rest of the session after the first NATS blip.
        lostAt = undefined
        if (settings.republishWindowMs > 0) {
          const n = yield* query("re-publish recent rows", () =>
            unmarkRecent(client, settings.republishWindowMs, lostAgoMs),
          )
          if (n > 0) log.info("re-publishing recent rows", { rows: n })
          // Also when this one unmarked none: an earlier session's may be left.
          resending = true
        }
      }
      // Each key for its own time: one held an hour after another is not tried again early.
      const now = performance.now()
      for (const [id, h] of held) {
        if (now < h.retryAt) continue
        held.delete(id)
        log.info("trying a held key again", { topic: h.topic, key: h.key })
      }
      const claim = (resent: boolean) =>
        query("claim", () =>
          claimBatch(
            client,
            settings.batchSize,
            settings.batchBytes,
            [...held.values()].map(({ topic, key }) => ({ topic, key })),
            [...heldTopics].filter(([, h]) => now < h.retryAt).map(([topic]) => topic),
            resent,
          ),
        )
      // The rows sent again first, alone and in the stream's order (claimBatch says why).
      let inOrder: boolean = resending
      let { rows, full } = yield* claim(resending)
      if (resending && rows.length === 0) {
        resending = inOrder = false
        ;({ rows, full } = yield* claim(false))
      }
      // A full batch means a backlog: claim again at once, after the upkeep below.
      let backlog = false
      if (rows.length > 0) {
        if (listening !== false) {
          listening = false
          yield* query("stop listening", () => setListening(client, false))
        }
        // A batch in flight is finished even on stop(): its PubAcks are in, and marking them
        // now spares a re-publish after the restart.
        const failed = yield* Effect.uninterruptible(publishAndMark(client, rows, inOrder))
        // The pause after a failure is not part of the batch: stop() ends it, where inside
        // the uninterruptible batch it held the stop past stopTimeoutMs for as long as it is.
        if (failed) yield* Effect.sleep(settings.retryDelayMs)
        // Counted from the batch's end: one whose PubAcks took longer than settleMs must not
        // make the pause below raise the listening flag in the middle of a steady flow.
        lastWorkAt = performance.now()
        // A backlog claims again at once. Otherwise pause busyPollMs like after an empty
        // claim. Claiming again at once kept a steady flow in batches of two or three rows,
        // each with its own claim, mark and commit, and those round trips took the CPU that
        // the rest of the pipeline needed. `just bench pipeline` (1 event per tx, back
        // to back), a 2 ms claim-at-once relay against a 5 ms paced one: 1,268 against 1,517
        // events/s, 1.54 against 1.26 ms of machine CPU per event, p99 at 1,000 events/s 102
        // against 63 ms. `just bench relay` pays for it: commit-to-stream p50 1.3 -> 5.5 ms,
        // p99 5 -> 12 ms. A 3 ms pause measured about the same as 5, an 8 ms one worse (p99
        // 99.5 ms): past a few ms, the wait costs more than the larger batch saves. 3 rather
        // than 5 since session 19: `just bench relay` runs, interleaved (9 at 5 ms, 4 at 3),
        // commit to a consumer p50 5.9-6.7 -> 4.3-4.6 ms, p99 15.9-20.2 -> 11.3-16.5 ms;
        // keyway-only pipeline runs, two each, made 863 and 901 events/s at 3 ms, 1,011 and
        // 671 at 5: today's machine varies more than the pause moves it.
        backlog = full
      }
      // Upkeep runs on its own schedule, backlog or not: a catch-up after an outage of hours
      // is when the table is largest, and it went neither pruned nor vacuumed while every
      // batch came back full.
      if (
        settings.vacuumEvery > 0 &&
        state.published + state.duplicates - vacuumedAt >= settings.vacuumEvery &&
        !vacuuming
      ) {
        vacuumedAt = state.published + state.duplicates
        const aborter = new AbortController()
        vacuumAborter = aborter
        vacuuming = vacuumOutbox(config.connectionString, settings.connectTimeoutMs, aborter.signal)
          .catch((err) => {
            if (!aborter.signal.aborted) log.warn("vacuum failed", { error: errorMessage(err) })
          })
          .finally(() => {
            vacuuming = undefined
          })
      }
      // One batch per turn of the loop, between claims: after a long backlog or outage the
      // rows past retention can be hundreds of thousands, and deleting them all at once held
      // up publishing for as long. While some are left, the loop comes back at once.
      let pruneBehind = false
      // Not while NATS is lost, nor before the re-publish after it: that takes the rows
      // published just before the loss (the server may not have synced them), and an outage
      // longer than retention had them pruned first, lost for good.
      if (
        settings.retentionMs > 0 &&
        performance.now() >= nextPruneAt &&
        lostAt === undefined &&
        natsDownSince === undefined
      ) {
        // Upkeep, not publishing: a prune that fails (a role without DELETE, a damaged index)
        // is reported and tried again at the next interval. Ending the session for it made
        // every new session re-publish its window, then fail here again: a loop of
        // duplicates that never got past the window. A connection that is gone fails the
        // next claim and ends the session there.
        const pruned = yield* query("prune", () =>
          prunePublished(client, settings.retentionMs, PRUNE_BATCH),
        ).pipe(
          Effect.catch((err) =>
            Effect.sync(() => {
              log.warn("prune failed; publishing goes on", {
                error: err.message,
                retryInMs: settings.pruneIntervalMs,
              })
              return 0
            }),
          ),
        )
        prunedInRound += pruned
        pruneBehind = pruned >= PRUNE_BATCH
        if (!pruneBehind) {
          nextPruneAt = performance.now() + settings.pruneIntervalMs
          if (prunedInRound > 0) log.info("pruned published rows", { pruned: prunedInRound })
          prunedInRound = 0
        }
      }
      if (backlog) continue
      let pause = settings.pollIntervalMs
      if (pruneBehind) pause = 0
      else if (performance.now() - lastWorkAt < settings.settleMs) pause = settings.busyPollMs
      else if (listening !== true) {
        listening = true
        yield* query("start listening", () => setListening(client, true))
        pause = settings.busyPollMs
      }
      yield* Effect.promise((signal) => wake.wait(pause, signal))
    }
  })

  // Forever: a lost connection ends the session (and, with it, leadership); wait, reconnect
  // and compete for leadership again.
  const program: Effect.Effect<never> = Effect.forever(
    session.pipe(
      Effect.scoped,
      Effect.catchCause((cause) =>
        Effect.gen(function* () {
          state.lastError = Cause.pretty(cause)
          state.role = "connecting"
          log.warn("relay session ended; reconnecting", {
            error: errorMessage(Cause.squash(cause)),
          })
          yield* Effect.sleep(settings.retryDelayMs)
        }),
      ),
    ),
  )

  // A stop() still finishing: its session's end clears the state that sessions share, so a
  // start() waits for it rather than begin a session that the old one's end would report as
  // stopped while it leads.
  let stopping: Promise<void> | undefined

  return {
    async start() {
      await stopping
      if (fiber) return
      fiber = Effect.runFork(program)
      if (config.connection) {
        // Down until a round trip says otherwise: the statuses below tell only of what
        // happens from now on, and a connection that dropped before (while the app waited
        // for JetStream, or between a stop() and this start()) would otherwise count as up.
        natsDownSince = performance.now()
        const losses = natsLosses
        void config.connection.flush().then(
          () => {
            if (natsLosses === losses) natsDownSince = undefined
          },
          () => {},
        )
        // nats.js hands out a queued iterator that stop() ends; without that, each start()
        // after a stop() would add one more listener for the connection's lifetime.
        const statuses = config.connection.status() as AsyncIterable<{ type: string }> & {
          stop?: () => void
        }
        stopStatuses = () => statuses.stop?.()
        void (async () => {
          for await (const s of statuses) {
            // Only a leader's loss anchors a re-publish: a standby's would be stale by the
            // time it leads, and a new leader re-publishes from the newest publish anyway.
            if (s.type === "disconnect") {
              natsLosses++
              natsDownSince ??= performance.now()
              if (state.role === "active") lostAt ??= performance.now()
            }
            if (s.type === "reconnect") {
              natsDownSince = undefined
              republishDue = true
              // The server may have lost or gained streams meanwhile (a restart with another
              // configuration): held topics are tried again at once.
              heldTopics.clear()
              wake.notify()
            }
          }
        })()
      }
    },
    async stop() {
      if (!fiber) return stopping
      const running = fiber
      fiber = undefined
      stopStatuses?.()
      stopStatuses = undefined
      // Stopped, it reports no backlog (nor opens a pool for one after stop() closed it).
      natsDownSince = undefined
      // A statement that never returns (a Postgres overloaded or stalled, a lock someone holds
      // on the outbox) held the stop for as long, past any supervisor's patience: the batch in
      // flight finishes uninterrupted, and the session's last statements (the listening flag)
      // run before its connection closes. Past stopTimeoutMs the connection is closed under
      // them: they fail, the session ends, and rows published but not marked are re-published
      // by the next leader, which the stream drops as duplicates.
      let ending: Promise<void> | undefined
      const forcing = setTimeout(() => {
        const client = sessionClient as
          | (pg.Client & { connection?: { stream?: Socket }; processID?: number })
          | undefined
        if (!client) return
        log.warn("the relay's stop is waiting on Postgres; closing its connection", {
          afterMs: settings.stopTimeoutMs,
        })
        // pg's end() waits for the server's goodbye, which a stalled server never sends.
        client.connection?.stream?.destroy()
        if (client.processID !== undefined) {
          // Bounded as a whole: a stalled link stalls this connection too.
          ending = Promise.race([
            endSession(config.connectionString, client.processID, END_SESSION_STEP_MS),
            sleep(END_SESSION_MS).then(() => {
              throw new Error(`no answer within ${END_SESSION_MS} ms`)
            }),
          ]).catch((err) =>
            log.warn("could not end the relay's Postgres session", { error: errorMessage(err) }),
          )
        }
      }, settings.stopTimeoutMs)
      const done = (async () => {
        await Effect.runPromise(Fiber.interrupt(running))
        clearTimeout(forcing)
        await ending
        state.role = "stopped"
        const pool = metricsPool
        metricsPool = undefined
        // A scrape's statement in flight would hold the pool's end for its query_timeout.
        await Promise.race([pool?.end().catch(() => {}), sleep(1000)])
        vacuumAborter?.abort()
        await vacuuming
      })()
      stopping = done
      try {
        await done
      } finally {
        if (stopping === done) stopping = undefined
      }
    },
    status: () => ({ ...state, heldKeys: held.size, heldTopics: heldTopics.size }),
    [Symbol.asyncDispose]() {
      return this.stop()
    },
  }
}
