-- The transactional outbox (DESIGN.md §3).
--
-- Writers add rows here inside their own transaction through keyway.enqueue(); the relay
-- publishes rows whose published_at is null. The relay never keeps a cursor over seq:
-- seq values are taken before commit, so transactions commit out of seq order, and a
-- `seq > last_seen` cursor skips rows that commit late (the bug Watermill #311, Emmett #336
-- and others shipped). Rows are claimed by state instead.

create schema if not exists keyway;

-- One global sequence per site. It orders events, it does not promise commit order.
create sequence keyway.outbox_seq as bigint;

-- The per-key version counter. Updating a key's row takes its row lock until commit, which
-- serialises writers of the same key only: within a key, version order is commit order and
-- versions have no gaps (a rolled-back bump rolls back with its events).
create table keyway.outbox_key_head (
  topic text   not null,
  key   text   not null,
  ver   bigint not null,
  primary key (topic, key)
);

create table keyway.outbox (
  seq          bigint      primary key,
  topic        text        not null,
  key          text        not null,
  ver          bigint      not null,
  type         text        not null,
  payload      jsonb       not null,
  -- W3C trace context of the writer's span: {"traceparent": …, "tracestate": …}
  trace        jsonb,
  -- Transaction id, for catch-up readers that filter on xid < pg_snapshot_xmin(pg_current_snapshot()).
  xid          xid8        not null default pg_current_xact_id(),
  created_at   timestamptz not null default clock_timestamp(),
  published_at timestamptz,
  stream_seq   bigint,
  unique (topic, key, ver)
);

-- The relay's claim query walks this small partial index: it only holds the backlog.
create index outbox_unpublished_idx on keyway.outbox (seq) where published_at is null;
-- Retention deletes walk published rows by age.
create index outbox_published_idx on keyway.outbox (published_at) where published_at is not null;

-- enqueue(events) adds events given as a JSON array of {topic, key, type, payload, trace}.
-- Returns one (seq, ver) row per event, in no particular order: the event at position i of
-- the array holds the i-th smallest seq.
--
-- Two steps, in this order, are the point of the function:
-- 1. Bump every key head the batch touches, in sorted (topic, key) order so that two
--    writers locking overlapping keys never wait on each other in a cycle.
-- 2. Only then take the seqs. A writer that took its seq first and then waited on a key
--    lock would end up with a higher version but a lower seq than the writer it waited
--    for, and within a key seq order must equal version order.
-- Several events of one key get consecutive versions in array order.
create function keyway.enqueue(events jsonb)
returns table (seq bigint, ver bigint)
language plpgsql
as $$
declare
  heads jsonb;
  seqs  bigint[];
  n     int := jsonb_array_length(events);
begin
  with wanted as (
    select e.topic, e.key, count(*) as n
    from jsonb_to_recordset(events) as e(topic text, key text)
    group by e.topic, e.key
    order by e.topic, e.key
  ),
  bumped as (
    insert into keyway.outbox_key_head as h (topic, key, ver)
    select w.topic, w.key, w.n from wanted w order by w.topic, w.key
    on conflict (topic, key) do update set ver = h.ver + excluded.ver
    returning h.topic, h.key, h.ver
  )
  select jsonb_object_agg(b.topic || chr(31) || b.key, b.ver) into heads from bumped b;

  -- nextval() hands out increasing values; sorting them lets event i take the i-th smallest.
  select array_agg(s order by s) into seqs
  from (select nextval('keyway.outbox_seq') as s from generate_series(1, n)) x;

  return query
  insert into keyway.outbox as o (seq, topic, key, ver, type, payload, trace)
  select seqs[i.ord],
         i.topic,
         i.key,
         (heads ->> (i.topic || chr(31) || i.key))::bigint - i.cnt + i.idx,
         i.type,
         i.payload,
         i.trace
  from (
    select e.*,
           row_number() over (partition by e.topic, e.key order by e.ord) as idx,
           count(*) over (partition by e.topic, e.key) as cnt
    from rows from (
      jsonb_to_recordset(events) as (topic text, key text, type text, payload jsonb, trace jsonb)
    ) with ordinality as e(topic, key, type, payload, trace, ord)
  ) i
  returning o.seq, o.ver;
end
$$;

-- Wake the relay. NOTIFY is delivered at commit and coalesced within a transaction, so a
-- statement-level trigger costs one notification per transaction whatever the batch size,
-- and no writer can forget it.
create function keyway.outbox_notify() returns trigger
language plpgsql
as $$
begin
  perform pg_notify('keyway_outbox', '');
  return null;
end
$$;

create trigger outbox_notify
after insert on keyway.outbox
for each statement execute function keyway.outbox_notify();
