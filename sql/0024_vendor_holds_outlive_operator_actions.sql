-- A task's vendor hold, kept apart from its retry time, so that an operator's action keeps it.
--
-- A handler's failure that says when to come back (retryAfterMs: a Retry-After, or a push
-- given up without an answer, which AIMS may still apply until then) holds the task's key:
-- its next version's call must not land first and be drawn over. The hold was only the
-- task's run_after, which is also a retry's backoff, and an operator's skip, retry or redrive
-- set run_after to -infinity so that a task waiting out a backoff would run, or be stepped
-- over, at once. A held one went too, and the next version's push with it (a label could
-- keep the older image for good). A skip had been made to keep a dead task's run_after; a
-- pending one held for what it sent, and a retry of either, still lost it.
--
-- hold_until is written by the failure (libs/keyed-consumer markFailed, the later of what it
-- had and what the failure says), and the operator's actions set run_after to it instead
-- of -infinity: a hold passed is in the past, and lets the task go at once as before.
-- Not indexed: the updates stay heap-only.
alter table keyway.inbox add column hold_until timestamptz;

-- Dead and held is only ever a vendor hold (a backoff does not outlive its task's death).
update keyway.inbox set hold_until = run_after where state = 'dead' and run_after > now();
