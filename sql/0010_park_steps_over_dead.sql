-- Policy park, after an operator retries or redrives part of a key (DESIGN.md §5).
--
-- A task that dies on a `park` topic stays dead, listed for an operator, and its key moves on.
-- When the operator later retries an earlier version, the key is rewound below that dead
-- task, and the drain walks forward again over what it had finished. It used to stop at the
-- dead task as if the topic's policy were `block`; the key then held every later version
-- until an operator acted a second time.
--
-- The worker steps over such a task because it knows the topic's policy; Postgres does not,
-- so the worker passes it to every query that asks whether a key has something to run:
-- p_park_default is the policy of topics without one of their own, p_park_except the
-- topics whose policy differs from it. `(topic = any(p_park_except)) <> p_park_default` is
-- then true exactly for the topics whose dead tasks are stepped over.

-- Stepping over a dead task goes through the same completion as stepping over a skipped
-- one, and must leave it dead: still listed and counted, still retryable. It did not run, so
-- it gains no attempt and no done_at (retention leaves dead rows alone either way).
create or replace function keyway.complete_tasks(
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
    end if;
  end loop;
end
$$;

-- The re-check after a drain, now told which topics park. The three-argument form stays for
-- workers of the previous release during a rolling upgrade; nothing of this release calls it.
create function keyway.runnable_keys_of(
  p_grp text, p_topics text[], p_keys text[], p_park_default boolean, p_park_except text[]
) returns setof int
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
         and (state <> 'dead' or (topic = any(p_park_except)) <> p_park_default)
         and run_after <= now()) then
      return next n;
    end if;
  end loop;
end
$$;
