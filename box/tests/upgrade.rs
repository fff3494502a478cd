//! Databases written by the previous version open with this one and keep their rows:
//! integer user ids become text, known to both services by the same spelling.

use edge_box::{transaction_service, user_service};
use edge_outbox::{Database, DbOptions, Schema};

/// `schema` as the previous version knew it: without its last migration.
fn previous(schema: &Schema) -> Schema {
    upto(schema, schema.migrations.len() - 1)
}

/// `schema` with only its first `n` migrations.
fn upto(schema: &Schema, n: usize) -> Schema {
    Schema {
        component: schema.component,
        migrations: &schema.migrations[..n],
    }
}

#[test]
fn integer_user_ids_of_the_previous_version_become_text_with_the_same_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("transaction-service.db");
    let users = dir.path().join("user-service.db");
    drop(
        Database::open(
            &DbOptions::new(&ledger),
            &[previous(&transaction_service::SCHEMA)],
        )
        .unwrap(),
    );
    // The users table of before text ids (migration 3).
    drop(Database::open(&DbOptions::new(&users), &[upto(&user_service::SCHEMA, 2)]).unwrap());
    let c = rusqlite::Connection::open(&ledger).unwrap();
    c.execute_batch(
        "INSERT INTO known_users (user_id, name, email, balance_cents, seen_at_ms) VALUES (7, 'A', 'a@b.io', 1000, 0);
         INSERT INTO transactions (user_id, amount_cents, kind, welcome, created_at) VALUES (7, 1000, 'credit', 1, 'x');
         INSERT INTO transactions (user_id, amount_cents, kind, welcome, created_at) VALUES (7, 5, 'credit', 0, 'x');
         DELETE FROM transactions WHERE id = 2;",
    )
    .unwrap();
    drop(c);
    rusqlite::Connection::open(&users)
        .unwrap()
        .execute_batch("INSERT INTO users (name, email, email_key, balance_cents, created_at) VALUES ('A', 'a@b.io', 'a@b.io', 1000, 'x');")
        .unwrap();

    drop(Database::open(&DbOptions::new(&ledger), &[transaction_service::SCHEMA]).unwrap());
    drop(Database::open(&DbOptions::new(&users), &[user_service::SCHEMA]).unwrap());
    let c = rusqlite::Connection::open(&ledger).unwrap();
    let row: (String, String, i64) = c
        .query_row(
            "SELECT k.user_id, t.user_id, k.balance_cents FROM known_users k JOIN transactions t ON t.user_id = k.user_id",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(row, ("7".into(), "7".into(), 1000));
    c.execute_batch("PRAGMA foreign_keys = ON").unwrap();
    let unknown = c.execute(
        "INSERT INTO transactions (user_id, amount_cents, kind, created_at) VALUES ('8', 1, 'credit', 'x')",
        [],
    );
    assert!(
        unknown.is_err(),
        "the reference to known_users survived the rebuild"
    );
    let second_welcome = c.execute(
        "INSERT INTO transactions (user_id, amount_cents, kind, welcome, created_at) VALUES ('7', 1, 'credit', 1, 'x')",
        [],
    );
    assert!(second_welcome.is_err(), "still one welcome credit per user");
    c.execute(
        "INSERT INTO transactions (user_id, amount_cents, kind, created_at) VALUES ('7', 1, 'credit', 'x')",
        [],
    )
    .unwrap();
    assert_eq!(
        c.last_insert_rowid(),
        3,
        "ledger ids are not handed out twice: id 2 was used (and deleted) before"
    );
    let uid: String = rusqlite::Connection::open(&users)
        .unwrap()
        .query_row("SELECT uid FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(uid, "1", "an older user keeps its id, as text");
}

/// Migration 4 rebuilds `users` with one unique index on the email: rows and ids are
/// kept, ids are not handed out again, and an address that folds to a known one is
/// still refused.
#[test]
fn the_users_table_rebuilt_with_one_email_index_keeps_its_rows_ids_and_uniqueness() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("user-service.db");
    drop(Database::open(&DbOptions::new(&users), &[previous(&user_service::SCHEMA)]).unwrap());
    let c = rusqlite::Connection::open(&users).unwrap();
    c.execute_batch(
        "INSERT INTO users (name, email, email_key, uid, balance_cents, created_at) VALUES ('A', 'Ann@B.io', 'ann@b.io', 'u-1', 0, 'x');
         INSERT INTO users (name, email, email_key, uid, balance_cents, created_at) VALUES ('B', 'bob@b.io', 'bob@b.io', 'u-2', 0, 'x');
         DELETE FROM users WHERE id = 2;",
    )
    .unwrap();
    drop(c);
    drop(Database::open(&DbOptions::new(&users), &[user_service::SCHEMA]).unwrap());
    let c = rusqlite::Connection::open(&users).unwrap();
    let kept: (i64, String, String) = c
        .query_row("SELECT id, email, uid FROM users", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(kept, (1, "Ann@B.io".into(), "u-1".into()));
    let twin = c.execute(
        "INSERT INTO users (name, email, email_key, uid, balance_cents, created_at) VALUES ('C', 'ANN@b.io', ?1, 'u-3', 0, 'x')",
        [user_service::email_key("ANN@b.io")],
    );
    assert!(
        twin.is_err(),
        "an address that folds to a known one is refused"
    );
    c.execute(
        "INSERT INTO users (name, email, email_key, uid, balance_cents, created_at) VALUES ('D', 'dan@b.io', 'dan@b.io', 'u-4', 0, 'x')",
        [],
    )
    .unwrap();
    assert_eq!(
        c.last_insert_rowid(),
        3,
        "id 2 was used (and deleted) before"
    );
    let unique_indexes: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM pragma_index_list('users') WHERE \"unique\" = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        unique_indexes, 2,
        "users_email_key and users_uid, no second one on the email"
    );
}
