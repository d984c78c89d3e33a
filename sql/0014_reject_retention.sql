-- Rejects age out. keyway.inbox_reject kept every message a group refused for good, so a
-- producer sending bad messages grew it without end, and `just status`, which counts a day's
-- rejects, read all of a group's. Workers now delete a group's rejects past an age (30 days by
-- default: long enough for an operator back from leave to find them) and the admin can
-- dismiss those read. Both, and status's count, ask by group and time: this index.
create index inbox_reject_grp_received_idx on keyway.inbox_reject (grp, received_at);
