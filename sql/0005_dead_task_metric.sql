-- Invariant 5 of DESIGN.md: a dead letter raises a metric. Each worker reports its group's
-- dead tasks and the keys they block on /metrics (keyway_consumer_dead_tasks,
-- keyway_consumer_blocked_keys), read at every scrape.
--
-- Counting `inbox where state = 'dead'` at each scrape would read the whole inbox, and a
-- partial index on state would cost every completion its HOT update: `state` changes on
-- each one (pending -> done), and a column in an index predicate counts as indexed (79% of
-- inbox updates are HOT without it, `BENCH_DIAG=1 just bench pipeline`). So each key counts
-- its own dead tasks, and a partial index holds only the keys that have any: a handful.
--
-- Triggers keep the count, not the code paths that kill, retry, skip, redrive or prune a
-- task: every way into or out of 'dead', present and future, goes through them. They fire
-- only on those transitions (the WHEN clauses), so completions pay one comparison a row.
alter table keyway.consumer_key add column dead_tasks int not null default 0;

create index consumer_key_dead_idx on keyway.consumer_key (grp) where dead_tasks > 0;

create function keyway.count_dead_tasks() returns trigger
language plpgsql
as $$
declare
  r keyway.inbox;
  delta int;
begin
  if tg_op = 'INSERT' then
    r := new;
    delta := 1;
  elsif tg_op = 'DELETE' then
    r := old;
    delta := -1;
  else
    r := new;
    delta := case when new.state = 'dead' then 1 else -1 end;
  end if;
  update keyway.consumer_key k
     set dead_tasks = k.dead_tasks + delta
   where k.grp = r.grp and k.topic = r.topic and k.key = r.key;
  return null;
end
$$;

create trigger inbox_dead_inserted after insert on keyway.inbox
  for each row when (new.state = 'dead') execute function keyway.count_dead_tasks();
create trigger inbox_dead_changed after update of state on keyway.inbox
  for each row when ((old.state = 'dead') <> (new.state = 'dead'))
  execute function keyway.count_dead_tasks();
create trigger inbox_dead_deleted after delete on keyway.inbox
  for each row when (old.state = 'dead') execute function keyway.count_dead_tasks();

-- Tasks that died before this migration.
update keyway.consumer_key k
   set dead_tasks = d.n
  from (select grp, topic, key, count(*)::int as n
          from keyway.inbox where state = 'dead' group by grp, topic, key) d
 where k.grp = d.grp and k.topic = d.topic and k.key = d.key;
