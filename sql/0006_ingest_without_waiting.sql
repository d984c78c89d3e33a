-- Ingest no longer waits for the group's handlers, for events it has not seen before.
--
-- 0003's ingest recorded first-seen keys with INSERT ... ON CONFLICT DO NOTHING for every key
-- of the batch. A key that is being drained has its consumer_key row updated (claim,
-- completion) by a transaction still open, and ON CONFLICT checks the unique index with a
-- dirty snapshot: it sees that uncommitted row version and waits for its transaction to end.
-- So each ingest waited behind handler transactions of its keys. Sampled from
-- pg_stat_activity during `just bench pipeline`: ingest was the most frequent waiter
-- (Lock:transactionid), and pg_stat_statements put it at 4.6 ms a call for about 13 events,
-- mostly waiting: more time than every other statement together. With this version 0.66 ms
-- a call, and the benchmark's published-to-inbox p99 went from 27-37 ms to 15-18 ms.
--
-- Now each key of the batch is looked up first (a plain read sees the last committed row
-- and waits for nobody), and only a key not there goes to the INSERT. Nothing deletes
-- consumer_key rows, so the usual case, a known key, takes no lock. Two workers that see a
-- new key at once still meet in ON CONFLICT, which keeps the first: the same result as
-- before. A primary-key lookup per key rather than an anti-join, for the reason 0003 gives:
-- a cached generic plan cannot turn it into a scan of every key.
--
-- A redelivered event can still wait: its inbox row exists, and while a handler transaction
-- is updating that row the inbox insert's ON CONFLICT cannot decide until it ends. Only
-- redeliveries (ack_wait passed, a worker restarted) meet this, and they are rare.
create or replace function keyway.ingest(
  p_grp text, p_topics text[], p_keys text[], p_vers bigint[], p_ids text[], p_types text[],
  p_payloads jsonb[], p_traces jsonb[], p_created timestamptz[], p_stream_seqs bigint[]
) returns table (topic text, key text)
language plpgsql
as $$
#variable_conflict use_column
declare
  k record;
begin
  return query
  with inserted as (
    insert into keyway.inbox (grp, topic, key, ver, event_id, type, payload, trace, created_at)
    select p_grp, i.topic, i.key, i.ver, i.event_id, i.type, i.payload, i.trace, i.created_at
      from unnest(p_topics, p_keys, p_vers, p_ids, p_types, p_payloads, p_traces, p_created)
        as i(topic, key, ver, event_id, type, payload, trace, created_at)
    on conflict do nothing
    returning inbox.topic, inbox.key
  )
  select distinct n.topic, n.key from inserted n;

  -- Sorted, so two ingests that both insert new keys take their locks in the same order.
  for k in
    select i.topic, i.key, min(i.ver) as first_ver,
           (array_agg(i.stream_seq order by i.ver))[1] as first_stream_seq
      from unnest(p_topics, p_keys, p_vers, p_stream_seqs) as i(topic, key, ver, stream_seq)
     group by i.topic, i.key
     order by i.topic, i.key
  loop
    perform 1 from keyway.consumer_key c
     where c.grp = p_grp and c.topic = k.topic and c.key = k.key;
    if not found then
      insert into keyway.consumer_key (grp, topic, key, done_ver, baseline_stream_seq)
      values (p_grp, k.topic, k.key, k.first_ver - 1,
              case when k.first_ver = 1 then null else k.first_stream_seq end)
      on conflict do nothing;
    end if;
  end loop;
end
$$;
