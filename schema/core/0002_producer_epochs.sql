-- edge-outbox core schema, version 2: producer epochs (docs/recovery.md, "Producer
-- identity"). Never edit a released file: add a new numbered file instead.

-- Producer side: this database's identity. A new database gets a new epoch, so does one
-- found to have been rewound (restored from a backup; see outbox::start_new_epoch), so
-- that consumers never take this numbering for one they saw before. Every event and
-- head announcement carries the epoch. The epoch continues `previous` up to each
-- stream's `outbox_streams.epoch_base`: events after it in `previous`, if a consumer saw
-- any, are not this database's.
CREATE TABLE outbox_epoch (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    epoch         TEXT    NOT NULL CHECK (length(epoch) BETWEEN 1 AND 64),
    previous      TEXT,
    -- 'created' (a new database, or one that existed before epochs), 'rewound'
    -- (a consumer had seen more of this epoch than the database holds) or 'restored'
    -- (`edge-outbox mark-restored`).
    reason        TEXT    NOT NULL,
    started_at_ms INTEGER NOT NULL
) STRICT;
INSERT INTO outbox_epoch (id, epoch, previous, reason, started_at_ms)
VALUES (1, lower(hex(randomblob(16))), NULL, 'created', CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));

-- epoch_base: the last sequence number this epoch shares with `previous` (0 when there
-- is none). run_base: the last sequence number when this database was last opened;
-- events after it were written by the running process. When a rewind is found, the
-- new epoch shares with the old one what the database held when it was opened.
ALTER TABLE outbox_streams ADD COLUMN epoch_base INTEGER NOT NULL DEFAULT 0 CHECK (epoch_base >= 0);
ALTER TABLE outbox_streams ADD COLUMN run_base INTEGER NOT NULL DEFAULT 0 CHECK (run_base >= 0);

-- Consumer side: the producer epoch a position counts in. NULL for positions written
-- before epochs existed: such a position takes the first epoch it meets.
ALTER TABLE inbox_positions ADD COLUMN epoch TEXT;

-- The inbox records the epoch of each event, and a sequence number is unique only
-- within one epoch of a stream (a new epoch may number events again).
CREATE TABLE inbox_v2 (
    event_id      TEXT    PRIMARY KEY,
    source        TEXT    NOT NULL,
    stream        TEXT    NOT NULL,
    -- '' for events recorded before epochs existed.
    epoch         TEXT    NOT NULL DEFAULT '',
    seq           INTEGER NOT NULL,
    event_type    TEXT    NOT NULL,
    outcome       TEXT    NOT NULL CHECK (outcome IN ('applied', 'dead_lettered')),
    applied_at_ms INTEGER NOT NULL,
    UNIQUE (source, stream, epoch, seq)
) STRICT;
INSERT INTO inbox_v2 (event_id, source, stream, epoch, seq, event_type, outcome, applied_at_ms)
    SELECT event_id, source, stream, '', seq, event_type, outcome, applied_at_ms FROM inbox;
DROP TABLE inbox;
ALTER TABLE inbox_v2 RENAME TO inbox;
CREATE INDEX inbox_applied_at ON inbox (applied_at_ms);

-- Consumer side: every change of a producer's epoch this consumer followed. `orphaned`
-- is the range it had applied that the producer no longer has (its database was
-- replaced or restored from an older backup): never expected, kept for the operator and
-- for `verify`.
CREATE TABLE inbox_epoch_changes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    source          TEXT    NOT NULL,
    stream          TEXT    NOT NULL,
    from_epoch      TEXT,
    from_position   INTEGER NOT NULL,
    to_epoch        TEXT    NOT NULL,
    to_position     INTEGER NOT NULL,
    orphaned_first  INTEGER,
    orphaned_last   INTEGER,
    recorded_at_ms  INTEGER NOT NULL
) STRICT;

-- Producer side: rows a replay set back to pending, which the relay publishes after
-- the live ones (src/outbox/mod.rs, fetch_pending), so that live events never wait
-- behind a long replay.
CREATE INDEX outbox_pending_replayed ON outbox (id) WHERE published_at_ms IS NULL AND replayed = 1;
