-- Consumer side: what an operator did with a dead letter (edge-outbox dead-letters
-- requeue / drop). The dead letter leaves `dead_letters` and its copy stays here, with
-- what was done and when: an audit that retention does not delete (it grows only at
-- the rate of operator actions).
CREATE TABLE dead_letter_actions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    dead_letter_id  INTEGER NOT NULL,
    action          TEXT    NOT NULL CHECK (action IN ('requeued', 'dropped')),
    -- requeued: 'applied' or 'already_applied'; dropped: 'dropped'.
    result          TEXT    NOT NULL,
    note            TEXT,
    acted_at_ms     INTEGER NOT NULL,
    -- The dead letter as it was.
    topic           TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    payload_len     INTEGER NOT NULL,
    reason          TEXT    NOT NULL,
    source          TEXT,
    stream          TEXT,
    seq             INTEGER,
    received_at_ms  INTEGER NOT NULL
) STRICT;

-- Counting dead letters (status pages, /metrics every scrape) reads this small index
-- instead of every kept message; retention deletes by it too.
CREATE INDEX dead_letters_received_at ON dead_letters (received_at_ms);
