-- Ingest dates a gap it stores the far side of (consumer_key.gap_since), as a drain does.
--
-- gap_since was written only by a drain that read a later version beside the missing one. The
-- polling loop, the recovery loop and a drain's re-check all look for a task at the version
-- after done_ver, so none of them starts a drain on a key whose gap is there from the start:
-- a wake-up that found the key's lock held by another worker (whose drain then ended with
-- nothing runnable), a worker killed between its ingest's commit and the wake-up. The key
-- waited, rightly, but keyway_consumer_gap_keys and the oldest gap's age (DESIGN.md
-- invariant 5) did not count it, and the alert on them never fired. Only `admin gaps`, which
-- reads every key, listed it.
--
-- The cost is on keys whose version after done_ver is not in this batch: one index probe of
-- the inbox each (under a backlog, most of them; the version is usually there already), and
-- an update only where the gap is real. `BENCH_DIAG=1 BENCH_ONLY=keyway just bench pipeline`:
-- inbox index scans per event 6.45-6.64 before, 7.12 after; throughput within the run-to-run
-- noise (627-829 events/s).
--
-- The rest of the function is sql/0018's, unchanged.

create or replace function keyway.ingest(
  p_grp text, p_topics text[], p_keys text[], p_vers bigint[], p_ids text[], p_types text[],
  p_payloads jsonb[], p_traces jsonb[], p_created timestamptz[], p_stream_seqs bigint[]
) returns table (topic text, key text, collided_stream_seq bigint, reason text)
language plpgsql
as $$
#variable_conflict use_column
declare
  k record;
  v_done bigint;
  v_start bigint;
  v_settled boolean;
  known_topics text[] := '{}';
  known_keys text[] := '{}';
  known_done bigint[] := '{}';
  known_start bigint[] := '{}';
  stored_topics text[];
  stored_keys text[];
  stored_vers bigint[];
  stored_ids text[];
begin
  -- Sorted, so two ingests that both insert new keys take their locks in the same order; in
  -- byte order (collate "C"), the order the admin actions, the drain's claims and completions
  -- and the settling lock keys in, so that the locks below never meet theirs in a cycle. The
  -- database's own collation can differ (en_US in the compose image: 'a' < 'B' there, 'B' <
  -- 'a' in C).
  for k in
    select i.topic, i.key, min(i.ver) as first_ver,
           (array_agg(i.stream_seq order by i.ver))[1] as first_stream_seq
      from unnest(p_topics, p_keys, p_vers, p_stream_seqs) as i(topic, key, ver, stream_seq)
     group by i.topic, i.key
     order by i.topic collate "C", i.key collate "C"
  loop
    select c.done_ver, c.start_ver, c.baseline_stream_seq is null
      into v_done, v_start, v_settled
      from keyway.consumer_key c
     where c.grp = p_grp and c.topic = k.topic and c.key = k.key;
    if not found then
      -- A new key starts below the lowest version of this batch: nothing to leave out.
      insert into keyway.consumer_key (grp, topic, key, done_ver, baseline_stream_seq)
      values (p_grp, k.topic, k.key, k.first_ver - 1,
              case when k.first_ver = 1 then null else k.first_stream_seq end)
      on conflict do nothing;
      if found then
        continue;
      end if;
      -- Made meanwhile by another ingest, now committed: read below, as a provisional key.
      v_settled := false;
    end if;
    -- Read again, locked, where this batch may store a version dead: the dead-task count's
    -- trigger (sql/0005) then updates the key row in the insert below, out of this loop's
    -- order, and two ingests holding a weaker lock on one key each waited for the other to
    -- give it up (40P01). Locked here, in byte order, at the strength that update takes (FOR
    -- NO KEY UPDATE), the trigger needs no lock it does not hold.
    if not v_settled then
      -- Provisional: the settling's lock on the key waits for this one, so this batch's
      -- versions are in the inbox when it reads them; or, if it settled the key first, this
      -- waits for that and reads the settled start.
      select c.done_ver, c.start_ver, c.baseline_stream_seq is null
        into v_done, v_start, v_settled
        from keyway.consumer_key c
       where c.grp = p_grp and c.topic = k.topic and c.key = k.key
         for no key update;
    elsif k.first_ver <= v_start then
      -- Settled, with a version at or below where it started: stored dead below. Rare (a
      -- re-publish after NATS lost messages), so the wait on a completion in flight that
      -- this lock may meet (sql/0006's reason for reading unlocked) is too.
      select c.done_ver, c.start_ver, c.baseline_stream_seq is null
        into v_done, v_start, v_settled
        from keyway.consumer_key c
       where c.grp = p_grp and c.topic = k.topic and c.key = k.key
         for no key update;
    end if;
    if v_settled then
      known_topics := known_topics || k.topic;
      known_keys := known_keys || k.key;
      known_done := known_done || v_done;
      known_start := known_start || v_start;
    end if;
  end loop;

  with inserted as (
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, trace, created_at,
                              state, last_error)
    select p_grp, i.topic, i.key, i.ver, i.event_id, i.type, i.payload, i.trace, i.created_at,
           case when i.ver <= d.start_ver then 'dead' else 'pending' end,
           case when i.ver <= d.start_ver then
             format('arrived after its key had started above it (at v%s): never run here',
                    d.start_ver + 1)
           end
      from unnest(p_topics, p_keys, p_vers, p_ids, p_types, p_payloads, p_traces, p_created)
        as i(topic, key, ver, event_id, type, payload, trace, created_at)
      left join unnest(known_topics, known_keys, known_done, known_start)
        as d(topic, key, done_ver, start_ver)
        on d.topic = i.topic and d.key = i.key
     where d.done_ver is null or i.ver > d.done_ver or i.ver <= d.start_ver
     -- In byte order, as every other statement locks keys and as a skip writes its
     -- placeholders (ascending versions): see the head of sql/0018.
     order by i.topic collate "C", i.key collate "C", i.ver
    on conflict do nothing
    returning inbox.topic, inbox.key, inbox.ver, inbox.event_id
  )
  select coalesce(array_agg(n.topic), '{}'), coalesce(array_agg(n.key), '{}'),
         coalesce(array_agg(n.ver), '{}'), coalesce(array_agg(n.event_id), '{}')
    into stored_topics, stored_keys, stored_vers, stored_ids
    from inserted n;

  -- A settled key this batch stored a version of above the one after done_ver, while that one
  -- is not in the inbox: a gap, dated now. Found from the batch's own keys, one index probe
  -- each. Each dated one by one,
  -- skip locked, so it waits for nothing and takes no lock out of the order the loop above
  -- took its own in: a key locked now is in a claim or a completion, and the drain that holds
  -- it dates a gap it meets itself. Rechecked on the row as it is: done_ver read above is
  -- unlocked, and may be behind (the version after it done and pruned since).
  for k in
    select d.topic, d.key
      from unnest(known_topics, known_keys, known_done) as d(topic, key, done_ver)
      join (select s.topic, s.key, min(s.ver) as lowest
              from unnest(stored_topics, stored_keys, stored_vers) as s(topic, key, ver)
             group by s.topic, s.key) s
        on s.topic = d.topic and s.key = d.key
     -- Not where the batch brings the version after done_ver itself: a steady flow, drained
     -- as it comes, costs no probe.
     where s.lowest > d.done_ver + 1
       -- A scalar subquery, probed per key: as `not exists`, the planner made it an anti-join
       -- hashing every inbox row of the group, at every batch.
       and (select y.ver from keyway.inbox y
             where y.grp = p_grp and y.topic = d.topic and y.key = d.key
               and y.ver = d.done_ver + 1) is null
     order by d.topic collate "C", d.key collate "C"
  loop
    update keyway.consumer_key c
       set gap_since = now()
     where c.ctid = (select c2.ctid from keyway.consumer_key c2
                      where c2.grp = p_grp and c2.topic = k.topic and c2.key = k.key
                        and c2.gap_since is null
                        for no key update skip locked)
       and not exists (select 1 from keyway.inbox y
                        where y.grp = c.grp and y.topic = c.topic and y.key = c.key
                          and y.ver = c.done_ver + 1);
  end loop;

  return query
  select distinct s.topic, s.key, null::bigint, null::text
    from unnest(stored_topics, stored_keys) as s(topic, key);

  if cardinality(stored_vers) = cardinality(p_vers) then
    return;
  end if;
  -- What was not stored: a redelivery, a version left out at or below done_ver, or a
  -- collision. Read after the insert, so an event that meets another of its own batch is
  -- caught too (an event stored here is matched by its id as well as its place: a second,
  -- different event at the same place is not). The two conflicts are looked up apart, each
  -- by its own unique index.
  return query
  with unstored as (
    select i.topic, i.key, i.ver, i.event_id, i.stream_seq
      from unnest(p_topics, p_keys, p_vers, p_ids, p_stream_seqs)
        as i(topic, key, ver, event_id, stream_seq)
     where (i.topic, i.key, i.ver, i.event_id) not in (
             select s.topic, s.key, s.ver, s.event_id
               from unnest(stored_topics, stored_keys, stored_vers, stored_ids)
                 as s(topic, key, ver, event_id))
  )
  select u.topic, u.key, u.stream_seq,
         format('v%s of %s/%s is already held by another event, %s, and this is %s: two outboxes publishing this topic into one stream, or an outbox restored from a backup?',
                u.ver, u.topic, u.key, x.event_id, u.event_id)
    from unstored u
    join keyway.inbox x
      on x.grp = p_grp and x.topic = u.topic and x.key = u.key and x.ver = u.ver
   where x.event_id <> u.event_id
     -- An operator's skip of the version while it was missing: the event is the one the
     -- skip gave up on, come late, and is left out as the skip said.
     and x.type <> 'keyway.skipped'
  union all
  select u.topic, u.key, u.stream_seq,
         format('event id %s is already held by v%s of %s/%s, and this is v%s of %s/%s: an outbox restored from a backup, giving out its ids again?',
                u.event_id, x.ver, x.topic, x.key, u.ver, u.topic, u.key)
    from unstored u
    join keyway.inbox x on x.grp = p_grp and x.event_id = u.event_id
   where (x.topic, x.key, x.ver) <> (u.topic, u.key, u.ver);
end
$$;
