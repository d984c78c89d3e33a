-- Keyed consumers (DESIGN.md §5): the inbox of each consumer group and its per-key state.
--
-- Several consumer groups may share a database; `grp` names the group (normally the durable
-- consumer's name). Every statement the library runs is scoped by it.

-- One row per event a group ingested. The per-key version, not the order JetStream
-- delivered in, decides when an event runs: JetStream redelivers, delivers batches to
-- several workers at once, and a sourced stream interleaves origins.
create table keyway.inbox (
  grp         text        not null,
  topic       text        not null,
  key         text        not null,
  ver         bigint      not null,
  -- `<site>:<seq>`. Unique per group: a redelivered or re-published event is dropped at
  -- ingest (on conflict do nothing), which is what makes at-least-once delivery harmless.
  event_id    text        not null,
  type        text        not null,
  payload     jsonb       not null,
  trace       jsonb,
  created_at  timestamptz not null,            -- the writer's insert, from the envelope
  received_at timestamptz not null default now(),
  -- pending → done, or pending → dead (attempts exhausted, or poison), or dead → pending
  -- (an operator's retry), or pending/dead → skipped (an operator's skip).
  state       text        not null default 'pending'
              check (state in ('pending', 'done', 'dead', 'skipped')),
  attempts    int         not null default 0,
  run_after   timestamptz not null default '-infinity',
  last_error  text,
  done_at     timestamptz,
  primary key (grp, topic, key, ver),
  unique (grp, event_id)
);

-- Each row is inserted once and updated once or twice (done, or a retry). Those updates
-- must stay HOT (heap-only: no new index entries), so no index may mention a column they
-- change (state, attempts, run_after, done_at), and pages keep room for the new version.
-- Admin listings of dead tasks scan instead; they are rare. Retention walks received_at.
alter table keyway.inbox set (fillfactor = 80);
create index inbox_received_idx on keyway.inbox (grp, received_at);

-- One row per (group, topic, key): where the key stands and who may advance it.
create table keyway.consumer_key (
  grp         text        not null,
  topic       text        not null,
  key         text        not null,
  -- Every version up to done_ver is finished (done, skipped, or dead and parked). The next
  -- task to run is always done_ver + 1; if it is absent that is a gap and the key waits.
  done_ver    bigint      not null,
  -- Fencing. A worker bumps epoch when it takes the key and every later write of its checks
  -- `epoch = <its epoch>`: a worker that lost its lock during a long pause writes nothing.
  -- Correctness rests here; the Redis lock only saves work.
  epoch       bigint      not null default 0,
  owner       text,
  lease_until timestamptz,
  -- Set while the key's starting point is unknown: it was first seen at a version above 1,
  -- at this stream sequence. Once the group's ack floor passes it, every earlier message of
  -- the stream was ingested, and done_ver becomes (lowest version ingested) - 1.
  baseline_stream_seq bigint,
  -- When the key last had nothing to run because done_ver + 1 was missing.
  gap_since   timestamptz,
  primary key (grp, topic, key)
) with (fillfactor = 50); -- updated on every task; room on the page keeps the updates HOT

-- Messages that could not even be read as an event (no key to order them by): kept with the
-- reason for an operator, then acked, so one bad message never stops the others.
create table keyway.inbox_reject (
  id          bigserial   primary key,
  grp         text        not null,
  stream_seq  bigint,
  subject     text        not null,
  reason      text        not null,
  data        bytea       not null,
  received_at timestamptz not null default now()
);

-- The consumer's hot path as functions. Postgres caches the plans of a function's
-- statements per session, so each event costs an execution rather than a parse and plan of
-- these CTEs (graphile-worker's get_job/complete_job do the same). Measured with
-- `just bench pipeline`: Postgres was the busiest process, ahead of every Node process.

-- Ingest: insert a batch, dropping events already there (redelivery, re-publish), and record
-- keys seen for the first time with their starting point. Returns the keys that got rows.
--
-- A key first seen at version 1 starts at 0. A key first seen higher up (the group started
-- after the key, retention removed its first events, or another worker's batch with the
-- lower versions has not committed yet) gets a provisional start, baseline_stream_seq, and
-- is not drained until keyway.confirm_baselines() settles it.
create function keyway.ingest(
  p_grp text, p_topics text[], p_keys text[], p_vers bigint[], p_ids text[], p_types text[],
  p_payloads jsonb[], p_traces jsonb[], p_created timestamptz[], p_stream_seqs bigint[]
) returns table (topic text, key text)
language sql
as $$
  with incoming as (
    select * from unnest(p_topics, p_keys, p_vers, p_ids, p_types, p_payloads, p_traces,
                         p_created, p_stream_seqs)
      as t(topic, key, ver, event_id, type, payload, trace, created_at, stream_seq)
  ),
  inserted as (
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, trace, created_at)
    select p_grp, topic, key, ver, event_id, type, payload, trace, created_at from incoming
    on conflict do nothing
    returning topic, key
  ),
  first_seen as (
    insert into keyway.consumer_key (grp, topic, key, done_ver, baseline_stream_seq)
    select p_grp, topic, key, min(ver) - 1,
           case when min(ver) = 1 then null else (array_agg(stream_seq order by ver))[1] end
    from incoming
    group by topic, key
    order by topic, key
    on conflict do nothing
  )
  select distinct topic, key from inserted
$$;

-- Takes a key for a worker and returns its next tasks in one round trip: bumps the fencing
-- epoch (committed before any handler runs, so the token a handler passes to an external
-- system is already the newest) and sets the lease. It does not look at another worker's
-- lease: the Redis lock decides who works, and if two workers ever hold a key at once
-- (Redis lost its locks) the later bump fences the earlier one. Returns nothing for a key
-- whose start is still provisional; one row with null task columns for a key with no task.
create function keyway.claim_key(
  p_grp text, p_topic text, p_key text, p_owner text, p_lease_ms int, p_limit int
) returns table (epoch bigint, done_ver bigint, ver bigint, event_id text, type text,
                 payload jsonb, trace jsonb, created_at timestamptz, state text, attempts int,
                 wait_ms double precision)
language sql
as $$
  with k as (
    update keyway.consumer_key
       set epoch = epoch + 1, owner = p_owner,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0)
     where grp = p_grp and topic = p_topic and key = p_key and baseline_stream_seq is null
    returning epoch, done_ver
  )
  select k.epoch, k.done_ver, i.ver, i.event_id, i.type, i.payload, i.trace, i.created_at,
         i.state, i.attempts,
         extract(epoch from greatest(i.run_after, now()) - now()) * 1000
    from k left join keyway.inbox i
      on i.grp = p_grp and i.topic = p_topic and i.key = p_key
     and i.ver > k.done_ver and i.ver <= k.done_ver + p_limit
   order by i.ver
$$;

-- Inside the handler's transaction: advances the key to p_ver and marks the task done, if
-- and only if the worker still holds the key (its epoch is current). The update takes the
-- key row's lock, so a worker bumping the epoch meanwhile waits for this commit and then
-- sees the new done_ver. False means fenced: the caller rolls back. A task an operator
-- skipped ahead of time stays 'skipped': it did not run.
create function keyway.complete_task(
  p_grp text, p_topic text, p_key text, p_ver bigint, p_epoch bigint, p_lease_ms int
) returns boolean
language sql
as $$
  with advanced as (
    update keyway.consumer_key
       set done_ver = p_ver, gap_since = null,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0)
     where grp = p_grp and topic = p_topic and key = p_key
       and epoch = p_epoch and done_ver = p_ver - 1
    returning 1
  ),
  marked as (
    update keyway.inbox
       set state = case when state = 'skipped' then 'skipped' else 'done' end,
           done_at = coalesce(done_at, now()),
           attempts = attempts + case when state = 'pending' then 1 else 0 end
     where grp = p_grp and topic = p_topic and key = p_key and ver = p_ver
       and exists (select 1 from advanced)
    returning 1
  )
  select exists (select 1 from marked)
$$;

-- Whether the key has a task ready now: checked after a drain lets go of the key, to catch a
-- wake-up that found the key locked meanwhile.
create function keyway.is_runnable(p_grp text, p_topic text, p_key text) returns boolean
language sql stable
as $$
  select exists (
    select 1
      from keyway.consumer_key k
      join keyway.inbox i
        on i.grp = k.grp and i.topic = k.topic and i.key = k.key and i.ver = k.done_ver + 1
     where k.grp = p_grp and k.topic = p_topic and k.key = p_key
       and k.baseline_stream_seq is null
       and i.state <> 'dead' and i.run_after <= now())
$$;
