-- A completion could deadlock with an ingest, through an inbox row.
--
-- A redelivered event's row is already in the inbox, and a completion may be marking it done.
-- The ingest's unique check (ON CONFLICT DO NOTHING) waits for that completion's transaction,
-- and by then keyway.ingest() holds the keys its first loop locked (FOR NO KEY UPDATE, where a
-- version may be stored dead or the key is provisional). keyway.complete_tasks() went key
-- after key, the key's row and then its inbox row: having marked the redelivered row, it went
-- on to a key the ingest held and waited for the ingest, which waited for it (40P01: a
-- deadlock_timeout's stall and a retry, counted as an attempt by a completion of one task).
--
-- Now a completion locks all its keys (byte order, as the worker sorts them and as ingest
-- locks them) before it marks any inbox row. Once it has marked one it waits for no key, so an
-- ingest waiting on that row waits for a transaction that does not wait for it. The same
-- statements as before, in another order; keyway.complete_tasks() keeps its signature and its
-- results. markFailed and the inbox's retention already take the key before the row.
--
-- Leaving the inbox's existing rows out of the ingest instead (a NOT EXISTS probe) was
-- measured and dropped: its plan, cached in a worker's session from when the inbox was
-- empty, scanned the whole inbox for every batch (pgbench: 28 batches/s against 500).

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
       set done_ver = p_vers[n], gap_since = null,
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
