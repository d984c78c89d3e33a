-- Rejects age out. keyway.inbox_reject kept every message a group refused for good, so a
-- producer sending bad messages grew it without end. Workers now delete a group's rejects
-- past an age (30 days by default: long enough for an operator back from leave to find them),
-- and the admin can dismiss those read. Retention and `just status` (a day's count) ask by
-- group and time; listing (newest first) and dismissing (a range of ids) by group and id.
create index inbox_reject_grp_received_idx on keyway.inbox_reject (grp, received_at);
create index inbox_reject_grp_id_idx on keyway.inbox_reject (grp, id);
