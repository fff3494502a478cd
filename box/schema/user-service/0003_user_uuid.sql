-- user-service, version 3: users are known by a UUIDv7 (`uid`), never handed out twice,
-- so that a user-service restored from an older backup, or started on an empty
-- database, cannot give a new user the id of one that transaction-service already
-- knows. `id` stays as the table's row order (paging). Users created before this
-- version keep their decimal id, as text, which transaction-service already knows.
ALTER TABLE users ADD COLUMN uid TEXT;
UPDATE users SET uid = CAST(id AS TEXT);
CREATE UNIQUE INDEX users_uid ON users (uid);
