-- transaction-service domain tables.

-- Projection of user-service's users, built from user.created events. The service
-- answers from it, so it keeps working while user-service or the broker is down.
CREATE TABLE known_users (
    user_id       INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL,
    email         TEXT    NOT NULL,
    -- Maintained in the same transaction as every ledger row of the user.
    balance_cents INTEGER NOT NULL DEFAULT 0,
    seen_at_ms    INTEGER NOT NULL
) STRICT;

CREATE TABLE transactions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES known_users (user_id),
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    kind         TEXT    NOT NULL CHECK (kind IN ('credit', 'debit')),
    description  TEXT,
    -- 1 for the welcome credit granted on user.created.
    welcome      INTEGER NOT NULL DEFAULT 0 CHECK (welcome IN (0, 1)),
    created_at   TEXT    NOT NULL
) STRICT;
CREATE INDEX transactions_by_user ON transactions (user_id, id);
-- Exactly one welcome credit per user, whatever happens upstream.
CREATE UNIQUE INDEX one_welcome_credit_per_user ON transactions (user_id) WHERE welcome = 1;
