-- Ingest no longer stores versions a key has already finished.
--
-- Until now an event at or below its key's done_ver was kept out of the inbox only by its
-- inbox row still being there (ON CONFLICT DO NOTHING). Once retention has deleted that row,
-- a redelivery stores it again, as pending. It never runs (a claim reads only versions above
-- done_ver), but retention never deletes it either (it prunes done and skipped rows), and
-- every such row wakes its key for nothing. Whole-stream redeliveries happen: the keyed
-- consumer makes a deleted durable again from the start of the stream, and the stream keeps
-- a week where the inbox keeps a day. Worse, a version an operator skipped ahead of, whose
-- row retention then deleted, would come back as pending and run.
--
-- Each key's done_ver is read in the loop that already looks each key up (a plain read that
-- waits for nobody, as in 0006), and the insert leaves out what it covers, once the key's
-- start is settled. A provisional start (baseline_stream_seq set: the key was first seen
-- above version 1) is a guess that confirmBaselines lowers when earlier versions turn up,
-- and those are exactly the versions at or below it: they must go in. The read can be
-- stale by a completion still committing; the version it misses then still has its inbox
-- row, and ON CONFLICT keeps it out as before. The filter joins arrays, never a table, so
-- the function's cached generic plan cannot turn it into a scan (0003).
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
  v_settled boolean;
  known_topics text[] := '{}';
  known_keys text[] := '{}';
  known_done bigint[] := '{}';
begin
  -- Sorted, so two ingests that both insert new keys take their locks in the same order.
  for k in
    select i.topic, i.key, min(i.ver) as first_ver,
           (array_agg(i.stream_seq order by i.ver))[1] as first_stream_seq
      from unnest(p_topics, p_keys, p_vers, p_stream_seqs) as i(topic, key, ver, stream_seq)
     group by i.topic, i.key
     order by i.topic, i.key
  loop
    select c.done_ver, c.baseline_stream_seq is null into v_done, v_settled
      from keyway.consumer_key c
     where c.grp = p_grp and c.topic = k.topic and c.key = k.key;
    if found then
      if v_settled then
        known_topics := known_topics || k.topic;
        known_keys := known_keys || k.key;
        known_done := known_done || v_done;
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
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, trace, created_at)
    select p_grp, i.topic, i.key, i.ver, i.event_id, i.type, i.payload, i.trace, i.created_at
      from unnest(p_topics, p_keys, p_vers, p_ids, p_types, p_payloads, p_traces, p_created)
        as i(topic, key, ver, event_id, type, payload, trace, created_at)
     where not exists (
             select 1 from unnest(known_topics, known_keys, known_done) as d(topic, key, done_ver)
              where d.topic = i.topic and d.key = i.key and i.ver <= d.done_ver)
    on conflict do nothing
    returning inbox.topic, inbox.key
  )
  select distinct n.topic, n.key from inserted n;
end
$$;
