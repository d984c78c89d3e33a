-- The polling loop asks every poll interval (2 s by default), on every worker, whether any key
-- of its group still has a provisional start (keyway.consumer_key.baseline_stream_seq is set
-- until the group's ack floor confirms it, see 0006/0007). Usually none has, and without an
-- index the answer read every key of the group to find none: 25 ms at 200,000 keys, growing
-- with the keys. This partial index holds only the provisional keys: 0.25 ms.
--
-- Completions stay HOT: they change neither grp nor baseline_stream_seq. Built inside the
-- migration's transaction, it holds off writes to consumer_key while it builds (27 ms at
-- 200,000 keys on the test machine); CONCURRENTLY cannot run in a transaction.
create index consumer_key_provisional_idx on keyway.consumer_key (grp)
  where baseline_stream_seq is not null;
