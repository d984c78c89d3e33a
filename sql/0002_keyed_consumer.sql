-- Keyed consumers (DESIGN.md §5): the inbox of each consumer group and its per-key state.
--
-- Several consumer groups may share a database; `grp` names the group (normally the durable
-- consumer's name). Every statement the library runs is scoped by it.

-- One row per event a group ingested. The per-key version, not the order JetStream
-- delivered in, decides when an event runs: JetStream redelivers, delivers batches to
-- several workers at once, and a sourced stream interleaves origins.
create table keyway.inbox (
  grp         text        not null,
  topic       text        not null,
  key         text        not null,
  ver         bigint      not null,
  -- `<site>:<seq>`. Unique per group: a redelivered or re-published event is dropped at
  -- ingest (on conflict do nothing), which is what makes at-least-once delivery harmless.
  event_id    text        not null,
  type        text        not null,
  payload     jsonb       not null,
  trace       jsonb,
  created_at  timestamptz not null,            -- the writer's insert, from the envelope
  received_at timestamptz not null default now(),
  -- pending → done, or pending → dead (attempts exhausted, or poison), or dead → pending
  -- (an operator's retry), or pending/dead → skipped (an operator's skip).
  state       text        not null default 'pending'
              check (state in ('pending', 'done', 'dead', 'skipped')),
  attempts    int         not null default 0,
  run_after   timestamptz not null default '-infinity',
  last_error  text,
  done_at     timestamptz,
  primary key (grp, topic, key, ver),
  unique (grp, event_id)
);

-- Retention deletes finished rows by age.
create index inbox_finished_idx on keyway.inbox (grp, done_at) where state in ('done', 'skipped');
-- Admin listings of dead tasks.
create index inbox_dead_idx on keyway.inbox (grp) where state = 'dead';

-- One row per (group, topic, key): where the key stands and who may advance it.
create table keyway.consumer_key (
  grp         text        not null,
  topic       text        not null,
  key         text        not null,
  -- Every version up to done_ver is finished (done, skipped, or dead and parked). The next
  -- task to run is always done_ver + 1; if it is absent that is a gap and the key waits.
  done_ver    bigint      not null,
  -- Fencing. A worker bumps epoch when it takes the key and every later write of its checks
  -- `epoch = <its epoch>`: a worker that lost its lock during a long pause writes nothing.
  -- Correctness rests here; the Redis lock only saves work.
  epoch       bigint      not null default 0,
  owner       text,
  lease_until timestamptz,
  -- Set while the key's starting point is unknown: it was first seen at a version above 1,
  -- at this stream sequence. Once the group's ack floor passes it, every earlier message of
  -- the stream was ingested, and done_ver becomes (lowest version ingested) - 1.
  baseline_stream_seq bigint,
  -- When the key last had nothing to run because done_ver + 1 was missing.
  gap_since   timestamptz,
  primary key (grp, topic, key)
);

-- Messages that could not even be read as an event (no key to order them by): kept with the
-- reason for an operator, then acked, so one bad message never stops the others.
create table keyway.inbox_reject (
  id          bigserial   primary key,
  grp         text        not null,
  stream_seq  bigint,
  subject     text        not null,
  reason      text        not null,
  data        bytea       not null,
  received_at timestamptz not null default now()
);
