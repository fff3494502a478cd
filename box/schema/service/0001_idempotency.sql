-- Shared by the HTTP services: responses kept for Idempotency-Key retries.
-- Written in the same transaction as the request's domain write, so a key is stored
-- exactly when its write committed.
CREATE TABLE idempotency_keys (
    key           TEXT    PRIMARY KEY,
    -- Method, path and canonical JSON body of the first request with this key: a retry
    -- must match it exactly.
    request       TEXT    NOT NULL,
    status        INTEGER NOT NULL,
    response      TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at_ms);
