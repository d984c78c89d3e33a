-- A version that arrives below where its key started is listed as dead, not dropped unseen.
--
-- A key first seen above version 1 gets a provisional start, settled once the group's ack
-- floor has passed the message it was first seen in (confirmBaselines): every earlier
-- version the stream held in order before it has been delivered by then. Since 0007, ingest
-- leaves out every version at or below a settled key's done_ver, which is right for what
-- ran (a redelivery after retention took its row) and wrong for what never did. A version
-- below the start can still come after it was settled: nats-server 2.9.10 may lose messages
-- it acked when its host stops uncleanly, and the relay publishes them again after later
-- versions of their key (relay-sql.ts unmarkRecent). Such a version was dropped and acked
-- with no trace: no gap, no dead task, no reject.
--
-- start_ver records where the key started: versions at or below it never ran in this
-- group. Ingest stores one that arrives as dead, with the reason, so it is listed, counted
-- (consumer_dead_tasks) and left to an operator: retry would run it and walk the key forward
-- again over what ran since. Versions between start_ver and done_ver ran, and are still
-- left out. Keys settled before this migration start at 0: nothing is known of them.
alter table keyway.consumer_key add column start_ver bigint not null default 0;

create or replace function keyway.ingest(
  p_grp text, p_topics text[], p_keys text[], p_vers bigint[], p_ids text[], p_types text[],
  p_payloads jsonb[], p_traces jsonb[], p_created timestamptz[], p_stream_seqs bigint[]
) returns table (topic text, key text)
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
begin
  -- Sorted, so two ingests that both insert new keys take their locks in the same order.
  for k in
    select i.topic, i.key, min(i.ver) as first_ver,
           (array_agg(i.stream_seq order by i.ver))[1] as first_stream_seq
      from unnest(p_topics, p_keys, p_vers, p_stream_seqs) as i(topic, key, ver, stream_seq)
     group by i.topic, i.key
     order by i.topic, i.key
  loop
    select c.done_ver, c.start_ver, c.baseline_stream_seq is null
      into v_done, v_start, v_settled
      from keyway.consumer_key c
     where c.grp = p_grp and c.topic = k.topic and c.key = k.key;
    if found then
      if v_settled then
        known_topics := known_topics || k.topic;
        known_keys := known_keys || k.key;
        known_done := known_done || v_done;
        known_start := known_start || v_start;
      end if;
    else
      -- A new key starts below the lowest version of this batch: nothing to leave out.
      insert into keyway.consumer_key (grp, topic, key, done_ver, baseline_stream_seq)
      values (p_grp, k.topic, k.key, k.first_ver - 1,
              case when k.first_ver = 1 then null else k.first_stream_seq end)
      on conflict do nothing;
    end if;
  end loop;

  return query
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
    on conflict do nothing
    returning inbox.topic, inbox.key
  )
  select distinct n.topic, n.key from inserted n;
end
$$;
