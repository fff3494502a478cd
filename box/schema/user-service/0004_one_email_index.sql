-- One unique index on the email, not two. `users_email_key` (the NFC, case-folded key
-- of version 2) already refuses every address that the column's NOCASE UNIQUE
-- refused (NOCASE folds only ASCII letters; case folding folds them too), and an
-- older user left without a key shares its folded key with a user that has one, so
-- a new signup with its address is refused by that key. The second index cost every
-- POST /users one more page written at a random place: 5.6 of its 19.6 KiB of disk
-- writes (docs/performance.md, "Scale"). SQLite cannot drop a column's UNIQUE, so the
-- table is rebuilt with its rows, ids and AUTOINCREMENT sequence.
CREATE TABLE users_v4 (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    email         TEXT    NOT NULL COLLATE NOCASE,
    -- Sum of this user's transactions in transaction-service, applied from its
    -- transaction.created events exactly once each.
    balance_cents INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT    NOT NULL,
    email_key     TEXT,
    uid           TEXT
) STRICT;
INSERT INTO users_v4 (id, name, email, balance_cents, created_at, email_key, uid)
    SELECT id, name, email, balance_cents, created_at, email_key, uid FROM users;
UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'users'), 0))
 WHERE name = 'users_v4';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'users_v4', seq FROM sqlite_sequence WHERE name = 'users'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'users_v4');
DROP TABLE users;
ALTER TABLE users_v4 RENAME TO users;
CREATE UNIQUE INDEX users_email_key ON users (email_key) WHERE email_key IS NOT NULL;
CREATE INDEX users_without_email_key ON users (id) WHERE email_key IS NULL;
CREATE UNIQUE INDEX users_uid ON users (uid);
