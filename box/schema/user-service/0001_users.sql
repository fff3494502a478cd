-- user-service domain tables.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    email         TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    -- Sum of this user's transactions in transaction-service, applied from its
    -- transaction.created events exactly once each.
    balance_cents INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT    NOT NULL
) STRICT;
