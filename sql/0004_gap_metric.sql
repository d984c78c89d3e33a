-- Invariant 5 of DESIGN.md: a persistent gap raises a metric. Each worker reports its group's
-- waiting keys and the age of the oldest wait on /metrics (keyway_consumer_gap_keys,
-- keyway_consumer_oldest_gap_seconds), read at every scrape through this index.
--
-- Partial, so it holds only keys waiting right now: a handful, however many keys the group
-- has. It does not cost the hot path its HOT updates: keyway.complete_tasks() sets gap_since
-- to null on every completion, but an update that leaves a column's value as it was (null to
-- null) still counts as HOT, and gap_since changes only when a gap opens or closes.
create index consumer_key_gap_idx on keyway.consumer_key (grp, gap_since)
  where gap_since is not null;
