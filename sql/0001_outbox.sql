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
  stream_seq   bigint
  -- No unique (topic, key, ver): keyway.enqueue() is the only writer and the key-head row
  -- lock makes versions unique; the extra index cost writers about 3% (bench relay).
);

-- The relay's claim query walks this small partial index: it only holds the backlog.
create index outbox_unpublished_idx on keyway.outbox (seq) where published_at is null;
-- Retention deletes walk published rows by age.
create index outbox_published_idx on keyway.outbox (published_at) where published_at is not null;

-- enqueue() adds a batch of events. The caller (libs/outbox enqueue.ts) passes them as
-- parallel arrays, with the distinct (topic, key) pairs of the batch sorted, and for each
-- event the 1-based index of its pair and its 1-based position among the events of that pair.
-- Returns one seq per event, in input order.
--
-- Two steps, in this order, are the point of the function:
-- 1. Bump every key head the batch touches, in sorted (topic, key) order so that two
--    writers locking overlapping keys never wait on each other in a cycle.
-- 2. Only then take the seqs. A writer that took its seq first and then waited on a key
--    lock would end up with a higher version but a lower seq than the writer it waited
--    for, and within a key seq order must equal version order.
-- Several events of one key get consecutive versions in input order.
create function keyway.enqueue(
  pair_topics text[],   -- distinct pairs, sorted
  pair_keys   text[],
  pair_counts int[],    -- events per pair
  pair_of     int[],    -- per event: index into the pair arrays
  nth         int[],    -- per event: position among its pair's events
  types       text[],
  payloads    jsonb[],
  trace       jsonb
)
returns table (seq bigint, ver bigint)
language plpgsql
as $$
declare
  heads bigint[];
  seqs  bigint[];
  v_ver bigint;
begin
  -- One event, the common case, without the array plumbing: the same two steps as plain
  -- statements. Measured (8 writers, one event per transaction): 45% -> 52% of bare writer
  -- commits. The key-head upsert alone costs about a third of bare.
  if cardinality(types) = 1 then
    insert into keyway.outbox_key_head as h (topic, key, ver)
    values (pair_topics[1], pair_keys[1], 1)
    on conflict (topic, key) do update set ver = h.ver + 1
    returning h.ver into v_ver;
    if (select listening from keyway.relay_state where id = 1) then
      perform pg_notify('keyway_outbox', '');
    end if;
    return query
    insert into keyway.outbox as o (seq, topic, key, ver, type, payload, trace)
    values (nextval('keyway.outbox_seq'), pair_topics[1], pair_keys[1], v_ver, types[1],
            payloads[1], trace)
    returning o.seq, o.ver;
    return;
  end if;

  -- The pairs arrive sorted, and an INSERT takes its rows' locks in input order.
  with bumped as (
    insert into keyway.outbox_key_head as h (topic, key, ver)
    select * from unnest(pair_topics, pair_keys, pair_counts)
    on conflict (topic, key) do update set ver = h.ver + excluded.ver
    returning h.topic, h.key, h.ver
  )
  select array_agg(b.ver order by p.i) into heads
  from unnest(pair_topics, pair_keys) with ordinality as p(topic, key, i)
  join bumped b on b.topic = p.topic and b.key = p.key;

  -- nextval() hands out increasing values; sorting them lets event i take the i-th smallest.
  select array_agg(s.v order by s.v) into seqs
  from (select nextval('keyway.outbox_seq') as v from generate_series(1, cardinality(types))) s;

  -- Postgres coalesces a transaction's identical notifications and delivers them at commit.
  if (select listening from keyway.relay_state where id = 1) then
    perform pg_notify('keyway_outbox', '');
  end if;

  return query
  insert into keyway.outbox as o (seq, topic, key, ver, type, payload, trace)
  select seqs[e.i],
         pair_topics[e.pair],
         pair_keys[e.pair],
         heads[e.pair] - pair_counts[e.pair] + e.nth,
         e.type,
         e.payload,
         trace
  from unnest(pair_of, nth, types, payloads) with ordinality as e(pair, nth, type, payload, i)
  returning o.seq, o.ver;
end
$$;

-- Waking the relay. NOTIFY costs writers dearly: Postgres serialises the commits of all
-- transactions that NOTIFY on one queue lock held through the WAL flush, which defeats group
-- commit (measured here: bare commits fell by about a third with one NOTIFY per transaction).
-- And under load it is useless: a busy relay claims again as soon as a batch is done.
-- So the relay says when it is listening (asleep, waiting for a NOTIFY), and only then does
-- keyway.enqueue() notify. The flag is read, never written, by writers: one index lookup and
-- no contention. The check lives in keyway.enqueue(), the one way rows get in.
create table keyway.relay_state (
  id   int     primary key default 1 check (id = 1),
  listening boolean not null
);
-- No relay has started: nobody listens. A relay polls when it starts, so nothing waits.
insert into keyway.relay_state values (1, false);

