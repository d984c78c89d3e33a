-- A run lost with its worker is charged to its task, once the task is known to be the cause.
--
-- Attempts were counted only when a run ended: markFailed, or done. A payload that kills its
-- worker (an out-of-memory abort, a native crash, an event loop blocked past the lease) ended
-- no run. Its task stayed pending with its attempts at 0, the recovery loop handed it to the
-- next worker, which died in turn: the key never moved, and every worker of the group was
-- taken down once per lease length, with every other key's task in flight on it.
--
-- A claim of a key whose next task is due opens a run of that task (run_ver, run_state
-- 'open'), and every end the worker sees closes it: done (the key moves on), a failure
-- (markFailed), or the drain closing it (setRunState) because it never started or was cut short
-- by stop(). A run cut short by the loss of the key is left to the claim that took the key
-- over. A claim that finds the run before it still open asks whether its worker is alive: one
-- that renews its lease every third of it shows more than a third left. If so, the key only
-- changed hands, which costs no attempt. If not, the run was lost with its worker, dead or
-- frozen.
--
-- Whose fault a death was is not known: every task in flight on that worker lost its run. So
-- a lost run makes its task a suspect (run_suspect), and a suspect runs alone in its worker
-- (libs/keyed-consumer internal/run-gate.ts), marked 'alone' when it starts. A run lost while
-- alone was the cause, and is charged as an attempt, with the reason: the task's attempts
-- reach the topic's maximum, and the worker makes it dead instead of running it again. The
-- tasks in flight beside a killer, or waiting behind it, become suspects, never charged. A
-- suspect stays one until its version is done or an operator retries it.
-- A killer is dead after maxAttempts + 1 deaths (the first one, among others, is not its own),
-- or + 2 when it first ran after another task of its key in the same drain: only the first
-- task a claim finds opens a run (the drain's later ones would cost a write each).
--
-- "Less than a third left" holds for a worker that died before its first heartbeat as long
-- as its claim answered within a third of the lease: the Redis lock, which the next worker
-- must wait out, runs from before the claim and the lease from the claim.
--
-- A function of its own, keyway.claim_runs: a worker of the previous release calls
-- keyway.claim_keys, which is left as it was and opens no run, so workers can be upgraded one
-- by one. Upgrade order: this migration, then the workers and the admin CLI. In between, an
-- older CLI's retry leaves the suspect flag (the task runs alone), and a task that a new worker
-- lost to an old one, which failed it, may be charged a lost run beside that failure: an old
-- worker's markFailed leaves the run's state as it was.
--
-- The three columns live on consumer_key, which the claim updates anyway (fillfactor 50 keeps
-- the update HOT): the hot path gains a read of the key's row and a probe of the inbox row the
-- claim then reads; the charge is an update of the inbox row on the rare path only.
alter table keyway.consumer_key
  add column run_ver bigint,
  add column run_state text check (run_state in ('open', 'alone')),
  add column run_suspect boolean not null default false;

-- keyway.claim_keys (sql/0017), and the runs it opens.
create function keyway.claim_runs(
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
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0),
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

-- Done ends the run as well: the run's state no longer outlives the task, and a rewind to it
-- (an operator's redrive) finds no run left open. keyway.complete_tasks of sql/0016, with
-- run_state in the update it makes anyway.
create or replace function keyway.complete_tasks(
  p_grp text, p_topics text[], p_keys text[], p_vers bigint[], p_epochs bigint[],
  p_lease_ms int
) returns setof int
language plpgsql
as $$
declare
  advanced int[] := '{}';
  n int;
begin
  for n in 1 .. coalesce(array_length(p_keys, 1), 0) loop
    update keyway.consumer_key
       set done_ver = p_vers[n], gap_since = null, run_state = null,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0)
     where grp = p_grp and topic = p_topics[n] and key = p_keys[n]
       and epoch = p_epochs[n] and done_ver = p_vers[n] - 1;
    if found then
      advanced := advanced || n;
    end if;
  end loop;
  -- Stepping over a dead or skipped task leaves it as it is (sql/0010).
  foreach n in array advanced loop
    update keyway.inbox
       set state = case when state in ('skipped', 'dead') then state else 'done' end,
           done_at = case when state = 'dead' then done_at else coalesce(done_at, now()) end,
           attempts = attempts + case when state = 'pending' then 1 else 0 end
     where grp = p_grp and topic = p_topics[n] and key = p_keys[n] and ver = p_vers[n];
    if not found then
      -- The worker completes only tasks it read; without the row the key must not move.
      raise exception 'keyway.complete_tasks: %/% has no inbox row v%',
        p_topics[n], p_keys[n], p_vers[n];
    end if;
    return next n;
  end loop;
end
$$;
