-- A rejected message is kept once per group, however often it is delivered.
--
-- A reject is recorded before the message is acked; a crash or a lost ack in between, or
-- ack_wait passing, has the stream deliver it again, to this worker or another, and each
-- delivery added a row. The operator's list should hold the message once. The stream
-- sequence names a message within the group's stream (a group reads one stream); rows
-- without one (none are written so) are left as they are.
delete from keyway.inbox_reject r
 using keyway.inbox_reject first
 where r.grp = first.grp and r.stream_seq = first.stream_seq and r.id > first.id;
create unique index inbox_reject_grp_stream_seq_key on keyway.inbox_reject (grp, stream_seq);
