import { keepaliveSettings } from "@keyway/db"
import pg from "pg"
import type { OutboxRow, PublishedRow } from "./outbox-row.ts"

// All of the relay's SQL. Its work runs on one dedicated connection, which also holds the
// advisory lock that makes this relay the active one: if it drops, the lock goes with it and
// so does every statement below, so a relay that lost leadership cannot mark anything. (The
// backlog summary for metrics and the outbox's vacuum run on connections of their own.)

/** Arbitrary but fixed: the advisory lock key that elects one active relay per database. */
const RELAY_LOCK_KEY = 0x6b657977 // "keyw"

export async function tryTakeLeadership(client: pg.Client): Promise<boolean> {
  const r = await client.query<{ ok: boolean }>("select pg_try_advisory_lock($1) as ok", [
    RELAY_LOCK_KEY,
  ])
  return r.rows[0]!.ok
}

/**
 * Ends a relay's Postgres session from another connection: the one a stop gave up on (see
 * stopTimeoutMs in relay.ts). Closing its socket does not end it on the server: a session
 * waiting on a lock keeps waiting, holding the leadership lock so that no standby takes
 * over, until it next writes to the socket. And its listening flag stays up, so writers
 * NOTIFY for nobody. Both are mended here; each step bounded by `timeoutMs`, as a stalled
 * server would hold this connection too.
 */
export async function endSession(connectionString: string, pid: number, timeoutMs: number) {
  const client = new pg.Client({
    connectionString,
    connectionTimeoutMillis: timeoutMs,
    query_timeout: timeoutMs,
  })
  client.on("error", () => {}) // a failure shows in the query that meets it
  try {
    await client.connect()
    // Waits (up to the bound) for the session to be gone, with its locks.
    await client.query("select pg_terminate_backend($1, $2)", [pid, timeoutMs])
    // Only while no relay leads (this connection takes the lock to know, and lets it go as it
    // closes): a new leader's flag is its own.
    await client.query(
      "update keyway.relay_state set listening = false where id = 1 and pg_try_advisory_lock($1)",
      [RELAY_LOCK_KEY],
    )
  } finally {
    await client.end().catch(() => {})
  }
}

// Claimed by state, never by a `seq > cursor`: a row that commits late with a low seq is
// still unpublished, so the next claim finds it. Only the active relay reads here, so no
// row locks are needed. The partial index keeps this cheap however large the table grows.
// Held keys and topics (NATS refuses them, see refusal() in publish-batch.ts) are left out
// whole, so that their rows do not fill every batch while the rest of the outbox waits.
// A batch ends at `limit` rows or at the row that takes its payloads past `maxBytes` (of
// JSON text), whichever comes first, and has one row at least: rows alone bounded the relay's
// memory at 500 payloads of up to 1 MiB each, parsed and encoded again, and a relay that ran
// out of it claimed the same batch after its restart. `full` says that rows were left for
// the next claim.
//
// `resent`: only rows sent before and unmarked by the re-publish of recent rows
// (unmarkRecent), in the order the stream stored them (sql/0023's index). A stream that lost
// its unsynced tail in a crash numbers what it takes next from the first sequence it lost;
// a copy sourcing it (FACTORY_IN) resumes at the sequence after the last it copied, which may
// be inside that range. Sent again in their old order before anything new, the lost events
// take their old sequences again, and the copy misses none. A new event among them took one
// of those sequences, and a copy that had copied past it never saw it: its key waited on the
// gap for good.
export async function claimBatch(
  client: pg.Client,
  limit: number,
  maxBytes: number,
  heldKeys: readonly { topic: string; key: string }[],
  heldTopics: readonly string[],
  resent = false,
): Promise<{ rows: OutboxRow[]; full: boolean }> {
  // Ties broken by seq: a stream_seq from an earlier stream of the same name (deleted and made
  // again within the window) can equal a later one, and the running sum below must not count
  // tied rows' bytes together.
  const order = resent ? "stream_seq, seq" : "seq"
  const r = await client.query<OutboxRow & { candidates: number }>(
    `select seq, topic, key, ver, type, payload, trace, created_at, stream_seq,
            candidates::int as candidates
       from (select o.*,
                    sum(o.bytes) over (order by ${order}) - o.bytes as before,
                    count(*) over () as candidates
               from (select seq, topic, key, ver, type, payload, trace, created_at, stream_seq,
                            -- A compressed one by its text's length, which is what the relay
                            -- holds, parsed and encoded again; compressed, its stored size
                            -- can be a hundredth of that.
                            case when pg_column_compression(payload) is null
                                 then pg_column_size(payload)
                                 else octet_length(payload::text) end as bytes
                       from keyway.outbox
                      where published_at is null ${resent ? "and stream_seq is not null" : ""}
                        and (topic, key) not in (select * from unnest($2::text[], $3::text[]))
                        and topic <> all($4::text[])
                      order by ${order}
                      limit $1) o) c
      where c.before < $5 or c.before = 0
      order by ${order}`,
    [limit, heldKeys.map((h) => h.topic), heldKeys.map((h) => h.key), heldTopics, maxBytes],
  )
  const candidates = r.rows[0]?.candidates ?? 0
  const rows = r.rows.map(({ candidates: _, ...row }) => row)
  return { rows, full: rows.length >= limit || rows.length < candidates }
}

/** The backlog and the age of its oldest row, both through the unpublished partial index. */
export async function pendingSummary(
  client: pg.Pool | pg.Client,
): Promise<{ pending: number; oldestSeconds: number }> {
  const r = await client.query<{ pending: number; oldest_seconds: number | null }>(
    `select (select count(*)::int from keyway.outbox where published_at is null) as pending,
            (select extract(epoch from now() - created_at)::float8
               from keyway.outbox where published_at is null order by seq limit 1) as oldest_seconds`,
  )
  return { pending: r.rows[0]!.pending, oldestSeconds: Math.max(0, r.rows[0]!.oldest_seconds ?? 0) }
}

/** One statement for the whole batch: a commit costs far more than a publish. */
export async function markPublished(
  client: pg.Client,
  rows: readonly PublishedRow[],
): Promise<void> {
  if (rows.length === 0) return
  await client.query(
    `update keyway.outbox o
        set published_at = now(), stream_seq = x.stream_seq
       from unnest($1::bigint[], $2::bigint[]) as x(seq, stream_seq)
      where o.seq = x.seq`,
    [rows.map((r) => r.seq), rows.map((r) => r.streamSeq)],
  )
}

/**
 * Deletes up to `batchSize` published rows older than `maxAgeMs`, the oldest first; fewer
 * than `batchSize` means none are left. One batch per call: the relay interleaves them with
 * its claims. Returns how many rows went.
 */
export async function prunePublished(
  client: pg.Client,
  maxAgeMs: number,
  batchSize: number,
): Promise<number> {
  const r = await client.query(
    `delete from keyway.outbox
      where seq in (select seq from keyway.outbox
                     where published_at < now() - make_interval(secs => $1::double precision / 1000)
                     order by published_at
                     limit $2)`,
    [maxAgeMs, batchSize],
  )
  return r.rowCount ?? 0
}

/** Tells writers whether to NOTIFY (see keyway.relay_state in sql/0001_outbox.sql). */
export async function setListening(client: pg.Client, listening: boolean): Promise<void> {
  await client.query("update keyway.relay_state set listening = $1 where id = 1", [listening])
}

/**
 * Vacuums the outbox on a connection of its own (VACUUM cannot share the relay's, which must
 * stay free for claims). Marking a row published leaves a dead entry in the unpublished
 * partial index, and every claim walks past them from the index's start: after a 100k-event
 * backlog, commit-to-stream p50 went from 1.7 ms to 13 ms until a vacuum (bench relay).
 * Autovacuum gets there too, but only on its own schedule. Without the privilege Postgres
 * skips the table with a warning only its own log shows, and the outbox depends on
 * autovacuum again.
 */
export async function vacuumOutbox(
  connectionString: string,
  connectTimeoutMs: number,
  signal: AbortSignal,
): Promise<void> {
  const client = new pg.Client({
    connectionString,
    application_name: "keyway-relay-vacuum",
    connectionTimeoutMillis: connectTimeoutMs,
    ...keepaliveSettings,
  })
  client.on("error", () => {})
  // The relay's stop() must not wait on a vacuum of a large outbox (or one queued behind an
  // autovacuum's lock): closing the connection fails the query here at once. The server
  // does not notice the closed socket until the vacuum ends, and finishes it: harmless work,
  // under a lock that no reader or writer of the outbox waits for.
  const close = () => void client.end().catch(() => {})
  signal.addEventListener("abort", close, { once: true })
  try {
    await client.connect()
    await client.query("vacuum keyway.outbox")
  } finally {
    signal.removeEventListener("abort", close)
    await client.end().catch(() => {})
  }
}

/**
 * Marks the rows published in the `windowMs` before the newest publish unpublished again, so
 * the relay sends them once more. nats-server 2.9.10 fsyncs about once a minute: after an
 * unclean stop of its host, messages it had acked can be gone. Re-publishing recent rows
 * restores those; the ones it kept are dropped as duplicates (same Nats-Msg-Id, within the
 * stream's duplicate_window, which is rebuilt from what the server kept). Returns how many.
 *
 * The window is anchored where the connection was lost (`lostAt`), or, not knowing that (a
 * relay starting), at the newest publish; never at now: nothing is published while NATS is
 * away, so after an outage longer than the window a window before now would hold none of the
 * messages the crash took. The loss is placed on Postgres' clock, which published_at is on,
 * by how long ago it was (`lostAgoMs`, on this process's monotonic clock): the two wall
 * clocks need not agree, and either may be stepped. The loss is when nats.js noticed it: a
 * host gone without a word is noticed after its missed pings (20 s with connectNats'
 * settings), well inside the default window of 2 minutes. Rows published
 * before a loss long after them (a quiet spell, then a blip) were on disk by then, and the
 * window leaves them out; anchored at the newest publish, it sent them again, and the stream
 * kept them twice once they were older than its duplicate_window. Rows marked after the loss
 * are all in it: those of the batch in flight, acked just before the crash and marked only
 * once the rest of the batch had timed out, and those the restarted server acked, which it
 * drops as duplicates. The price, when the newest publish is older than the stream's
 * duplicate_window (a relay restarted after a quiet spell), is copies the stream keeps twice;
 * consumers drop them by event id and version.
 * The restored messages land after later versions of their keys (stream order is lost with
 * the data); consumers order by version.
 */
export async function unmarkRecent(
  client: pg.Client,
  windowMs: number,
  lostAgoMs?: number,
): Promise<number> {
  // Not knowing the loss, the newest publish is read with the anchor the last window had
  // (sql/0020): the rows that window unmarked and no session has sent again since no longer
  // show it, and each session ended before it sent them moved the window back by its length.
  // Recorded whichever way the window was anchored: a window anchored at a loss, whose session
  // ended before it sent the rows again, left the next one to start a window further back.
  const r = await client.query(
    `with a as (
       select coalesce(now() - make_interval(secs => $2::double precision / 1000),
                       greatest((select max(published_at) from keyway.outbox),
                                (select republish_anchor from keyway.relay_state where id = 1)))
                as at
     ),
     remembered as (
       update keyway.relay_state set republish_anchor = greatest(republish_anchor, (select at from a))
        where id = 1
     )
     update keyway.outbox set published_at = null
      where published_at > (select at from a) - make_interval(secs => $1::double precision / 1000)`,
    [windowMs, lostAgoMs === undefined ? null : Math.max(0, lostAgoMs)],
  )
  return r.rowCount ?? 0
}
