import { type Kysely, type RawBuilder, sql } from "kysely"
import { type GroupSummary, groupSummary } from "./internal/inbox-sql.ts"

export type { GroupSummary }

/** Which tasks an admin action touches: one key, a whole topic, or a version range of a key. */
export interface TaskSelector {
  topic: string
  key?: string
  /**
   * Every key of the topic, for skip and redrive, which must be asked for so (as the CLI's
   * --all-keys): a `key` left undefined by a caller's slip (`key: req.key`) skipped every
   * dead task of the topic, or ran the topic's retention period of work again. Not for
   * retry, whose topic-wide use (after a vendor's outage) loses nothing and runs no task that
   * ran: dead tasks go back to pending, in their keys' order.
   */
  allKeys?: boolean
  /** Inclusive version range within `key`. */
  fromVer?: number
  toVer?: number
}

export interface DeadTask {
  topic: string
  key: string
  ver: number
  eventId: string
  type: string
  attempts: number
  lastError: string | null
  /**
   * True when the key waits on it: policy block, or park while the task holds its key until
   * the time its failure asked for (a Retry-After). False when the key moved on.
   */
  blocking: boolean
}

export interface KeyGap {
  topic: string
  key: string
  /** The version the key waits for. */
  missingVer: number
  /** The lowest version present above it. */
  nextPresentVer: number
  since: Date | null
}

/** A message the group kept instead of storing it: not an event, or one that collided. */
export interface RejectedMessage {
  /** What {@link ConsumerAdmin.dismissRejects} takes: rejects are numbered as they come. */
  id: number
  streamSeq: number | null
  subject: string
  reason: string
  receivedAt: Date
  /** The message as received, as text (at most 2,000 characters). */
  data: string
}

export interface ConsumerAdminConfig {
  db: Kysely<any>
  group: string
  /**
   * How long an action waits for a key or row it must lock (a worker's claim or completion
   * holds one for milliseconds; a session idle in a transaction, for ever) before it fails
   * with Postgres' 55P03 and changes nothing. Default: no bound. Set per transaction, so it
   * holds on any connection of the pool and leaves a pooler's shared sessions alone.
   */
  lockTimeoutMs?: number
}

/**
 * Operator actions on a consumer group. Every action is one transaction, so it is atomic, and
 * none of them bypasses the fencing epoch: actions that change where a key stands bump it,
 * so a worker draining that key at the same moment writes nothing afterwards.
 *
 * The lists and actions refuse (ConsumerAdminError) a group, topic or key that has never
 * stored an event here, naming what does exist, rather than answer nothing.
 */
export interface ConsumerAdmin {
  /** The counts an operator checks first, the same the group's metrics report. */
  summarise(): Promise<GroupSummary>
  /** Dead tasks by topic, key and version: the first `limit` (default 1,000). */
  listDead(topic?: string, limit?: number): Promise<DeadTask[]>
  listGaps(topic?: string): Promise<KeyGap[]>
  /** Keys stopped at a dead task (policy block). */
  listBlocked(topic?: string): Promise<{ topic: string; key: string; ver: number }[]>
  /**
   * Messages the group kept as rejects rather than tasks (not an event; a value Postgres
   * refuses; an event colliding with another at its version or id), newest first.
   */
  listRejects(limit?: number): Promise<RejectedMessage[]>
  /**
   * Forgets the rejects numbered `fromId` to `throughId`, those an operator has read (a list
   * runs newest first, so what was read is a range: older ones may not have been listed);
   * returns how many. Workers delete them anyway once past the group's reject retention.
   */
  dismissRejects(fromId: number, throughId: number): Promise<number>
  /**
   * Dead tasks back to pending with a fresh attempt count; returns how many. Each key is
   * rewound to the lowest; a handler told the newest version already done above its task
   * (KeyedEvent.supersededBy), as after redrive.
   */
  retry(selector: TaskSelector): Promise<number>
  /**
   * Marks dead tasks skipped, and moves keys past skipped versions. Pending tasks only where a
   * range of one key names them: without one, a skip meant to unblock a topic's dead tasks
   * dropped every event queued behind them. A missing version named by a range is skipped
   * too (closing a gap), between where the key stands and the highest version it has
   * received (an open end runs to it). A range that reaches past that is refused: the
   * versions would be dropped when they came. Returns the versions skipped.
   */
  skip(selector: TaskSelector): Promise<number>
  /**
   * Runs finished tasks again (done, skipped or dead): rewinds each key to the lowest. Their
   * handlers are told the newest version already done above them (KeyedEvent.supersededBy),
   * so that one whose tasks carry the key's whole state does not put an older state back.
   */
  redrive(selector: TaskSelector): Promise<number>
}

/** An admin action refused because it would leave a key stuck. */
export class ConsumerAdminError extends Error {
  override name = "ConsumerAdminError"
}

// Versions are bigints in Postgres; past 2^53 a JavaScript number no longer names one.
const isVersion = (n: unknown): n is number => Number.isSafeInteger(n) && (n as number) >= 1

/**
 * What the callers pass, checked before any statement: a fraction, NaN or 0 reached Postgres
 * as a bare 22P02 or 2201W, and a range upside down (from above to) answered 0 as if nothing
 * matched.
 */
function refuseBadInput(what: string, values: Record<string, unknown>, range?: [string, string]) {
  for (const [name, value] of Object.entries(values)) {
    if (value !== undefined && !isVersion(value)) {
      throw new ConsumerAdminError(`${what}: ${name} must be a whole number from 1, not ${value}`)
    }
  }
  if (range) {
    const [from, to] = range.map((name) => values[name]) as [number | undefined, number | undefined]
    if (from !== undefined && to !== undefined && from > to) {
      throw new ConsumerAdminError(`${what}: ${range[0]} ${from} is above ${range[1]} ${to}`)
    }
  }
}

const refuseBadSelector = (action: string, s: TaskSelector) => {
  if (typeof s.topic !== "string" || s.topic === "") {
    throw new ConsumerAdminError(`${action}: a topic is required`)
  }
  if (s.key !== undefined && s.allKeys) {
    throw new ConsumerAdminError(`${action}: a key and allKeys: give one`)
  }
  refuseBadInput(action, { fromVer: s.fromVer, toVer: s.toVer }, ["fromVer", "toVer"])
}

/** Skip and redrive of every key of a topic are asked for by name (TaskSelector.allKeys). */
const refuseWholeTopicUnasked = (action: string, s: TaskSelector) => {
  if (s.key === undefined && s.allKeys !== true) {
    throw new ConsumerAdminError(
      `${action}: a key, or allKeys: true for every key of topic ${s.topic}`,
    )
  }
}

// The most versions one skip may record as missing. A stray event at v10^15 (the envelope
// takes any version from 1) made an open-ended skip insert that many placeholders, holding
// the key's lock until the disk filled.
const MAX_SKIPPED_MISSING = 100_000

const where = (s: TaskSelector) => sql`
  i.topic = ${s.topic}
  ${s.key === undefined ? sql`` : sql`and i.key = ${s.key}`}
  ${s.fromVer === undefined ? sql`` : sql`and i.ver >= ${s.fromVer}`}
  ${s.toVer === undefined ? sql`` : sql`and i.ver <= ${s.toVer}`}
`

export function createConsumerAdmin({
  db,
  group,
  lockTimeoutMs,
}: ConsumerAdminConfig): ConsumerAdmin {
  /** One action's transaction, its lock waits bounded by lockTimeoutMs. */
  const action = <T>(work: (trx: Kysely<any>) => Promise<T>) =>
    db.transaction().execute(async (trx) => {
      if (lockTimeoutMs !== undefined) {
        await sql`select set_config('lock_timeout', ${`${lockTimeoutMs}ms`}, true)`.execute(trx)
      }
      return work(trx)
    })
  // A version range names versions of one key: across a topic it would touch v3 of every key
  // at once, which no operator means.
  const refuseRangeWithoutKey = (s: TaskSelector) => {
    if ((s.fromVer !== undefined || s.toVer !== undefined) && s.key === undefined) {
      throw new ConsumerAdminError("a version range (fromVer, toVer) selects versions of one key")
    }
  }
  // A group, topic or key this database has never seen is refused by name: a typo answered
  // 0, or an empty list, which reads as "nothing to do" when something is. The names that do
  // exist are read by skipping through the key table's primary key (grp, topic, key), so
  // listing a handful costs a handful of index probes, not a scan of every key.
  const refuseUnknown = async (q: Kysely<any>, topic?: string, key?: string) => {
    const r = await sql<{ grp: boolean; topic: boolean; key: boolean }>`
      -- A group whose every message was rejected has keys nowhere but is not a typo: its
      -- summary and its rejects are what the operator needs first.
      select exists (select 1 from keyway.consumer_key where grp = ${group})
             or exists (select 1 from keyway.inbox_reject where grp = ${group}) as grp,
             exists (select 1 from keyway.consumer_key
                      where grp = ${group} and topic = ${topic ?? null}) as topic,
             exists (select 1 from keyway.consumer_key
                      where grp = ${group} and topic = ${topic ?? null}
                        and key = ${key ?? null}) as key`.execute(q)
    const known = r.rows[0]!
    const names = async (column: "grp" | "topic", within: RawBuilder<unknown>) => {
      const col = sql.ref(column)
      const found = await sql<{ name: string }>`
        with recursive n as (
          select min(${col}) as name from keyway.consumer_key where ${within}
          union all
          select (select min(${col}) from keyway.consumer_key where ${within} and ${col} > n.name)
            from n where n.name is not null
        )
        select name from n where name is not null limit 21`.execute(q)
      const listed = found.rows.slice(0, 20).map((x) => JSON.stringify(x.name))
      return `${listed.join(", ") || "none"}${found.rows.length > 20 ? ", …" : ""}`
    }
    if (!known.grp) {
      throw new ConsumerAdminError(
        `group ${JSON.stringify(group)} has stored no event in this database (groups here: ${await names("grp", sql`true`)})`,
      )
    }
    if (topic !== undefined && !known.topic) {
      throw new ConsumerAdminError(
        `group ${JSON.stringify(group)} has no key in topic ${JSON.stringify(topic)} (its topics: ${await names("topic", sql`grp = ${group}`)})`,
      )
    }
    if (key !== undefined && !known.key) {
      throw new ConsumerAdminError(
        `group ${JSON.stringify(group)} has no key ${JSON.stringify(key)} in topic ${JSON.stringify(topic)}`,
      )
    }
  }

  // Retry and redrive rewind a key to the lowest version they touch; the drain then walks
  // forward over every version up to where the key stood. If retention already deleted one
  // of those, the key would stop at it for good, so such a rewind is refused up front.
  const refuseRewindOverPruned = async (trx: Kysely<any>, rows: RawBuilder<unknown>) => {
    const r = await sql<{
      topic: string
      key: string
      ver: number
      done_ver: number
      start_ver: number
    }>`
      with lowest as (
        select i.topic, i.key, min(i.ver) as ver from keyway.inbox i
         where ${rows}
         group by i.topic, i.key
      )
      select l.topic, l.key, l.ver, k.done_ver, k.start_ver
        from lowest l
        join keyway.consumer_key k on k.grp = ${group} and k.topic = l.topic and k.key = l.key
       where k.done_ver > l.ver
         and (select count(*) from keyway.inbox i
               where i.grp = ${group} and i.topic = l.topic and i.key = l.key
                 and i.ver > l.ver and i.ver <= k.done_ver) < k.done_ver - l.ver
    `.execute(trx)
    if (r.rows.length > 0) {
      // A version at or below where its key started came late (sql/0012): the versions
      // between it and the start never came here at all.
      const list = r.rows
        .map((x) =>
          x.ver <= x.start_ver
            ? `${x.topic}/${x.key} (v${x.ver} came after the key had started at v${x.start_ver + 1}; versions between never arrived)`
            : `${x.topic}/${x.key} (v${x.ver}..v${x.done_ver}: retention already deleted finished versions)`,
        )
        .join(", ")
      throw new ConsumerAdminError(
        `refused: the key would be rewound over versions it does not hold, and stop at them for good: ${list}. Skip such a version (its key and --from/--to) to take it off the dead list; the other keys of a topic-wide action are then free to go.`,
      )
    }
  }

  // A redrive of a key's range asks for every finished version in it. Those retention has
  // deleted cannot run again; without this the rest ran and the answer only counted them,
  // and a range deleted whole answered 0 as if nothing had matched.
  // Counted from where the key started, whatever the range says: the versions below never
  // arrived or came late, and retention has nothing to do with those (the rewind check says
  // what a late one that ran since would rewind over).
  const refuseRangeOverPruned = async (trx: Kysely<any>, s: TaskSelector) => {
    if (s.key === undefined || (s.fromVer === undefined && s.toVer === undefined)) return
    const r = await sql<{ done_ver: number; from_ver: number; held: number }>`
      select k.done_ver::float8 as done_ver, f.ver::float8 as from_ver,
             (select count(*) from keyway.inbox i
               where i.grp = k.grp and i.topic = k.topic and i.key = k.key
                 and i.ver >= f.ver
                 and i.ver <= least(${s.toVer ?? null}::bigint, k.done_ver))::float8 as held
        from keyway.consumer_key k,
             lateral (select greatest(${s.fromVer ?? null}::bigint, k.start_ver + 1) as ver) f
       where k.grp = ${group} and k.topic = ${s.topic} and k.key = ${s.key}`.execute(trx)
    const row = r.rows[0]
    if (!row) return
    const last = Math.min(s.toVer ?? Number.POSITIVE_INFINITY, row.done_ver)
    const asked = last - row.from_ver + 1
    if (asked > row.held) {
      throw new ConsumerAdminError(
        `refused: retention already deleted ${asked - row.held} of the finished versions v${row.from_ver}..v${last} of ${s.topic}/${s.key}; they cannot run again (redrive from the lowest still held)`,
      )
    }
  }

  // Retry and redrive are one operation on different states: back to pending with a fresh
  // attempt count, and each key rewound to the lowest version touched (with an epoch bump,
  // so a worker draining it now writes nothing more).
  const resetAndRewind = (s: TaskSelector, states: string[], wholeRange = false) =>
    action(async (trx) => {
      refuseBadSelector(wholeRange ? "redrive" : "retry", s)
      refuseRangeWithoutKey(s)
      await refuseUnknown(trx, s.topic, s.key)
      // The keys first: retention takes them FOR KEY SHARE before it deletes any of their
      // rows, so none can go between the checks below and the rewind. In byte order, the order
      // in which workers' claims and completions lock keys (inbox-sql.ts sortedRefs). A key
      // named with a range is locked whatever its rows: the range check counts them after.
      const ranged = s.key !== undefined && (s.fromVer !== undefined || s.toVer !== undefined)
      // A redrive runs again what ran. A version at or below where its key started came late
      // and was stored dead (sql/0012): unless an operator retried it since (done), it never
      // ran. Taken in, it rewound the key over versions that never arrived, and the redrive
      // was refused, skipped or not, until retention deleted it.
      const ran = wholeRange
        ? sql`and (i.state = 'done'
                   or i.ver > (select ks.start_ver from keyway.consumer_key ks
                                where ks.grp = i.grp and ks.topic = i.topic and ks.key = i.key))`
        : sql``
      const locked = await sql<{ topic: string; key: string }>`
        select k.topic, k.key from keyway.consumer_key k
         where k.grp = ${group}
           and ((${ranged} and k.topic = ${s.topic} and k.key = ${s.key ?? null})
                or (k.topic, k.key) in (
                  select i.topic, i.key from keyway.inbox i
                   where i.grp = ${group} and i.state in (${sql.join(states)}) and ${where(s)}
                     ${ran}))
         order by k.topic collate "C", k.key collate "C"
         for update of k
      `.execute(trx)
      // Counted before the lock, rows retention deleted meanwhile went unseen, and the rest of
      // the range ran.
      if (wholeRange) await refuseRangeOverPruned(trx, s)
      if (locked.rows.length === 0) return 0
      // Each statement below reads afresh, and a key can gain a matching task meanwhile (one
      // that dies now). Only the keys locked above are touched: another would be rewound
      // without the lock that keeps retention off it. It is left for the next action.
      // Not the placeholders a skip wrote for versions that never came (keyway.skipped): none
      // is run again, so none is where a key is rewound to. Counted in, one whose older
      // neighbours retention had deleted had the redrive refused over them.
      const rows = sql`
        i.grp = ${group} and i.state in (${sql.join(states)}) and ${where(s)} ${ran}
        and i.type <> 'keyway.skipped'
        and (i.topic, i.key) in (
          select * from unnest(${locked.rows.map((k) => k.topic)}::text[],
                               ${locked.rows.map((k) => k.key)}::text[]))`
      await refuseRewindOverPruned(trx, rows)
      const r = await sql<{ n: number }>`
      with reset as (
        update keyway.inbox i
           -- Not before the vendor's hold (sql/0024): the next version's call must not land
           -- before one this task sent and gave up on.
           set state = 'pending', attempts = 0, run_after = coalesce(i.hold_until, '-infinity'),
               last_error = null,
               done_at = null
         where ${rows}
        returning i.topic, i.key, i.ver
      ),
      lowest as (select topic, key, min(ver) as ver from reset group by topic, key),
      rewound as (
        -- superseded_by: the newest version done above where the key now stands, which the
        -- handlers of the tasks it runs again are told of (sql/0017). Worked out afresh each
        -- time: a version an earlier rewind recorded may be among those this one runs again.
        -- Done rows above done_ver count too (an earlier rewind not yet walked): the drain
        -- steps over them all, and retention never deletes them. Above the key's new
        -- done_ver, not this action's lowest version: a retry of v10 while an earlier retry's
        -- v3 still waited counted only done rows above v10, none, and v3 then ran told of no
        -- later version. Read from this statement's snapshot, where the rows being reset
        -- still show done (and k.done_ver the old value): those are left out by name.
        update keyway.consumer_key k
           set done_ver = least(k.done_ver, l.ver - 1), epoch = k.epoch + 1,
               -- The run in hand is over, but a suspect (sql/0019) stays one: retried without
               -- a fix, a task that killed its worker runs alone first, and the tasks in
               -- flight beside it do not die with it again. Its attempts start again.
               run_state = null,
               superseded_by = (
                 select max(i.ver) from keyway.inbox i
                  where i.grp = k.grp and i.topic = k.topic and i.key = k.key
                    and i.ver > least(k.done_ver, l.ver - 1) and i.state = 'done'
                    and not exists (select 1 from reset x
                                     where x.topic = i.topic and x.key = i.key and x.ver = i.ver))
          from lowest l
         where k.grp = ${group} and k.topic = l.topic and k.key = l.key
      )
      select count(*)::int as n from reset
    `.execute(trx)
      return r.rows[0]!.n
    })
  const topicFilter = (topic?: string) =>
    topic === undefined ? sql`` : sql`and k.topic = ${topic}`
  return {
    // Refused for an unknown group like every call here: all zeros for a mistyped name read
    // as "nothing wrong", on the first command an operator runs.
    async summarise() {
      await refuseUnknown(db)
      return groupSummary(db, group)
    },
    async listDead(topic, limit = 1000) {
      refuseBadInput("listDead", { limit })
      await refuseUnknown(db, topic)
      const r = await sql<DeadTask>`
        select i.topic, i.key, i.ver, i.event_id as "eventId", i.type, i.attempts,
               i.last_error as "lastError", (i.ver = k.done_ver + 1) as blocking
          from keyway.inbox i
          join keyway.consumer_key k on k.grp = i.grp and k.topic = i.topic and k.key = i.key
         where i.grp = ${group} and i.state = 'dead' ${topicFilter(topic)}
         order by i.topic, i.key, i.ver
         limit ${limit}
      `.execute(db)
      return r.rows
    },
    async listGaps(topic) {
      await refuseUnknown(db, topic)
      const r = await sql<KeyGap>`
        select k.topic, k.key, k.done_ver + 1 as "missingVer",
               (select min(i.ver) from keyway.inbox i
                 where i.grp = k.grp and i.topic = k.topic and i.key = k.key and i.ver > k.done_ver
               ) as "nextPresentVer",
               k.gap_since as since
          from keyway.consumer_key k
         where k.grp = ${group} ${topicFilter(topic)}
           and k.baseline_stream_seq is null
           and not exists (select 1 from keyway.inbox i where i.grp = k.grp and i.topic = k.topic
                             and i.key = k.key and i.ver = k.done_ver + 1)
           and exists (select 1 from keyway.inbox i where i.grp = k.grp and i.topic = k.topic
                         and i.key = k.key and i.ver > k.done_ver + 1)
         order by k.topic, k.key
      `.execute(db)
      return r.rows
    },
    async listBlocked(topic) {
      await refuseUnknown(db, topic)
      const r = await sql<{ topic: string; key: string; ver: number }>`
        select k.topic, k.key, i.ver
          from keyway.consumer_key k
          join keyway.inbox i
            on i.grp = k.grp and i.topic = k.topic and i.key = k.key and i.ver = k.done_ver + 1
         where k.grp = ${group} and i.state = 'dead' ${topicFilter(topic)}
           -- Only keys counting a dead task (consumer_key_dead_idx), as the metric reads them:
           -- otherwise every key of the group, which are never deleted, was probed.
           and k.dead_tasks > 0
           -- Not one held for a while (a parked task's Retry-After): that key moves on alone.
           and i.run_after <= now()
         order by k.topic, k.key
      `.execute(db)
      return r.rows
    },
    async listRejects(limit = 100) {
      refuseBadInput("listRejects", { limit })
      // Bytes, decoded here: a message need not be UTF-8 (Postgres' convert_from would fail
      // the whole list on one), and Node puts U+FFFD where it is not.
      const r = await sql<Omit<RejectedMessage, "data"> & { data: Buffer }>`
        select id, stream_seq as "streamSeq", subject, reason, received_at as "receivedAt",
               substring(data from 1 for 8000) as data
          from keyway.inbox_reject
         where grp = ${group}
         order by id desc
         limit ${limit}`.execute(db)
      // No rejects: a group with keys has none; one with neither is a name never seen.
      if (r.rows.length === 0) await refuseUnknown(db)
      // Cut by code point: a UTF-16 cut could split a pair and print half a character.
      const text = (b: Buffer) => Array.from(b.toString("utf8")).slice(0, 2000).join("")
      return r.rows.map((x) => ({ ...x, data: text(x.data) }))
    },
    async dismissRejects(fromId, throughId) {
      refuseBadInput("dismissRejects", { fromId, throughId }, ["fromId", "throughId"])
      const r = await sql`
        delete from keyway.inbox_reject
         where grp = ${group} and id between ${fromId} and ${throughId}`.execute(db)
      const n = Number(r.numAffectedRows ?? 0)
      // Nothing to dismiss is an answer for a group with rejects or keys, not for a typo (a
      // group whose every reject is gone and that never stored an event looks like one).
      if (n === 0) {
        const any = await sql`
          select 1 from keyway.inbox_reject where grp = ${group} limit 1`.execute(db)
        if (any.rows.length === 0) await refuseUnknown(db)
      }
      return n
    },
    // A parked task (the key already moved past it) is rewound to, so order still holds:
    // the retried version runs, then the key walks forward over the versions it had already
    // finished (they do not run again; redrive is for that) and over those still parked.
    retry: (s) => resetAndRewind(s, ["dead"]),
    async skip(s) {
      refuseBadSelector("skip", s)
      const ranged = s.fromVer !== undefined || s.toVer !== undefined
      refuseRangeWithoutKey(s)
      refuseWholeTopicUnasked("skip", s)
      const states = sql.join(ranged ? ["pending", "dead"] : ["dead"])
      return action(async (trx) => {
        await refuseUnknown(trx, s.topic, s.key)
        // The keys first, in byte order, as resetAndRewind and the workers take them. The
        // statement below locks them in whatever order its plan meets them; against a worker
        // completing two of them at once that was a deadlock, which Postgres breaks by
        // failing one side.
        const locked = await sql<{ key: string }>`
          select k.key from keyway.consumer_key k
           where k.grp = ${group} and k.topic = ${s.topic}
             and ((${ranged} and k.key = ${s.key ?? null})
                  or k.key in (select i.key from keyway.inbox i
                                where i.grp = ${group} and i.state in (${states})
                                  and ${where(s)}))
           order by k.topic collate "C", k.key collate "C"
           for update of k`.execute(trx)
        if (ranged && s.key !== undefined && s.toVer !== undefined) {
          // A placeholder for a version that has not arrived would make ingest drop the real
          // event when it comes, silently: a range may not reach past what the key received.
          // Where the key stands counts as received: retention may have taken those rows.
          const top = await sql<{ ver: number | null }>`
            select greatest(k.done_ver, (select max(i.ver) from keyway.inbox i
                                          where i.grp = k.grp and i.topic = k.topic
                                            and i.key = k.key))::float8 as ver
              from keyway.consumer_key k
             where k.grp = ${group} and k.topic = ${s.topic} and k.key = ${s.key}`.execute(trx)
          const highest = top.rows[0]?.ver ?? 0
          if (s.toVer > highest) {
            throw new ConsumerAdminError(
              `refused: ${s.topic}/${s.key} has received versions up to v${highest}; v${highest + 1}..v${s.toVer} have not arrived, and skipping them would drop them when they do`,
            )
          }
        }
        // The versions a range names that may be missing: between where the key stands (below
        // it they ran, and retention may have deleted them) and the highest version it
        // received (an open end runs to it). No range, no placeholders.
        let span: { lo: number; hi: number } | undefined
        // Where an open-ended range ends: the highest version received when the skip began.
        // The marking below runs after the placeholders, which may wait for an ingest; what
        // that ingest brings above this (v4, v5 beside a late v2) the operator never saw.
        let upTo = s.toVer
        if (ranged && s.key !== undefined) {
          const b = await sql<{ lo: number; hi: number | null; missing: number | null }>`
            select u.lo::float8 as lo, u.hi::float8 as hi,
                   (u.hi - u.lo + 1 - (select count(*) from keyway.inbox i
                                        where i.grp = k.grp and i.topic = k.topic
                                          and i.key = k.key and i.ver between u.lo and u.hi)
                   )::float8 as missing
              from keyway.consumer_key k,
                   lateral (select greatest(coalesce(${s.fromVer ?? null}::bigint, 0),
                                            k.done_ver + 1) as lo,
                                   coalesce(${s.toVer ?? null}::bigint,
                                            (select max(i.ver) from keyway.inbox i
                                              where i.grp = k.grp and i.topic = k.topic
                                                and i.key = k.key)) as hi) u
             where k.grp = ${group} and k.topic = ${s.topic} and k.key = ${s.key}`.execute(trx)
          const row = b.rows[0]
          upTo ??= row?.hi ?? 0
          if (row && row.hi !== null && row.hi >= row.lo) {
            if ((row.missing ?? 0) > MAX_SKIPPED_MISSING) {
              throw new ConsumerAdminError(
                `refused: v${row.lo}..v${row.hi} of ${s.topic}/${s.key} would record ${row.missing} missing versions as skipped, over ${MAX_SKIPPED_MISSING}${s.toVer === undefined ? `: a version that high is more likely a stray event than a gap to close (skip it alone with --from ${row.hi} --to ${row.hi})` : ": skip a narrower range"}`,
              )
            }
            span = { lo: row.lo, hi: row.hi }
          }
        }
        // The placeholders first, in a statement of their own: an ingest storing one of
        // those versions, come late, is waited for here before this marks any of the key's
        // rows. In one statement the marking went first, and an ingest of [v2 late, v3
        // again] waited on the v3 marked while this waited on its v2: 40P01. The placeholders
        // go in ascending order, as ingest stores a batch's rows (sql/0018): with two missing
        // versions, neither waits for the other holding one the other needs.
        const placed = span
          ? (
              await sql`
                -- A missing version named explicitly is recorded as skipped, which closes
                -- the gap.
                insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload,
                                          created_at, state, last_error, done_at)
                select ${group}, ${s.topic}, ${s.key ?? null}, v.ver,
                       concat('skipped:', ${s.topic}::text, ':', ${s.key ?? null}::text, ':', v.ver),
                       'keyway.skipped', 'null', now(), 'skipped',
                       'skipped by an operator while missing', now()
                  from generate_series(${span.lo}::bigint, ${span.hi}::bigint) as v(ver)
                on conflict do nothing
                returning 1`.execute(trx)
            ).rows.length
          : 0
        const r = await sql`
          with skipped as (
            -- Only the keys locked above: a key that gained a matching task since would be
            -- locked here, out of order. It is left for the next action.
            -- run_after too: a task skipped while it waited out a retry's backoff would
            -- otherwise keep its key from running until the backoff ended. Not past its
            -- vendor hold (sql/0024): a call the vendor may still apply until then, over the
            -- next version's if that went sooner; a label would keep the older image for
            -- good. A skip gives up the task, not that wait.
            update keyway.inbox i
               set state = 'skipped', done_at = now(),
                   run_after = coalesce(i.hold_until, '-infinity')
             where i.grp = ${group} and i.state in (${states}) and ${where(s)}
               ${upTo === undefined ? sql`` : sql`and i.ver <= ${upTo}`}
               and i.key = any(${locked.rows.map((k) => k.key)}::text[])
            returning i.topic, i.key, i.ver
          ),
          bumped as (
            -- The key's worker reads done_ver afresh after the epoch bump. Only where a skipped
            -- version is above where the key stands (its worker may hold it, read ahead) or
            -- placeholders went in: a parked task below is nothing its worker holds, and a
            -- bump there fenced the task in hand, whose effects rolled back and ran again,
            -- vendor calls and all. The bump ends the run in hand, as a rewind's does: its
            -- worker, fenced, can no longer close it, and left open past its lease it was taken
            -- for a run lost with its worker (sql/0019): the task made a suspect, or charged
            -- an attempt for a death that never happened.
            update keyway.consumer_key k
               set epoch = k.epoch + 1, run_state = null
             where k.grp = ${group}
               and ((k.topic, k.key) in (select topic, key from skipped x
                                          where x.ver > k.done_ver)
                    or (${placed > 0} and k.topic = ${s.topic} and k.key = ${s.key ?? null}))
            returning 1
          )
          select (select count(*) from skipped) as n, (select count(*) from bumped) as keys
        `.execute(trx)
        return Number((r.rows[0] as { n: number }).n) + placed
      })
    },
    async redrive(s) {
      refuseBadSelector("redrive", s)
      refuseRangeWithoutKey(s)
      refuseWholeTopicUnasked("redrive", s)
      return resetAndRewind(s, ["done", "skipped", "dead"], true)
    },
  }
}
