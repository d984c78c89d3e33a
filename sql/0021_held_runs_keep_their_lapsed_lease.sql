-- A run cut short by its worker's stall, and held for what it sent (a vendor call's
-- Retry-After), is still judged lost with its worker by the claim that finds its task due.
--
-- The stall leaves the run open and lapses the lease (sql/0019); the hold puts the task's
-- run_after ahead. A claim in between (a wake-up that came a moment before run_after, by the
-- database's clock) found nothing due, opened no run, and renewed the lease all the same. The
-- claim that then found the task due saw a live lease, took it for a change of hands, and
-- started a new run uncharged: the stall was never charged, and a handler that stalls every
-- time ran for ever, or as often as that race went its way (a test saw 5, 7 and 10 runs where
-- three are due).
--
-- keyway.claim_runs of sql/0019, with its lease update only.
create or replace function keyway.claim_runs(
  p_grp text, p_topics text[], p_keys text[], p_owner text, p_lease_ms int, p_limit int
) returns table (i int, epoch bigint, done_ver bigint, ver bigint, event_id text, type text,
                 payload jsonb, trace jsonb, created_at timestamptz, state text, attempts int,
                 wait_ms double precision, superseded_by bigint, run_opened boolean,
                 suspect boolean)
language plpgsql
as $$
#variable_conflict use_column
declare
  v_epoch bigint;
  v_superseded bigint;
  v_done bigint;
  v_run_ver bigint;
  v_run_state text;
  v_suspect boolean;
  v_lapsed boolean;
  v_due boolean;
  -- Per key claimed (null epoch: not claimed, its start still provisional).
  a_epoch bigint[] := '{}';
  a_done bigint[] := '{}';
  a_superseded bigint[] := '{}';
  a_due boolean[] := '{}';
  a_suspect boolean[] := '{}';
  -- The tasks charged a run lost alone.
  c_topics text[] := '{}';
  c_keys text[] := '{}';
  c_vers bigint[] := '{}';
begin
  for n in 1 .. coalesce(array_length(p_keys, 1), 0) loop
    -- Locked as the update below would lock it; read first, for the run the previous holder
    -- left and its lease.
    select c.done_ver, c.run_ver, c.run_state, c.run_suspect,
           coalesce(c.lease_until, '-infinity')
             <= now() + make_interval(secs => p_lease_ms / 3000.0)
      into v_done, v_run_ver, v_run_state, v_suspect, v_lapsed
      from keyway.consumer_key c
     where c.grp = p_grp and c.topic = p_topics[n] and c.key = p_keys[n]
       and c.baseline_stream_seq is null
       for no key update;
    if not found then
      continue;
    end if;
    -- "Due" as the drain runs it: pending, run_after passed. Anything else (a gap, a retry's
    -- backoff, a dead or skipped task) opens no run.
    v_due := exists (
      select 1 from keyway.inbox y
       where y.grp = p_grp and y.topic = p_topics[n] and y.key = p_keys[n]
         and y.ver = v_done + 1 and y.state = 'pending' and y.run_after <= now());
    if v_due then
      if v_run_ver is distinct from v_done + 1 then
        v_suspect := false; -- a new version's first run
      elsif v_run_state is not null and v_lapsed then
        v_suspect := true;
        if v_run_state = 'alone' then
          c_topics := c_topics || p_topics[n];
          c_keys := c_keys || p_keys[n];
          c_vers := c_vers || (v_done + 1);
        end if;
      end if;
    end if;
    update keyway.consumer_key c
       set epoch = c.epoch + 1, owner = p_owner,
           -- A claim that opens no run (its task held until a Retry-After) leaves a lapsed
           -- lease over a run still open as it was: that is the evidence by which the claim
           -- that finds the task due judges the run lost with its worker.
           lease_until = case
             when not v_due and v_run_state is not null and v_lapsed then c.lease_until
             else now() + make_interval(secs => p_lease_ms / 1000.0)
           end,
           run_ver = case when v_due then v_done + 1 else c.run_ver end,
           run_state = case when v_due then 'open' else c.run_state end,
           run_suspect = case when v_due then v_suspect else c.run_suspect end
     where c.grp = p_grp and c.topic = p_topics[n] and c.key = p_keys[n]
    returning c.epoch, c.superseded_by into v_epoch, v_superseded;
    a_epoch[n] := v_epoch;
    a_superseded[n] := v_superseded;
    a_done[n] := v_done;
    a_due[n] := v_due;
    a_suspect[n] := v_due and v_suspect;
  end loop;
  -- Charged once every key is locked, as keyway.complete_tasks marks its rows (sql/0016): a
  -- task's row updated before the next key is locked could wait on an ingest that holds that
  -- key while it stores the task's version again, and the ingest on the row.
  if array_length(c_keys, 1) > 0 then
    update keyway.inbox y
       set attempts = y.attempts + 1,
           last_error = 'lost with its worker: the process died or froze past its lease while running this task alone'
      from unnest(c_topics, c_keys, c_vers) as c(topic, key, ver)
     where y.grp = p_grp and y.topic = c.topic and y.key = c.key and y.ver = c.ver;
  end if;
  for n in 1 .. coalesce(array_length(p_keys, 1), 0) loop
    continue when a_epoch[n] is null;
    -- The left join keeps one row (with a null version) for a key with nothing to run: the
    -- caller still learns the epoch it claimed.
    return query
    select n, a_epoch[n], a_done[n], x.ver, x.event_id, x.type, x.payload, x.trace,
           x.created_at, x.state, x.attempts,
           extract(epoch from greatest(x.run_after, now()) - now())::float8 * 1000,
           a_superseded[n], a_due[n], a_suspect[n]
      from (select 1) one
      left join lateral (
        select * from keyway.inbox y
         where y.grp = p_grp and y.topic = p_topics[n] and y.key = p_keys[n]
           and y.ver > a_done[n]
         order by y.ver
         limit p_limit
      ) x on true
     order by x.ver;
  end loop;
end
$$;
