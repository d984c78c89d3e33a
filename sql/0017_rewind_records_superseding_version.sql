-- A retry or redrive of an older version tells its handler what had already run after it.
--
-- An operator's retry of a dead task on a `park` topic, or a redrive of a range, rewinds the
-- key below it; the drain runs the rewound tasks and steps over the later ones already done.
-- A handler whose every task carries the key's whole state (the ESL worker: each task is the
-- label's full image) then put the older state back over the newer one, for good: retrying
-- the dead tasks of an AIMS outage left labels showing the price of before a later change.
--
-- The rewind now records, per key, the newest version done above the tasks it rewound
-- (superseded_by); the claim returns it, and the handler sees it on each rewound task below
-- it (KeyedEvent.supersededBy). Each rewind works it out afresh (libs/keyed-consumer
-- create-consumer-admin.ts). Recorded by the admin action once, not by every completion: the
-- drain's hot path writes nothing more.
--
-- Upgrade order: a rewind made by the previous release's admin CLI records nothing, and a
-- worker of that release tells its handlers nothing. Retry or redrive topics whose tasks carry
-- a key's whole state (esl.label) once the workers and the admin CLI run this release.

alter table keyway.consumer_key add column superseded_by bigint;

-- The claim's rows gain one column, which changes the function's type: made anew. Workers of
-- the previous release read the columns they know by name and ignore this one. A claim a
-- worker had prepared fails once when this lands ("cached plan must not change result
-- type"), and is prepared afresh (libs/db PreparingClient); the key is claimed again at the
-- next wake-up or poll.
drop function keyway.claim_keys(text, text[], text[], text, int, int);

create function keyway.claim_keys(
  p_grp text, p_topics text[], p_keys text[], p_owner text, p_lease_ms int, p_limit int
) returns table (i int, epoch bigint, done_ver bigint, ver bigint, event_id text, type text,
                 payload jsonb, trace jsonb, created_at timestamptz, state text, attempts int,
                 wait_ms double precision, superseded_by bigint)
language plpgsql
as $$
#variable_conflict use_column
declare
  v_epoch bigint;
  v_done bigint;
  v_superseded bigint;
begin
  for n in 1 .. coalesce(array_length(p_keys, 1), 0) loop
    update keyway.consumer_key c
       set epoch = c.epoch + 1, owner = p_owner,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0)
     where c.grp = p_grp and c.topic = p_topics[n] and c.key = p_keys[n]
       and c.baseline_stream_seq is null
    returning c.epoch, c.done_ver, c.superseded_by into v_epoch, v_done, v_superseded;
    if found then
      -- The left join keeps one row (with a null version) for a key with nothing to run:
      -- the caller still learns the epoch it claimed.
      return query
      select n, v_epoch, v_done, x.ver, x.event_id, x.type, x.payload, x.trace, x.created_at,
             x.state, x.attempts,
             extract(epoch from greatest(x.run_after, now()) - now())::float8 * 1000,
             v_superseded
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
