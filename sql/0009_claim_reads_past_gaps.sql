-- A claim reads a key's next p_limit versions, not the versions in (done_ver, done_ver +
-- p_limit]. The drain sees a gap only when a later version comes back next to the missing
-- one; with a window of version numbers, a key whose missing version sat at the window's
-- last place (v32 missing, v33 present, 32 per read) came back with nothing after it, and
-- the drain ended without marking the gap: the metric of invariant 5 never counted it.
-- Reading the next rows whatever their numbers brings the later version into the same read.
-- (The drain's follow-up reads, nextTasks in inbox-sql.ts, read the same way.)
create or replace function keyway.claim_keys(
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
      -- The left join keeps one row (with a null version) for a key with nothing to run:
      -- the caller still learns the epoch it claimed.
      return query
      select n, v_epoch, v_done, x.ver, x.event_id, x.type, x.payload, x.trace, x.created_at,
             x.state, x.attempts,
             extract(epoch from greatest(x.run_after, now()) - now())::float8 * 1000
        from (select 1) one
        left join lateral (
          select * from keyway.inbox y
           where y.grp = p_grp and y.topic = p_topics[n] and y.key = p_keys[n]
             and y.ver > v_done
           order by y.ver
           limit p_limit
        ) x on true
       order by x.ver;
    end if;
  end loop;
end
$$;
