-- The rows the relay's re-publish of recent rows unmarked, in the order the stream stored
-- them: the relay sends them again in that order before any new row (libs/outbox
-- internal/relay-sql.ts claimBatch, `resent`), so that a stream that lost its unsynced tail
-- numbers them as before and a copy sourcing it skips none of its new events.
--
-- Only unmarked rows are in it: a mark (published_at set) takes its row out, and an insert
-- (stream_seq null) never puts one in, so the writers' and the relay's hot path write no
-- entry of it.
create index outbox_resent_idx on keyway.outbox (stream_seq, seq)
  where published_at is null and stream_seq is not null;
