-- user-service, version 2: emails are unique after Unicode case folding and NFC, not
-- only after ASCII case folding (COLLATE NOCASE): émile@example.com and
-- ÉMILE@EXAMPLE.COM are one address. SQLite cannot fold Unicode, so the service computes
-- email_key; rows written before this version get theirs at the service's next start
-- (user_service::backfill_email_keys).
ALTER TABLE users ADD COLUMN email_key TEXT;
CREATE UNIQUE INDEX users_email_key ON users (email_key) WHERE email_key IS NOT NULL;
-- The rows still without a key, so that the backfill at every start finds them without
-- reading the whole table.
CREATE INDEX users_without_email_key ON users (id) WHERE email_key IS NULL;
