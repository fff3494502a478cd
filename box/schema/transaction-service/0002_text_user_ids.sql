-- transaction-service, version 2: user ids are text (UUIDv7 from user-service, or the
-- decimal ids of users created before them, as text). SQLite cannot change a column's
-- type, so both tables are rebuilt with the same rows.
CREATE TABLE known_users_v2 (
    user_id       TEXT    PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 36),
    name          TEXT    NOT NULL,
    email         TEXT    NOT NULL,
    -- Maintained in the same transaction as every ledger row of the user.
    balance_cents INTEGER NOT NULL DEFAULT 0,
    seen_at_ms    INTEGER NOT NULL
) STRICT;
INSERT INTO known_users_v2 (user_id, name, email, balance_cents, seen_at_ms)
    SELECT CAST(user_id AS TEXT), name, email, balance_cents, seen_at_ms FROM known_users;

CREATE TABLE transactions_v2 (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      TEXT    NOT NULL REFERENCES known_users_v2 (user_id),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    kind         TEXT    NOT NULL CHECK (kind IN ('credit', 'debit')),
    description  TEXT,
    -- 1 for the welcome credit granted on user.created.
    welcome      INTEGER NOT NULL DEFAULT 0 CHECK (welcome IN (0, 1)),
    created_at   TEXT    NOT NULL
) STRICT;
INSERT INTO transactions_v2 (id, user_id, amount_cents, kind, description, welcome, created_at)
    SELECT id, CAST(user_id AS TEXT), amount_cents, kind, description, welcome, created_at FROM transactions;

-- Keep AUTOINCREMENT's high-water mark: ledger ids are in transaction.created events
-- and must never be handed out twice, even when the newest rows were deleted.
UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'transactions'), 0))
 WHERE name = 'transactions_v2';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'transactions_v2', seq FROM sqlite_sequence WHERE name = 'transactions'
     AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'transactions_v2');
DROP TABLE transactions;
DROP TABLE known_users;
-- Renaming also rewrites transactions_v2's reference to known_users_v2.
ALTER TABLE known_users_v2 RENAME TO known_users;
ALTER TABLE transactions_v2 RENAME TO transactions;
CREATE INDEX transactions_by_user ON transactions (user_id, id);
-- Exactly one welcome credit per user, whatever happens upstream.
CREATE UNIQUE INDEX one_welcome_credit_per_user ON transactions (user_id) WHERE welcome = 1;
