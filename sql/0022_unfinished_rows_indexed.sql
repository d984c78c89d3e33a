-- The safety nets find their keys among those with unfinished work, not by visiting every key.
--
-- The polling loop's query (every poll interval), and the recovery loop's two (expired leases,
-- undated gaps; every recovery interval) each visited every key of the group and probed the
-- inbox for it, in every worker process. Keys are never deleted, and each keeps its finished
-- rows for the retention (a day), so most are idle: at 100,000 keys with five finished rows
-- each, the three cost 230, 264 and 434 ms a round, 38% of a core per worker process at the
-- default intervals (`just bench safety-nets`), whether or not anything had been lost.
--
-- A key can have a task to run, a lapsed lease over one, or a gap only if one of its rows is
-- unfinished (pending, dead, or a skip's) or it was rewound below finished ones: a row is
-- 'done' only by the completion that moves done_ver to it, and only a rewind moves done_ver
-- back below it (the admin retry or redrive, which records the newest such row in
-- superseded_by, sql/0017). These two indexes hold exactly those keys, and the queries walk
-- them (libs/keyed-consumer internal/inbox-sql.ts, candidateKeys).
--
-- Now they cost 1-2 ms a round at any number of idle keys. When every key has a task due
-- they still visit every key (the poll 460 ms against 343 before, at 100,000; the recovery
-- loop's two 36 and 517 against 15 and 685), but then every key has work to do anyway.
--
-- The price is on the hot path: the completion's update of the inbox row (pending → done)
-- changes a column of an index's predicate, so it is no longer a heap-only (HOT) update and
-- writes an entry in each of the inbox's indexes. Not seen in `just bench pipeline`: worker
-- Postgres 0.35 ms per event against 0.40 the run before it, the machine 2.0 against 2.5 ms
-- (one run each; runs of one commit differ by more). The consumer_key index costs the hot
-- path nothing: only a rewind writes superseded_by.
--
-- Built in the migration's transaction, which holds off ingest and completions on the inbox
-- while it reads the table once: a large inbox is better migrated while its workers are
-- stopped.
create index inbox_unfinished_idx on keyway.inbox (grp, topic, key, ver)
  where state <> 'done';
create index consumer_key_rewound_idx on keyway.consumer_key (grp, topic, key)
  where superseded_by is not null;

-- A rewind made before sql/0017, or by an admin CLI of the release before it during an
-- upgrade, recorded no superseded_by: its key, standing at a done row, would be in neither
-- index. Recorded now as sql/0017's rewind records it (one read of the inbox's done rows).
update keyway.consumer_key k
   set superseded_by = d.ver
  from (select i.grp, i.topic, i.key, max(i.ver) as ver
          from keyway.inbox i
          join keyway.consumer_key c on c.grp = i.grp and c.topic = i.topic and c.key = i.key
         where i.state = 'done' and i.ver > c.done_ver
         group by i.grp, i.topic, i.key) d
 where k.grp = d.grp and k.topic = d.topic and k.key = d.key and k.superseded_by is null;
