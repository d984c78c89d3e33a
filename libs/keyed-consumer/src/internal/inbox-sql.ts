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

export interface KeyRef {
  topic: string
  key: string
}

/**
 * Inserts a batch into the inbox, dropping events already there, and records keys seen for
 * the first time with their starting point. One statement for the batch: an ingest commit
 * costs far more than the rows in it.
 *
 * A key first seen with version 1 starts at 0. A key first seen higher up (the group started
 * later than the key, or retention removed its first events, or another worker's batch with
 * the lower versions has not committed yet) gets a provisional start and is not drained
 * until confirmBaselines() settles it.
 */
export async function ingestBatch(
  db: Kysely<any>,
  group: string,
  events: readonly IncomingEvent[],
): Promise<KeyRef[]> {
  const col = <K extends keyof IncomingEvent>(k: K) => events.map((e) => e[k])
  const r = await sql<KeyRef>`
    with incoming as (
      select * from unnest(
        ${col("topic")}::text[], ${col("key")}::text[], ${col("ver")}::bigint[],
        ${col("eventId")}::text[], ${col("type")}::text[], ${col("payload")}::jsonb[],
        ${col("trace")}::jsonb[], ${col("createdAt")}::timestamptz[], ${col("streamSeq")}::bigint[]
      ) as t(topic, key, ver, event_id, type, payload, trace, created_at, stream_seq)
    ),
    inserted as (
      insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, trace, created_at)
      select ${group}, topic, key, ver, event_id, type, payload, trace, created_at from incoming
      on conflict do nothing
      returning topic, key
    ),
    first_seen as (
      insert into keyway.consumer_key (grp, topic, key, done_ver, baseline_stream_seq)
      select ${group}, topic, key, min(ver) - 1,
             case when min(ver) = 1 then null
                  else (array_agg(stream_seq order by ver))[1] end
      from incoming
      group by topic, key
      order by topic, key
      on conflict do nothing
    )
    select distinct topic, key from inserted
  `.execute(db)
  return r.rows
}

/**
 * Settles provisional starting points. `ackFloor` is the group's JetStream ack floor: every
 * message up to it was acked, and ingest acks only after committing, so every earlier
 * version of such a key that the stream still holds is in the inbox by now.
 */
export async function confirmBaselines(db: Kysely<any>, group: string, ackFloor: number) {
  const r = await sql`
    update keyway.consumer_key k
       set done_ver = least(k.done_ver,
             (select min(i.ver) - 1 from keyway.inbox i
               where i.grp = k.grp and i.topic = k.topic and i.key = k.key)),
           baseline_stream_seq = null
     where k.grp = ${group} and k.baseline_stream_seq <= ${ackFloor} + 1
  `.execute(db)
  return Number(r.numAffectedRows ?? 0)
}

export async function hasProvisionalBaselines(db: Kysely<any>, group: string): Promise<boolean> {
  const r = await sql`
    select 1 from keyway.consumer_key where grp = ${group} and baseline_stream_seq is not null limit 1
  `.execute(db)
  return r.rows.length > 0
}

/**
 * Takes the key for this worker: bumps its fencing epoch and sets a lease. Refuses a key
 * whose lease another worker holds (that worker is alive and draining it) or whose start is
 * still provisional.
 */
export async function takeKey(
  db: Kysely<any>,
  group: string,
  ref: KeyRef,
  owner: string,
  leaseMs: number,
): Promise<{ epoch: number; doneVer: number } | undefined> {
  const r = await sql<{ epoch: number; done_ver: number }>`
    update keyway.consumer_key
       set epoch = epoch + 1, owner = ${owner},
           lease_until = now() + make_interval(secs => ${leaseMs / 1000})
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key}
       and baseline_stream_seq is null
       and (lease_until is null or lease_until < now() or owner = ${owner})
    returning epoch, done_ver
  `.execute(db)
  const row = r.rows[0]
  return row && { epoch: row.epoch, doneVer: row.done_ver }
}

/** The next tasks of a key, from version `from` on, in version order. */
export async function nextTasks(
  db: Kysely<any>,
  group: string,
  ref: KeyRef,
  from: number,
  limit: number,
): Promise<TaskRow[]> {
  const r = await sql<TaskRow>`
    select ver, event_id, type, payload, trace, created_at, state, attempts,
           extract(epoch from greatest(run_after, now()) - now()) * 1000 as wait_ms
      from keyway.inbox
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key}
       and ver >= ${from} and ver < ${from + limit}
     order by ver
  `.execute(db)
  return r.rows
}

/**
 * Inside the handler's transaction: advance the key to `ver` and mark the task done, if and
 * only if this worker still holds the key at that point. The update takes the key row's
 * lock, so a worker bumping the epoch now waits for this commit and then sees the new
 * done_ver. False means fenced: the caller rolls back.
 */
export async function markDone(
  trx: Kysely<any>,
  group: string,
  ref: KeyRef,
  ver: number,
  epoch: number,
): Promise<boolean> {
  const r = await sql<{ ok: number }>`
    with advanced as (
      update keyway.consumer_key
         set done_ver = ${ver}, gap_since = null
       where grp = ${group} and topic = ${ref.topic} and key = ${ref.key}
         and epoch = ${epoch} and done_ver = ${ver - 1}
      returning 1
    )
    update keyway.inbox
       -- A task an operator skipped ahead of time stays 'skipped'; it did not run.
       set state = case when state = 'skipped' then 'skipped' else 'done' end,
           done_at = coalesce(done_at, now()),
           attempts = attempts + case when state = 'pending' then 1 else 0 end
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key} and ver = ${ver}
       and exists (select 1 from advanced)
    returning 1 as ok
  `.execute(trx)
  return r.rows.length === 1
}

/**
 * Records a failed attempt. With `dead` the task is dead now (attempts exhausted or
 * poison); with `park` as well, the key moves past it. Returns false when fenced.
 */
export async function markFailed(
  db: Kysely<any>,
  group: string,
  ref: KeyRef,
  ver: number,
  epoch: number,
  failure: { error: string; retryInMs: number; dead: boolean; park: boolean },
): Promise<boolean> {
  const r = await sql<{ ok: number }>`
    with fenced as (
      update keyway.consumer_key
         set done_ver = case when ${failure.dead && failure.park} then ${ver} else done_ver end
       where grp = ${group} and topic = ${ref.topic} and key = ${ref.key}
         and epoch = ${epoch} and done_ver = ${ver - 1}
      returning 1
    )
    update keyway.inbox
       set attempts = attempts + 1,
           last_error = ${failure.error},
           state = case when ${failure.dead} then 'dead' else 'pending' end,
           run_after = now() + make_interval(secs => ${failure.retryInMs / 1000})
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key} and ver = ${ver}
       and exists (select 1 from fenced)
    returning 1 as ok
  `.execute(db)
  return r.rows.length === 1
}

/** Keeps the lease alive while a handler runs; false when another worker took the key. */
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

/** Gives the key back. `gap` records since when the key waits for a missing version. */
export async function releaseKey(
  db: Kysely<any>,
  group: string,
  ref: KeyRef,
  epoch: number,
  gap: boolean,
): Promise<void> {
  await sql`
    update keyway.consumer_key
       set owner = null, lease_until = null,
           gap_since = case when ${gap} then coalesce(gap_since, now()) else null end
     where grp = ${group} and topic = ${ref.topic} and key = ${ref.key} and epoch = ${epoch}
  `.execute(db)
}

/**
 * Keys that have a task ready to run and nobody holding them: the polling loop's catch for
 * lost wake-ups. A key whose lease expired (its worker crashed) counts as free here, so the
 * recovery loop only needs to clear stale leases for the listings.
 */
export async function runnableKeys(
  db: Kysely<any>,
  group: string,
  limit: number,
): Promise<KeyRef[]> {
  const r = await sql<KeyRef>`
    select k.topic, k.key
      from keyway.consumer_key k
      join keyway.inbox i
        on i.grp = k.grp and i.topic = k.topic and i.key = k.key and i.ver = k.done_ver + 1
     where k.grp = ${group}
       and k.baseline_stream_seq is null
       and (k.lease_until is null or k.lease_until < now())
       and i.state = 'pending' and i.run_after <= now()
     limit ${limit}
  `.execute(db)
  return r.rows
}

/** Clears leases that expired: their workers died or stalled. Returns the keys. */
export async function expireLeases(db: Kysely<any>, group: string): Promise<KeyRef[]> {
  const r = await sql<KeyRef>`
    update keyway.consumer_key
       set owner = null, lease_until = null
     where grp = ${group} and lease_until < now()
    returning topic, key
  `.execute(db)
  return r.rows
}

/** Whether the key has a task ready now (checked after releasing it, to close a race). */
export async function isRunnable(db: Kysely<any>, group: string, ref: KeyRef): Promise<boolean> {
  const r = await sql`
    select 1
      from keyway.consumer_key k
      join keyway.inbox i
        on i.grp = k.grp and i.topic = k.topic and i.key = k.key and i.ver = k.done_ver + 1
     where k.grp = ${group} and k.topic = ${ref.topic} and k.key = ${ref.key}
       and k.baseline_stream_seq is null
       and i.state = 'pending' and i.run_after <= now()
  `.execute(db)
  return r.rows.length > 0
}

export async function recordReject(
  db: Kysely<any>,
  group: string,
  reject: { streamSeq: number; subject: string; reason: string; data: Uint8Array },
): Promise<void> {
  await sql`
    insert into keyway.inbox_reject (grp, stream_seq, subject, reason, data)
    values (${group}, ${reject.streamSeq}, ${reject.subject}, ${reject.reason}, ${Buffer.from(reject.data)})
  `.execute(db)
}
