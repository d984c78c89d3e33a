-- A task whose run never reports back is charged for it.
--
-- Attempts were counted only when a run ended: markFailed, or done. A payload that kills its
-- worker (an out-of-memory abort, a native crash, an event loop blocked past the lease) ended
-- no run. Its task stayed pending with its attempts at 0, the recovery loop handed it to the
-- next worker, which died in turn: the key never moved, and every worker of the group was
-- taken down once per lease length, with every other key's task in flight on it.
--
-- A claim of a key whose next task is due now opens a run of that task (run_ver,
-- run_open), and every end the worker sees closes it: done (the key moves on), a failure
-- (markFailed, which also records its attempt), or the worker giving the run back unstarted
-- or cut short (by stop(), or by the loss of the key, which costs no attempt). A claim that
-- finds the run before it still open asks whether its worker is alive: one that renews its
-- lease every third of it shows more than a third left. If not, that run was lost: its worker
-- died, or froze past its lease (runs_lost). If so, it lost only the key, and its run ends
-- fenced or cut short: it is replaced, not lost.
--
-- The worker runs a task with lost runs alone (a suspect, in case the payload is what kills
-- workers: the other tasks in flight beside it each lost a run too) and counts its lost runs
-- with its attempts: at the topic's maximum the task is dead without another run
-- (libs/keyed-consumer drainKey). The count follows the version: a later version's run starts
-- from none. An operator's retry or redrive rewinds the key and clears it.
--
-- All three columns live on consumer_key, which the claim updates anyway (fillfactor 50 keeps
-- the update HOT): the hot path gains one probe of the inbox row the claim reads next.
alter table keyway.consumer_key
  add column run_ver bigint,
  add column run_open boolean not null default false,
  add column runs_lost int not null default 0;

-- The claim's rows gain a column: made anew, as in sql/0017. A worker of the previous release
-- reads its columns by name and ignores this one; its prepared claim fails once and is
-- prepared again (libs/db PreparingClient).
drop function keyway.claim_keys(text, text[], text[], text, int, int);

create function keyway.claim_keys(
  p_grp text, p_topics text[], p_keys text[], p_owner text, p_lease_ms int, p_limit int
) returns table (i int, epoch bigint, done_ver bigint, ver bigint, event_id text, type text,
                 payload jsonb, trace jsonb, created_at timestamptz, state text, attempts int,
                 wait_ms double precision, superseded_by bigint, runs_lost int)
language plpgsql
as $$
#variable_conflict use_column
declare
  v_epoch bigint;
  v_done bigint;
  v_superseded bigint;
  v_lost int;
begin
  for n in 1 .. coalesce(array_length(p_keys, 1), 0) loop
    update keyway.consumer_key c
       set epoch = c.epoch + 1, owner = p_owner,
           lease_until = now() + make_interval(secs => p_lease_ms / 1000.0),
           -- "Due" as the drain decides it from this claim's rows: pending, run_after passed
           -- (wait_ms 0). Anything else (a gap, a retry's backoff, a dead or skipped task)
           -- opens no run. The right-hand sides read the row as it was: the lease is the
           -- previous holder's.
           (run_ver, run_open, runs_lost) = (
             select case when h.due then c.done_ver + 1 else c.run_ver end,
                    h.due or c.run_open,
                    case when not h.due then c.runs_lost
                         when c.run_ver is distinct from c.done_ver + 1 then 0
                         when c.run_open
                              and coalesce(c.lease_until, '-infinity')
                                  <= now() + make_interval(secs => p_lease_ms / 3000.0)
                           then c.runs_lost + 1
                         else c.runs_lost end
               from (select exists (select 1 from keyway.inbox y
                                     where y.grp = c.grp and y.topic = c.topic
                                       and y.key = c.key and y.ver = c.done_ver + 1
                                       and y.state = 'pending' and y.run_after <= now())) h(due))
     where c.grp = p_grp and c.topic = p_topics[n] and c.key = p_keys[n]
       and c.baseline_stream_seq is null
    returning c.epoch, c.done_ver, c.superseded_by,
              case when c.run_ver = c.done_ver + 1 then c.runs_lost else 0 end
      into v_epoch, v_done, v_superseded, v_lost;
    if found then
      -- The left join keeps one row (with a null version) for a key with nothing to run:
      -- the caller still learns the epoch it claimed.
      return query
      select n, v_epoch, v_done, x.ver, x.event_id, x.type, x.payload, x.trace, x.created_at,
             x.state, x.attempts,
             extract(epoch from greatest(x.run_after, now()) - now())::float8 * 1000,
             v_superseded, v_lost
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
