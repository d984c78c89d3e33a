-- The consumer's hot path, again: in PL/pgSQL, and for many keys per call.
--
-- 0002 wrote these functions in LANGUAGE sql believing Postgres caches their plans per
-- session. It does not (before Postgres 18): a SQL function that is not inlined parses and
-- plans its body on every call. PL/pgSQL prepares each statement once per session. Measured
-- with pg_stat_statements during `just bench pipeline` (mean server time per call, the
-- function vs the statement inside it): claim_key 0.41 vs 0.10 ms, complete_task 0.32 vs
-- 0.08, is_runnable 0.26 vs 0.06, ingest 1.33 vs 0.98.
--
-- And one key per call was the larger cost: a CPU profile of the benchmark's workers showed
-- a third of their time in socket writes, and the kernel time of every round trip lands on
-- the same two cores as Postgres. The worker now batches the claims, completions and
-- re-checks of all keys it drains at once (libs/keyed-consumer/src/internal/batcher.ts), so
-- these functions take arrays. Each loops over its keys with primary-key statements rather
-- than joining the arrays to the tables: a cached generic plan for a join can turn into a
-- scan of every key (see below), a primary-key lookup cannot.
--
-- Each statement looks rows up by a full primary key or a key's version range, never by a
-- join: a cached generic plan for a join was planned while the tables were young and small,
-- and during the benchmark it read every row of a key instead of one.
--
-- `#variable_conflict use_column`: the RETURNS TABLE columns (topic, key, ver, ...) are
-- variables in PL/pgSQL and would otherwise clash with the same-named table columns.

-- The functions' statements are prepared once and then run with a cached generic plan. A
-- generic plan made while a table is young (no statistics yet: autovacuum analyzes after a
-- minute or so) has no reason to prefer the primary key over another index with the same
-- leading column, and during the benchmark it chose inbox_received_idx (grp, received_at):
-- every completion walked all of the group's inbox rows (~3,000 rows read per event). So
-- the primary key is the only inbox index that starts with grp: retention walks
-- received_at alone, and the dedupe constraint leads with event_id (ingest's ON CONFLICT
-- uses it in any column order).
drop index keyway.inbox_received_idx;
create index inbox_received_idx on keyway.inbox (received_at);
alter table keyway.inbox drop constraint inbox_grp_event_id_key;
alter table keyway.inbox add constraint inbox_event_id_grp_key unique (event_id, grp);

create or replace function keyway.ingest(
  p_grp text, p_topics text[], p_keys text[], p_vers bigint[], p_ids text[], p_types text[],
  p_payloads jsonb[], p_traces jsonb[], p_created timestamptz[], p_stream_seqs bigint[]
) returns table (topic text, key text)
language plpgsql
as $$
#variable_conflict use_column
begin
  return query
  with incoming as (
    select * from unnest(p_topics, p_keys, p_vers, p_ids, p_types, p_payloads, p_traces,
                         p_created, p_stream_seqs)
      as t(topic, key, ver, event_id, type, payload, trace, created_at, stream_seq)
  ),
  inserted as (
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, trace, created_at)
    select p_grp, i.topic, i.key, i.ver, i.event_id, i.type, i.payload, i.trace, i.created_at
      from incoming i
    on conflict do nothing
    returning inbox.topic, inbox.key
  ),
  first_seen as (
    insert into keyway.consumer_key (grp, topic, key, done_ver, baseline_stream_seq)
    select p_grp, i.topic, i.key, min(i.ver) - 1,
           case when min(i.ver) = 1 then null else (array_agg(i.stream_seq order by i.ver))[1] end
    from incoming i
    group by i.topic, i.key
    order by i.topic, i.key
    on conflict do nothing
  )
  select distinct n.topic, n.key from inserted n;
end
$$;

-- Takes keys for a worker and returns their next tasks in one round trip: bumps each key's
-- fencing epoch (committed before any handler runs, so the token a handler passes to an
-- external system is already the newest) and sets its lease. It does not look at another
-- worker's lease: the Redis lock decides who works, and if two workers ever hold a key at
-- once (Redis lost its locks) the later bump fences the earlier one. A key whose start is
-- still provisional gets no row; a key with no task gets one row with null task columns.
-- `i` is the key's position in the arrays. Callers pass keys in sorted order, so two
-- batches that share keys lock them in the same order.
create function keyway.claim_keys(
  p_grp text, p_topics text[], p_keys text[], p_owner text, p_lease_ms int, p_limit int
) returns table (i int, epoch bigint, done_ver bigint, ver bigint, event_id text, type text,
                 payload jsonb, trace jsonb, created_at timestamptz, state text, attempts int,
                 wait_ms double precision)
language plpgsql
as $$
#variable_conflict use_column
declare
  v_epoch bigint;
  v_done bigint;
begin
  for n in 1 .. coalesce(array_length(p_keys, 1), 0) loop
    update keyway.consumer_key c
       set epoch = c.epoch + 1, owner = p_owner,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0)
     where c.grp = p_grp and c.topic = p_topics[n] and c.key = p_keys[n]
       and c.baseline_stream_seq is null
    returning c.epoch, c.done_ver into v_epoch, v_done;
    if found then
      return query
      select n, v_epoch, v_done, x.ver, x.event_id, x.type, x.payload, x.trace, x.created_at,
             x.state, x.attempts,
             extract(epoch from greatest(x.run_after, now()) - now())::float8 * 1000
        from (select 1) one
        left join keyway.inbox x
          on x.grp = p_grp and x.topic = p_topics[n] and x.key = p_keys[n]
         and x.ver > v_done and x.ver <= v_done + p_limit
       order by x.ver;
    end if;
  end loop;
end
$$;

-- Inside the transaction that also holds the handlers' local effects: advances each key to
-- its version and marks the task done, if and only if the worker still holds the key (its
-- epoch is current). The update takes the key row's lock, so a worker bumping the epoch
-- meanwhile waits for this commit and then sees the new done_ver. Returns the positions of
-- the tasks completed; one missing was fenced, and its effects must not be written. A task
-- an operator skipped ahead of time stays 'skipped': it did not run.
create function keyway.complete_tasks(
  p_grp text, p_topics text[], p_keys text[], p_vers bigint[], p_epochs bigint[],
  p_lease_ms int
) returns setof int
language plpgsql
as $$
begin
  for n in 1 .. coalesce(array_length(p_keys, 1), 0) loop
    update keyway.consumer_key
       set done_ver = p_vers[n], gap_since = null,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0)
     where grp = p_grp and topic = p_topics[n] and key = p_keys[n]
       and epoch = p_epochs[n] and done_ver = p_vers[n] - 1;
    if found then
      update keyway.inbox
         set state = case when state = 'skipped' then 'skipped' else 'done' end,
             done_at = coalesce(done_at, now()),
             attempts = attempts + case when state = 'pending' then 1 else 0 end
       where grp = p_grp and topic = p_topics[n] and key = p_keys[n] and ver = p_vers[n];
      if not found then
        -- The worker completes only tasks it read; without the row the key must not move.
        raise exception 'keyway.complete_tasks: %/% has no inbox row v%',
          p_topics[n], p_keys[n], p_vers[n];
      end if;
      return next n;
    end if;
  end loop;
end
$$;

-- Which of these keys have a task ready now (positions in the arrays): checked after a drain
-- lets go of its keys, to catch a wake-up that found a key locked meanwhile.
create function keyway.runnable_keys_of(p_grp text, p_topics text[], p_keys text[])
returns setof int
language plpgsql stable
as $$
declare
  v_done bigint;
begin
  for n in 1 .. coalesce(array_length(p_keys, 1), 0) loop
    select done_ver into v_done
      from keyway.consumer_key
     where grp = p_grp and topic = p_topics[n] and key = p_keys[n]
       and baseline_stream_seq is null;
    if found and exists (
      select 1 from keyway.inbox
       where grp = p_grp and topic = p_topics[n] and key = p_keys[n] and ver = v_done + 1
         and state <> 'dead' and run_after <= now()) then
      return next n;
    end if;
  end loop;
end
$$;

drop function keyway.claim_key(text, text, text, text, int, int);
drop function keyway.complete_task(text, text, text, bigint, bigint, int);
drop function keyway.is_runnable(text, text, text);
