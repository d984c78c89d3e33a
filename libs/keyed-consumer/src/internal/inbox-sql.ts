import { type Kysely, sql } from "kysely"

// The consumer's SQL. Every write that advances a key checks `epoch = <mine>`: that check,
// not the Redis lock, is what keeps a stale worker from writing (DESIGN.md §5).

export interface IncomingEvent {
  topic: string
  key: string
  ver: number
  eventId: string
  type: string
  payload: string // JSON text
  trace: string | null // JSON text
  createdAt: string
  streamSeq: number
}

export interface TaskRow {
  ver: number
  event_id: string
  type: string
  payload: unknown
  trace: Record<string, string> | null
  created_at: Date
  state: "pending" | "done" | "dead" | "skipped"
  attempts: number
  /** How long until a retry is due, by the database's clock; 0 when it may run now. */
  wait_ms: number
}

const taskColumns = sql`
  i.ver, i.event_id, i.type, i.payload, i.trace, i.created_at, i.state, i.attempts,
  extract(epoch from greatest(i.run_after, now()) - now()) * 1000 as wait_ms`

export interface KeyRef {
  topic: string
  key: string
}

/** A key as one string, for maps and sets of keys. */
export const keyId = (ref: KeyRef) => `${ref.topic}\u0000${ref.key}`

/** An event the inbox refused because another event holds its version or its id. */
export interface Collision {
  streamSeq: number
  reason: string
}

/**
 * Inserts a batch into the inbox (keyway.ingest). Returns the keys that got new rows, and the
 * events that met a different event at their version or id (sql/0013): the caller keeps
 * those as rejects, since the inbox cannot hold them beside the event it has.
 */
export async function ingestBatch(
  db: Kysely<any>,
  group: string,
  events: readonly IncomingEvent[],
): Promise<{ woken: KeyRef[]; collisions: Collision[] }> {
  const col = <K extends keyof IncomingEvent>(k: K) => events.map((e) => e[k])
  const r = await sql<KeyRef & { collided_stream_seq: number | null; reason: string | null }>`
    select topic, key, collided_stream_seq, reason from keyway.ingest(
      ${group}, ${col("topic")}::text[], ${col("key")}::text[], ${col("ver")}::bigint[],
      ${col("eventId")}::text[], ${col("type")}::text[], ${col("payload")}::jsonb[],
      ${col("trace")}::jsonb[], ${col("createdAt")}::timestamptz[], ${col("streamSeq")}::bigint[])
  `.execute(db)
  const woken: KeyRef[] = []
  const collisions: Collision[] = []
  for (const row of r.rows) {
    if (row.collided_stream_seq === null) woken.push({ topic: row.topic, key: row.key })
    else collisions.push({ streamSeq: row.collided_stream_seq, reason: row.reason! })
  }
  return { woken, collisions }
}

/**
 * Settles provisional starting points. `ackFloor` is the group's JetStream ack floor: every
 * message up to it was acked, and ingest acks only after committing, so every earlier
 * version of such a key that the stream still holds in order is in the inbox by now. The
 * start is kept as start_ver: a version below it that comes later never ran (sql/0012).
 */
export async function confirmBaselines(db: Kysely<any>, group: string, ackFloor: number) {
  return db.transaction().execute(async (trx) => {
    // The keys first, in the order ingest and the admin actions take them (byte order): an
    // ingest still storing versions of one holds it locked (sql/0015), and this waits for
    // its commit. The versions are read by the next statement, whose snapshot then has them.
    // In one statement, the versions were read from a snapshot taken before the wait, and a
    // version committed meanwhile was left below the settled start, pending, where nothing
    // looks. Only the keys locked here are settled: one made provisional after this lock was
    // taken may have an ingest still open on it.
    const locked = await sql<{ topic: string; key: string }>`
      select topic, key from keyway.consumer_key
       where grp = ${group} and baseline_stream_seq <= ${ackFloor} + 1
       order by topic collate "C", key collate "C"
         for update
    `.execute(trx)
    if (locked.rows.length === 0) return 0
    // The condition on k itself, not only on the rows the start is worked out from: two
    // workers confirm at once, and the second, once the first has committed, re-checks it on
    // the row as it now stands and leaves a settled key (and the versions it has run since)
    // alone.
    const r = await sql`
      update keyway.consumer_key k
         set done_ver = s.ver, start_ver = s.ver, baseline_stream_seq = null
        from (select c.grp, c.topic, c.key,
                     least(c.done_ver,
                           (select min(i.ver) - 1 from keyway.inbox i
                             where i.grp = c.grp and i.topic = c.topic and i.key = c.key)) as ver
                from keyway.consumer_key c
                join unnest(${locked.rows.map((k) => k.topic)}::text[],
                            ${locked.rows.map((k) => k.key)}::text[]) as l(topic, key)
                  on l.topic = c.topic and l.key = c.key
               where c.grp = ${group} and c.baseline_stream_seq is not null) s
       where k.grp = s.grp and k.topic = s.topic and k.key = s.key
         and k.baseline_stream_seq is not null
    `.execute(trx)
    return Number(r.numAffectedRows ?? 0)
  })
}

export async function hasProvisionalBaselines(db: Kysely<any>, group: string): Promise<boolean> {
  const r = await sql`
    select 1 from keyway.consumer_key where grp = ${group} and baseline_stream_seq is not null limit 1
  `.execute(db)
  return r.rows.length > 0
}

export interface Claim {
  epoch: number
  doneVer: number
  /**
   * The newest version that had run to done above the tasks an operator's retry or redrive
   * rewound (sql/0017); the tasks below it run again after it. Undefined if never rewound.
   */
  supersededBy: number | undefined
  /**
   * The claim opened a run of the task at doneVer + 1 (sql/0019): it is pending and due, and
   * the drain owes the run an end. False when there is nothing to run now.
   */
  runOpened: boolean
  /**
   * A run of that task was lost with its worker: it runs alone, and a run lost alone was
   * charged as an attempt. False unless runOpened.
   */
  suspect: boolean
  /** Up to `limit` tasks above doneVer, in version order (a gap shows as a skipped number). */
  tasks: TaskRow[]
}

/**
 * Two strings in Unicode code point order, which is the byte order of their UTF-8 and so
 * Postgres' `collate "C"`, the order the admin actions lock keys in. JavaScript's `<` compares
 * UTF-16 code units, where a character above U+FFFF (a surrogate pair, D800-DFFF) sorts before
 * U+E000-U+FFFF: a worker and an operator's skip then locked two such keys in opposite orders,
 * and deadlocked. The shift moves the surrogates above E000-FFFF (as ICU's
 * u_strCompare(codePointOrder) does); every other code unit compares as it is.
 */
export function codePointOrder(x: string, y: string): number {
  const n = Math.min(x.length, y.length)
  for (let i = 0; i < n; i++) {
    let a = x.charCodeAt(i)
    let b = y.charCodeAt(i)
    if (a === b) continue
    if (a >= 0xd800 && b >= 0xd800) {
      a = a >= 0xe000 ? a - 0x800 : a + 0x2000
      b = b >= 0xe000 ? b - 0x800 : b + 0x2000
    }
    return a - b
  }
  return x.length - y.length
}

/**
 * Sorted by topic and key in code point order: batches that share keys, and admin actions,
 * then lock their rows in the same order. Returns the sorted refs and, for each, its position
 * in `refs`.
 */
export function sortedRefs<T extends KeyRef>(refs: readonly T[]): { sorted: T[]; from: number[] } {
  const order = codePointOrder
  const from = refs.map((_, n) => n)
  from.sort((x, y) => order(refs[x]!.topic, refs[y]!.topic) || order(refs[x]!.key, refs[y]!.key))
  return { sorted: from.map((n) => refs[n]!), from }
}

/**
 * Takes keys for this worker and reads their next tasks (keyway.claim_runs), in one round
 * trip. Undefined for a key whose starting point is still provisional.
 */
export async function claimRuns(
  db: Kysely<any>,
  group: string,
  refs: readonly KeyRef[],
  owner: string,
  leaseMs: number,
  limit: number,
): Promise<(Claim | undefined)[]> {
  const { sorted, from } = sortedRefs(refs)
  const r = await sql<
    {
      i: number
      epoch: number
      done_ver: number
      superseded_by: number | null
      run_opened: boolean
      suspect: boolean
    } & TaskRow
  >`
    select * from keyway.claim_runs(${group}, ${sorted.map((k) => k.topic)}::text[],
                                   ${sorted.map((k) => k.key)}::text[], ${owner},
                                   ${Math.round(leaseMs)}::int, ${limit}::int)
  `.execute(db)
  const claims: (Claim | undefined)[] = refs.map(() => undefined)
  for (const row of r.rows) {
    const n = from[row.i - 1]!
    claims[n] ??= {
      epoch: row.epoch,
      doneVer: row.done_ver,
      supersededBy: row.superseded_by ?? undefined,
      runOpened: row.run_opened,
      suspect: row.suspect,
      tasks: [],
    }
    if (row.ver !== null) claims[n].tasks.push(row)
  }
  return claims
}

/**
 * A key's next `limit` tasks from version `from` on, in version order, whatever their numbers:
 * past a missing version the later ones come back, and the drain sees the gap (sql/0009).
 */
export async function nextTasks(
  db: Kysely<any>,
  group: string,
  ref: KeyRef,
  from: number,
  limit: number,
): Promise<TaskRow[]> {
  const r = await sql<TaskRow>`
    select ${taskColumns}
      from keyway.inbox i
     where i.grp = ${group} and i.topic = ${ref.topic} and i.key = ${ref.key}
       and i.ver >= ${from}
     order by i.ver
     limit ${limit}
  `.execute(db)
  return r.rows
}

export interface Completion extends KeyRef {
  ver: number
  epoch: number
}

/**
 * Inside the transaction of the handlers' effects: advances each key to its version and
 * marks its task done, where this worker still holds the key (keyway.complete_tasks).
 * Returns, per completion, whether it went through; false means fenced, and its effects
 * must not be written.
 */
export async function completeTasks(
  trx: Kysely<any>,
  group: string,
  completions: readonly Completion[],
  leaseMs: number,
): Promise<boolean[]> {
  const { sorted, from } = sortedRefs(completions)
  const r = await sql<{ n: number }>`
    select n from keyway.complete_tasks(${group}, ${sorted.map((c) => c.topic)}::text[],
      ${sorted.map((c) => c.key)}::text[], ${sorted.map((c) => c.ver)}::bigint[],
      ${sorted.map((c) => c.epoch)}::bigint[], ${Math.round(leaseMs)}::int) as n
  `.execute(trx)
  const ok = completions.map(() => false)
  for (const row of r.rows) ok[from[row.n - 1]!] = true
  return ok
}

/**
 * Bounds each later statement of the caller's transaction to `ms` (statement_timeout, local),
 * and the transaction's idle time between statements as well: a worker that stalls, or is
 * stopped, with a completion open held its keys' rows, and every other worker's claim of
 * those keys waited on them, for as long as it stayed stopped. Past the bound Postgres ends
 * the session, and the locks with it.
 */
export function boundStatements(trx: Kysely<any>, ms: number) {
  const bound = `${Math.round(ms)}ms`
  return sql`
    select set_config('statement_timeout', ${bound}, true),
           set_config('idle_in_transaction_session_timeout', ${bound}, true)`.execute(trx)
}

/**
 * Postgres text cannot hold NUL, and an error's message may echo binary data (a vendor's
 * answer). Refused, the failure would not be recorded at all: no attempt counted, and the
 * task run again at every poll, for ever. Written as the escape JSON would use.
 */
export const storableText = (text: string) => text.replaceAll("\u0000", "\\u0000")

/**
 * Records a failed attempt. With `dead` the task is dead now (attempts exhausted or
 * poison); with `moveOn` as well, the key moves past it (policy `park`). The task's
 * run_after is `retryInMs` from now: when it is retried, or, dead and parked without moving
 * on, until when it holds its key. Returns false when fenced.
 */
export async function markFailed(
  db: Kysely<any>,
  group: string,
  ref: KeyRef,
  ver: number,
  epoch: number,
  failure: {
    error: string
    retryInMs: number
    dead: boolean
    moveOn: boolean
    /** Counts an attempt: false for a task whose lost runs were charged by the claim. */
    charge: boolean
    /**
     * How long the failure holds the key for the vendor (retryAfterMs), 0 for none: kept in
     * hold_until, which an operator's skip, retry or redrive keeps (sql/0024), where the
     * backoff in retryInMs is let go.
     */
    holdMs?: number
    /**
     * Leaves the run open (sql/0019): a hold written for a run this worker's stall cut short,
     * which the next claim must still count as lost with its worker. Closed, the stall was
     * never charged, and a task that stalls every time ran for ever.
     */
    keepRun?: boolean
  },
): Promise<boolean> {
  const r = await sql<{ ok: number }>`
    with fenced as (
      update keyway.consumer_key
         set done_ver = case when ${failure.dead && failure.moveOn} then ${ver} else done_ver end,
             -- The version after done_ver is here (it just ran): whatever gap the key had is
             -- closed, dead or not.
             gap_since = null,
             -- The run ended (sql/0019), unless left to the next claim to judge.
             run_state = case when ${failure.keepRun === true} then run_state else null end
       where grp = ${group} and topic = ${ref.topic} and key = ${ref.key}
         and epoch = ${epoch} and done_ver = ${ver - 1}
      returning 1
    )
    update keyway.inbox
       set attempts = attempts + ${failure.charge ? 1 : 0},
           last_error = ${storableText(failure.error)},
           state = case when ${failure.dead} then 'dead' else 'pending' end,
           run_after = now() + make_interval(secs => ${failure.retryInMs / 1000}),
           hold_until = greatest(hold_until, case when ${(failure.holdMs ?? 0) > 0}
             then now() + make_interval(secs => ${(failure.holdMs ?? 0) / 1000}) end)
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key} and ver = ${ver}
       and exists (select 1 from fenced)
    returning 1 as ok
  `.execute(db)
  return r.rows.length === 1
}

/**
 * Moves the run the claim opened (sql/0019) on: to "alone" when a suspect starts (lost now, it
 * is charged to the task), or closed (null) when it ended without an outcome to record: the
 * drain never started it, or stop() or the loss of the key cut it short. False when fenced:
 * the claim that took the key over has judged the run already.
 */
export async function setRunState(
  db: Kysely<any>,
  group: string,
  ref: KeyRef,
  ver: number,
  epoch: number,
  state: "alone" | null,
): Promise<boolean> {
  const r = await sql`
    update keyway.consumer_key
       set run_state = ${state}
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key} and epoch = ${epoch}
       and run_ver = ${ver} and run_state is not null
  `.execute(db)
  return Number(r.numAffectedRows ?? 0) === 1
}

/**
 * Keeps the lease alive while a handler runs; false when another worker took the key. With
 * `leaseMs` 0 it ends the lease now (a drain whose worker stalled past it).
 */
export async function renewLease(
  db: Kysely<any>,
  group: string,
  ref: KeyRef,
  epoch: number,
  leaseMs: number,
): Promise<boolean> {
  const r = await sql`
    update keyway.consumer_key
       set lease_until = now() + make_interval(secs => ${leaseMs / 1000})
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key} and epoch = ${epoch}
  `.execute(db)
  return Number(r.numAffectedRows ?? 0) === 1
}

/**
 * What waits in the group, for its gauges (DESIGN.md invariant 5): keys held by a missing
 * version and how long the oldest has waited (the partial index of sql/0004), and dead tasks
 * with the keys they block, whose next version is dead (the per-key counts of sql/0005); and
 * the backlog, keys whose next task waits to run and the oldest of those tasks. The first
 * two parts read only the handful of keys their partial indexes hold; the backlog reads every
 * key of the group (see {@link backlogSummary}).
 */
export interface GroupSummary {
  /** Keys waiting for a missing version. */
  gapKeys: number
  /** How long the longest of them has waited, 0 when none does. */
  oldestGapSeconds: number
  /** Dead tasks waiting for an operator (retry, skip or redrive). */
  deadTasks: number
  /** Keys stopped at a dead task (policy block). */
  blockedKeys: number
  /** Keys whose next task is stored and waits to run, now or at its retry time. */
  pendingKeys: number
  /**
   * How long the oldest of those next tasks has been in the inbox, 0 when none waits. It
   * grows while handlers fail or fall behind, where the stream's lag stays 0: ingest keeps up.
   * Counted from the task's arrival: a dead task an operator retries, or the version after a
   * gap skipped late, counts from when it came, not from the operator's action.
   */
  oldestPendingSeconds: number
}

export async function groupSummary(db: Kysely<any>, group: string): Promise<GroupSummary> {
  const [waiting, backlog] = await Promise.all([
    waitingSummary(db, group),
    backlogSummary(db, group),
  ])
  return { ...waiting, ...backlog }
}

/** The gaps and dead tasks of {@link GroupSummary}: a handful of keys, through partial indexes. */
export async function waitingSummary(
  db: Kysely<any>,
  group: string,
): Promise<Omit<GroupSummary, "pendingKeys" | "oldestPendingSeconds">> {
  const r = await sql<{
    gap_keys: number
    oldest_gap_seconds: number | null
    dead_tasks: number
    blocked_keys: number
  }>`
    select g.gap_keys, g.oldest_gap_seconds, d.dead_tasks, d.blocked_keys
      from (select count(*)::int as gap_keys,
                   extract(epoch from now() - min(gap_since))::float8 as oldest_gap_seconds
              from keyway.consumer_key
             where grp = ${group} and gap_since is not null) g,
           (select coalesce(sum(k.dead_tasks), 0)::int as dead_tasks,
                   count(*) filter (where exists (
                     select 1 from keyway.inbox i
                      where i.grp = k.grp and i.topic = k.topic and i.key = k.key
                        and i.ver = k.done_ver + 1 and i.state = 'dead'
                        -- Not one held for a while (runTask's holdMs): that key moves on alone.
                        and i.run_after <= now()))::int as blocked_keys
              from keyway.consumer_key k
             where k.grp = ${group} and k.dead_tasks > 0) d
  `.execute(db)
  const row = r.rows[0]!
  return {
    gapKeys: row.gap_keys,
    oldestGapSeconds: Math.max(0, row.oldest_gap_seconds ?? 0),
    deadTasks: row.dead_tasks,
    blockedKeys: row.blocked_keys,
  }
}

/**
 * The backlog of {@link GroupSummary}: every key of the group and its next version, by
 * primary key, as the polling loop reads them. Its own query, so that a group large enough
 * to make it slow (its keys are never deleted) does not hold up the gap and dead-task figures
 * that page someone.
 */
export async function backlogSummary(
  db: Kysely<any>,
  group: string,
): Promise<Pick<GroupSummary, "pendingKeys" | "oldestPendingSeconds">> {
  const r = await sql<{ pending_keys: number; oldest_pending_seconds: number | null }>`
    select count(*)::int as pending_keys,
           extract(epoch from now() - min(w.received_at))::float8 as oldest_pending_seconds
      from keyway.consumer_key k
      join keyway.inbox i
        on i.grp = k.grp and i.topic = k.topic and i.key = k.key and i.ver = k.done_ver + 1
      -- A parked dead task held until its Retry-After (runTask's holdMs), or skipped since,
      -- holds the key's next version, if one has come: that one waits as behind a pending
      -- task, since it came.
      join lateral (
        select i.received_at where i.state = 'pending'
        union all
        select n.received_at from keyway.inbox n
         where i.state in ('dead', 'skipped') and i.run_after > now()
           and n.grp = i.grp and n.topic = i.topic and n.key = i.key and n.ver = i.ver + 1
      ) w on true
     where k.grp = ${group}
  `.execute(db)
  const row = r.rows[0]!
  return {
    pendingKeys: row.pending_keys,
    oldestPendingSeconds: Math.max(0, row.oldest_pending_seconds ?? 0),
  }
}

/**
 * The keys the safety nets look at: those with an unfinished row (pending, dead, or a skip's),
 * and those rewound below finished rows (superseded_by above done_ver). Every other key has
 * nothing above done_ver, or only rows already done, which a rewind alone leaves there (see
 * sql/0022): none has a task to run, a lapsed lease over one, or a gap. Without it, each
 * query visited every key of the group, every round, in every worker: most are idle, and
 * 100,000 of them cost half a core per worker (`just bench safety-nets`).
 *
 * Read from sql/0022's partial indexes: a row per unfinished task, at a fraction of a
 * microsecond each. A loose index scan (one descent per key) cost 11 µs a key, and lost to
 * the old query once every key had a task due. From after `after` when given.
 */
const candidateKeys = (group: string, after?: KeyRef) => {
  const from = (alias: string) =>
    after
      ? sql`and (${sql.ref(`${alias}.topic`)}, ${sql.ref(`${alias}.key`)}) > (${after.topic}, ${after.key})`
      : sql``
  return sql`
    with candidates (topic, key) as (
      select o.topic, o.key from keyway.inbox o
       where o.grp = ${group} and o.state <> 'done' ${from("o")}
      union
      select r.topic, r.key from keyway.consumer_key r
       where r.grp = ${group} and r.superseded_by is not null and r.done_ver < r.superseded_by
             ${from("r")}
    )`
}

/**
 * Dates the gaps no drain has met: keys whose version after done_ver is missing while a later
 * one is there, with no gap_since yet. A drain dates the gap it reads past (markGap), but the
 * polling loop, the recovery loop and a drain's re-check look only for the version after
 * done_ver, so none starts a drain on a key whose gap is there from the start: a wake-up lost
 * (a worker killed between its ingest's commit and the wake-up), or taken by a worker that
 * found the key's lock held by another, whose drain had read its tasks before the later
 * version came and ended with nothing runnable. The key waited, rightly, and the gap gauges
 * of invariant 5 said 0. The recovery loop runs this each round.
 *
 * The probes are scalar subqueries, one index lookup each per candidate key: as `not exists`
 * the planner made them an anti-join hashing every inbox row of the group. Skip locked: a key
 * locked now is in a claim or a completion, and waits for the next round.
 */
export async function dateGaps(db: Kysely<any>, group: string): Promise<number> {
  const r = await sql`
    ${candidateKeys(group)}
    update keyway.consumer_key c
       set gap_since = now()
      from (select c2.grp, c2.topic, c2.key
              from candidates k
              join keyway.consumer_key c2
                on c2.grp = ${group} and c2.topic = k.topic and c2.key = k.key
             where c2.gap_since is null
               and c2.baseline_stream_seq is null
               and (select y.ver from keyway.inbox y
                     where y.grp = c2.grp and y.topic = c2.topic and y.key = c2.key
                       and y.ver = c2.done_ver + 1) is null
               and (select y.ver from keyway.inbox y
                     where y.grp = c2.grp and y.topic = c2.topic and y.key = c2.key
                       and y.ver > c2.done_ver + 1
                     order by y.ver limit 1) is not null
             order by c2.topic collate "C", c2.key collate "C"
               for no key update of c2 skip locked) g
     where c.grp = g.grp and c.topic = g.topic and c.key = g.key
  `.execute(db)
  return Number(r.numAffectedRows ?? 0)
}

/**
 * Forgets the rewinds keys have walked past (superseded_by at or below done_ver): a task above
 * it is told of no later version anyway (KeyedEvent.supersededBy), and a key that keeps the
 * record stays among the safety nets' candidates (candidateKeys) for good. After a topic-wide
 * retry or redrive that was every key of the topic, scanned each round again. Off the hot
 * path: the completion that walks past it is left as it is (heap-only). Skip locked, and in
 * byte order, as the other key-locking statements.
 */
export async function forgetPassedRewinds(db: Kysely<any>, group: string): Promise<number> {
  const r = await sql`
    update keyway.consumer_key c
       set superseded_by = null
      from (select r.grp, r.topic, r.key from keyway.consumer_key r
             where r.grp = ${group} and r.superseded_by is not null
               and r.done_ver >= r.superseded_by
             order by r.topic collate "C", r.key collate "C"
               for no key update of r skip locked) p
     where c.grp = p.grp and c.topic = p.topic and c.key = p.key
  `.execute(db)
  return Number(r.numAffectedRows ?? 0)
}

/** Records since when the key waits for a missing version (the first time only). */
export async function markGap(db: Kysely<any>, group: string, ref: KeyRef, epoch: number) {
  await sql`
    update keyway.consumer_key set gap_since = coalesce(gap_since, now())
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key} and epoch = ${epoch}
  `.execute(db)
}

/**
 * Which topics' dead tasks a drain steps over (policy `park`), in the form the SQL reads:
 * the policy of topics without one of their own, and the topics whose policy differs from it.
 * A key stands at a dead task of a `park` topic only after an operator rewound it below one
 * (a partial retry or redrive); its drain walks on past it.
 */
export interface ParkedTopics {
  byDefault: boolean
  except: readonly string[]
}

/** The SQL condition "the task at `i` does not hold its key": not dead, or dead and parked. */
const notHolding = (parks: ParkedTopics) =>
  sql`(i.state <> 'dead' or (i.topic = any(${parks.except}::text[])) <> ${parks.byDefault})`

/**
 * Keys that have a task ready to run: the polling loop's catch for lost wake-ups. "Ready" is
 * anything that does not hold its key (see ParkedTopics) and whose retry time has come: a
 * version an operator skipped, or one already done or parked above a key an operator
 * rewound, still needs a drain to move the key past it. Leases are not consulted: a key
 * another worker is draining costs one refused Redis lock here, while waiting for its lease
 * would delay a lost wake-up by a lease length.
 *
 * In key order, from after `after`: the caller passes the last key of a full page to the next
 * poll, and starts again from the first once a page comes back short. Without an order, a
 * backlog of more than `limit` keys being drained filled every page with the same busy keys,
 * and a key whose wake-up was lost waited until the backlog was gone.
 */
export async function runnableKeys(
  db: Kysely<any>,
  group: string,
  parks: ParkedTopics,
  limit: number,
  after?: KeyRef,
): Promise<KeyRef[]> {
  const r = await sql<KeyRef>`
    ${candidateKeys(group, after)}
    select k.topic, k.key
      from candidates c
      join keyway.consumer_key k on k.grp = ${group} and k.topic = c.topic and k.key = c.key
      join keyway.inbox i
        on i.grp = k.grp and i.topic = k.topic and i.key = k.key and i.ver = k.done_ver + 1
     where k.baseline_stream_seq is null
       and ${notHolding(parks)} and i.run_after <= now()
       ${after ? sql`and (k.topic, k.key) > (${after.topic}, ${after.key})` : sql``}
     order by k.topic, k.key
     limit ${limit}
  `.execute(db)
  return r.rows
}

/**
 * The recovery loop's query: keys whose lease has run out while a task is ready. That is a
 * worker that stopped renewing (crashed, or frozen), and also a drain that ended normally:
 * leases are not cleared at its end, so a key drained within a lease that has a task due
 * later (a retry) is found here too. Clears their leases and returns them to be drained.
 */
export async function expireLeases(
  db: Kysely<any>,
  group: string,
  parks: ParkedTopics,
): Promise<KeyRef[]> {
  // The keys locked first, in byte order, as ingest, claims, completions and the admin
  // actions lock them; an update alone locked them in its plan's order, and could deadlock
  // with any of those (a review did, with an ingest, in a database whose collation is not C).
  // A key locked elsewhere is being worked on: skipped, not waited for.
  const r = await sql<KeyRef>`
    ${candidateKeys(group)}
    update keyway.consumer_key k
       set owner = null, lease_until = null
      from (select c.grp, c.topic, c.key
              from candidates n
              join keyway.consumer_key c
                on c.grp = ${group} and c.topic = n.topic and c.key = n.key
             where c.lease_until < now()
               and exists (select 1 from keyway.inbox i
                            where i.grp = c.grp and i.topic = c.topic and i.key = c.key
                              and i.ver = c.done_ver + 1 and ${notHolding(parks)}
                              and i.run_after <= now())
             order by c.topic collate "C", c.key collate "C"
               for no key update skip locked) s
     where k.grp = s.grp and k.topic = s.topic and k.key = s.key
    returning k.topic, k.key
  `.execute(db)
  return r.rows
}

/** Which of these keys have a task ready now (keyway.runnable_keys_of). */
export async function runnableKeysOf(
  db: Kysely<any>,
  group: string,
  parks: ParkedTopics,
  refs: readonly KeyRef[],
): Promise<boolean[]> {
  const r = await sql<{ n: number }>`
    select n from keyway.runnable_keys_of(${group}, ${refs.map((k) => k.topic)}::text[],
                                          ${refs.map((k) => k.key)}::text[],
                                          ${parks.byDefault}, ${parks.except}::text[]) as n
  `.execute(db)
  const ok = refs.map(() => false)
  for (const row of r.rows) ok[row.n - 1] = true
  return ok
}

export async function recordReject(
  db: Kysely<any>,
  group: string,
  reject: { streamSeq: number; subject: string; reason: string; data: Uint8Array },
): Promise<void> {
  // The subject too: nats-server 2.9.10 takes a NUL in one, which Postgres' text refuses (as
  // it would in a reason quoting the message). Refused, the reject was retried for ever, and
  // the batch and every message behind it with it: the group stopped.
  await sql`
    insert into keyway.inbox_reject (grp, stream_seq, subject, reason, data)
    values (${group}, ${reject.streamSeq}, ${storableText(reject.subject)},
            ${storableText(reject.reason)}, ${Buffer.from(reject.data)})
    on conflict (grp, stream_seq) do nothing
  `.execute(db)
}

/**
 * Retention: deletes finished rows (done, skipped) received more than `maxAgeMs` ago, at
 * most `batchSize` per statement so no statement holds many row locks. Dead rows stay until
 * an operator acts on them. Returns how many rows went.
 *
 * Only rows at or below their key's done_ver, which are never read again: a finished row
 * above it (skipped ahead of time, or left above a key that a retry rewound) is still to be
 * stepped over, and without it the key would stop there for good. The key rows are taken FOR
 * KEY SHARE, so a retry or redrive, which locks them FOR UPDATE before it checks what it may
 * rewind over, cannot rewind a key below rows this statement is deleting; keys it holds are
 * left for the next round. Workers' updates (claims, completions, leases) do not conflict
 * with that lock, and only ever raise done_ver. The state is checked again on the row deleted: a
 * redrive may have made it pending after the subquery read it.
 */
export async function pruneInbox(
  db: Kysely<any>,
  group: string,
  maxAgeMs: number,
  batchSize: number,
): Promise<number> {
  return deleteInBatches(batchSize, (limit) =>
    sql`
      delete from keyway.inbox i
       where (i.grp, i.topic, i.key, i.ver) in (
         select x.grp, x.topic, x.key, x.ver
           from keyway.inbox x
           join keyway.consumer_key k on k.grp = x.grp and k.topic = x.topic and k.key = x.key
          where x.grp = ${group}
            and x.received_at < now() - make_interval(secs => ${maxAgeMs / 1000})
            and x.state in ('done', 'skipped')
            and x.ver <= k.done_ver
            -- Baselines may still lower done_ver, and take no lock that this one would see.
            and k.baseline_stream_seq is null
          limit ${limit}
          for key share of k skip locked)
         and i.state in ('done', 'skipped')
    `.execute(db),
  )
}

/**
 * Retention of rejects: deletes a group's rejects received more than `maxAgeMs` ago, at most
 * `batchSize` per statement. Returns how many went.
 */
export async function pruneRejects(
  db: Kysely<any>,
  group: string,
  maxAgeMs: number,
  batchSize: number,
): Promise<number> {
  return deleteInBatches(batchSize, (limit) =>
    sql`
      delete from keyway.inbox_reject
       where id in (
         select id from keyway.inbox_reject
          where grp = ${group}
            and received_at < now() - make_interval(secs => ${maxAgeMs / 1000})
          limit ${limit}
          -- The group's other workers prune the same rows, and an operator may dismiss them.
          for update skip locked)
    `.execute(db),
  )
}

/** Runs a delete of at most `batchSize` rows until one deletes fewer; returns how many went. */
async function deleteInBatches(
  batchSize: number,
  deleteOnce: (limit: number) => Promise<{ numAffectedRows?: bigint }>,
): Promise<number> {
  let total = 0
  for (;;) {
    const n = Number((await deleteOnce(batchSize)).numAffectedRows ?? 0)
    total += n
    if (n < batchSize) return total
  }
}

/**
 * Makes the space of pruned rows reusable. Postgres prunes dead rows within a page by
 * itself, but inserts find free space only through the free space map, which only a vacuum
 * fills: until then they extend the table. Autovacuum does that on its own schedule, if it
 * is on (it is off on this project's shared server): without it the inbox grew by about
 * 0.5 MB per 1,000 events handled and pruned, for ever (keyed-consumer.test.ts, retention
 * test). SKIP_LOCKED: every group's workers share the table, and one vacuum at a time is
 * enough. TRUNCATE false: giving trailing pages back would take an exclusive lock on a table
 * that every group writes, for pages it soon refills. Without the privilege Postgres skips
 * the table with a warning only its own log shows, and the inbox depends on autovacuum again.
 *
 * On a connection of its own, for as long as the vacuum runs. `onStart` gets its backend's
 * pid, which {@link cancelVacuum} needs, and says whether to go on.
 */
export async function vacuumInbox(
  db: Kysely<any>,
  onStart: (pid: number) => boolean,
): Promise<void> {
  await db.connection().execute(async (conn) => {
    const r = await sql<{ pid: number }>`select pg_backend_pid() as pid`.execute(conn)
    if (!onStart(r.rows[0]!.pid)) return
    await sql`vacuum (skip_locked, truncate false) keyway.inbox`.execute(conn)
  })
}

/** Cancels a running vacuum (safe: a cancelled vacuum keeps what it had done). */
export async function cancelVacuum(db: Kysely<any>, pid: number): Promise<void> {
  await sql`select pg_cancel_backend(${pid})`.execute(db)
}
