//! The storage layer on real SQLite files: pragmas, migrations, group commit, outbox
//! sequence numbers and retention.
#![allow(clippy::result_large_err)]

mod support;

use edge_outbox::outbox::{self, OutboxError};
use edge_outbox::storage::{DbError, Migration, Schema, Synchronous};
use edge_outbox::{Config, Database, DbOptions, NewEvent, Outbox};
use support::*;

fn pragma(db: &Database, name: &str) -> String {
    let conn = db.reader().unwrap();
    conn.query_row(&format!("PRAGMA {name}"), [], |r| {
        r.get::<_, rusqlite::types::Value>(0)
    })
    .map(|v| match v {
        rusqlite::types::Value::Integer(i) => i.to_string(),
        rusqlite::types::Value::Text(t) => t,
        other => format!("{other:?}"),
    })
    .unwrap()
}

#[test]
fn opening_sets_wal_and_the_writer_uses_full_durability_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(&DbOptions::new(dir.path().join("a.db")), &[]).unwrap();
    assert_eq!(pragma(&db, "journal_mode"), "wal");
    // `synchronous` is per connection: ask the writer itself.
    let sync: i64 = db
        .writer()
        .write_blocking(|tx| {
            Ok::<_, DbError>(tx.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
        })
        .unwrap();
    assert_eq!(sync, 2, "2 is FULL");
    let fk: i64 = db
        .writer()
        .write_blocking(|tx| {
            Ok::<_, DbError>(tx.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?)
        })
        .unwrap();
    assert_eq!(fk, 1);
    assert_eq!(Synchronous::Full, DbOptions::new("x").synchronous);
}

#[test]
fn migrations_are_recorded_and_applying_twice_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    drop(Database::open(&DbOptions::new(&path), &[ITEMS_SCHEMA]).unwrap());
    drop(Database::open(&DbOptions::new(&path), &[ITEMS_SCHEMA]).unwrap());
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM schema_migrations"),
        5,
        "core v1 to v4 and items v1, once each"
    );
    assert_eq!(
        count(
            &path,
            "SELECT COUNT(*) FROM schema_migrations WHERE component = 'edge_outbox'"
        ),
        4
    );
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM outbox_epoch"),
        1,
        "one epoch, made once"
    );
}

#[test]
fn a_database_written_by_a_newer_schema_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.db");
    const V2: Schema = Schema {
        component: "test_items",
        migrations: &[
            Migration {
                version: 1,
                name: "items",
                sql: "CREATE TABLE items (id INTEGER PRIMARY KEY) STRICT;",
            },
            Migration {
                version: 2,
                name: "more",
                sql: "CREATE TABLE more (id INTEGER PRIMARY KEY) STRICT;",
            },
        ],
    };
    drop(Database::open(&DbOptions::new(&path), &[V2]).unwrap());
    const V1: Schema = Schema {
        component: "test_items",
        migrations: &[Migration {
            version: 1,
            name: "items",
            sql: "CREATE TABLE items (id INTEGER PRIMARY KEY) STRICT;",
        }],
    };
    let err = Database::open(&DbOptions::new(&path), &[V1])
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            DbError::NewerSchema {
                found: 2,
                known: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer release"), "{err}");
}

#[test]
fn a_file_that_is_not_a_database_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = Database::open(&DbOptions::new(&path), &[])
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("garbage.db") && msg.contains("not a database"),
        "{msg}"
    );
}

#[test]
fn a_failing_request_does_not_roll_back_its_neighbours_in_the_same_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(&DbOptions::new(dir.path().join("g.db")), &[ITEMS_SCHEMA]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results: Vec<Result<(), DbError>> = rt.block_on(async {
        // Queue all requests before the writer can take the first, so that they share
        // transactions; request 5 fails after writing.
        let futures: Vec<_> = (0..10)
            .map(|i| {
                let w = db.writer().clone();
                tokio::spawn(async move {
                    w.write(move |tx| {
                        tx.execute("INSERT INTO items (name) VALUES (?1)", [format!("n{i}")])?;
                        if i == 5 {
                            return Err(DbError::Panicked("request 5 fails on purpose".into()));
                        }
                        Ok(())
                    })
                    .await
                })
            })
            .collect();
        let mut out = Vec::new();
        for f in futures {
            out.push(f.await.unwrap());
        }
        out
    });
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    let path = dir.path().join("g.db");
    assert_eq!(count(&path, "SELECT COUNT(*) FROM items"), 9);
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM items WHERE name = 'n5'"),
        0
    );
}

#[test]
fn a_panicking_request_fails_alone_and_the_writer_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(&DbOptions::new(dir.path().join("p.db")), &[ITEMS_SCHEMA]).unwrap();
    let r: Result<(), DbError> = db.writer().write_blocking(|tx| {
        tx.execute("INSERT INTO items (name) VALUES ('boom')", [])?;
        panic!("handler bug");
    });
    assert!(
        matches!(r, Err(DbError::Panicked(ref m)) if m.contains("handler bug")),
        "{r:?}"
    );
    db.writer()
        .write_blocking(|tx| {
            Ok::<_, DbError>(
                tx.execute("INSERT INTO items (name) VALUES ('fine')", [])
                    .map(|_| ())?,
            )
        })
        .unwrap();
    assert_eq!(
        count(
            &dir.path().join("p.db"),
            "SELECT group_concat(name) = 'fine' FROM items"
        ),
        1
    );
}

#[test]
fn sequence_numbers_have_no_gaps_and_are_never_reused_after_old_rows_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("mqtt://127.0.0.1:1", "seqs");
    let db = open_db(dir.path(), "s", &cfg);
    let outbox = Outbox::new(&cfg);
    let enqueue_typed = |stream: &'static str, event_type: &'static str| {
        let o = outbox.clone();
        db.writer().write_blocking(move |tx| {
            o.enqueue(
                tx,
                NewEvent {
                    stream,
                    event_type,
                    subject: None,
                    data: &1,
                },
            )
            .map(|e| e.seq)
        })
    };
    let enqueue = |stream| enqueue_typed(stream, "t.e");
    assert_eq!(enqueue("a").unwrap(), 1);
    assert_eq!(enqueue("a").unwrap(), 2);
    assert_eq!(
        enqueue("b").unwrap(),
        1,
        "streams are numbered independently"
    );
    let bad = enqueue_typed("a", "bad type!");
    assert!(matches!(bad, Err(OutboxError::InvalidEvent(_))), "{bad:?}");
    let bad = enqueue("a/#");
    assert!(matches!(bad, Err(OutboxError::InvalidStream(_))), "{bad:?}");
    assert_eq!(enqueue("a").unwrap(), 3, "refused events take no number");

    let path = db_path(dir.path(), "s");
    inspect(&path).execute_batch("DELETE FROM outbox").unwrap();
    assert_eq!(
        enqueue("a").unwrap(),
        4,
        "numbers are not reused after deletion"
    );
    let id: i64 = inspect(&path)
        .query_row("SELECT id FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(id, 5, "row ids keep increasing too");
}

#[test]
fn retention_deletes_only_old_published_rows_that_every_known_consumer_applied() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("mqtt://127.0.0.1:1", "ret");
    let db = open_db(dir.path(), "r", &cfg);
    let outbox = Outbox::new(&cfg);
    for _ in 0..6 {
        let o = outbox.clone();
        db.writer()
            .write_blocking(move |tx| {
                o.enqueue(
                    tx,
                    NewEvent {
                        stream: "s",
                        event_type: "t.e",
                        subject: None,
                        data: &1,
                    },
                )
            })
            .unwrap();
    }
    let path = db_path(dir.path(), "r");
    let c = inspect(&path);
    // Rows 1-5 are old and published, row 6 is old but pending.
    c.execute_batch(
        "UPDATE outbox SET created_at_ms = 0;
         UPDATE outbox SET published_at_ms = 1 WHERE seq <= 5;",
    )
    .unwrap();
    let prune = |limit| {
        db.writer()
            .write_blocking(move |tx| {
                outbox::prune(tx, 7 * 24 * 3600 * 1000, 30 * 24 * 3600 * 1000, limit)
            })
            .unwrap()
    };
    // A consumer that reported position 3 holds back rows 4 and 5.
    db.writer()
        .write_blocking(|tx| outbox::record_position(tx, "c1", "s", 3))
        .unwrap();
    assert_eq!(prune(100), 3);
    let left = |c: &rusqlite::Connection| -> String {
        c.query_row(
            "SELECT group_concat(seq, ',') FROM (SELECT seq FROM outbox ORDER BY seq)",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(left(&c), "4,5,6");
    let heads = outbox::heads(&db.reader().unwrap()).unwrap();
    assert_eq!(
        heads["s"],
        edge_outbox::protocol::StreamHead {
            head: 5,
            first: 4,
            last: 6,
            base: 0
        },
        "head stops before the pending row"
    );

    // A consumer that has not reported for longer than the expiry no longer holds rows back.
    c.execute_batch("UPDATE consumer_positions SET reported_at_ms = 0")
        .unwrap();
    assert_eq!(prune(100), 2);
    assert_eq!(left(&c), "6", "the pending row is never deleted");
}

#[test]
fn the_backlog_counts_events_never_published_and_caps_new_ones_with_their_write() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = edge_outbox::Config {
        outbox_backlog_max_events: 3,
        ..config("mqtt://127.0.0.1:1", "cap")
    };
    let db = open_db(dir.path(), "b", &cfg);
    let outbox = Outbox::new(&cfg);
    let item = |name: &'static str| {
        let o = outbox.clone();
        db.writer().write_blocking(move |tx| {
            tx.execute("INSERT INTO items (name) VALUES (?1)", [name])?;
            o.enqueue(
                tx,
                NewEvent {
                    stream: "s",
                    event_type: "t.e",
                    subject: None,
                    data: &name,
                },
            )
            .map(|e| e.seq)
        })
    };
    let backlog = || outbox::backlog(&db.reader().unwrap()).unwrap();
    for name in ["a", "b", "c"] {
        item(name).unwrap();
    }
    assert_eq!(backlog().events, 3);
    assert!(backlog().bytes > 3 * 100, "envelope bytes are counted");
    let refused = item("d").unwrap_err();
    assert!(
        matches!(
            refused,
            OutboxError::BacklogFull {
                events: 3,
                max_events: 3,
                ..
            }
        ),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("--outbox-backlog-max-events"),
        "{refused}"
    );
    let path = db_path(dir.path(), "b");
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM items"),
        3,
        "the business write was refused with its event"
    );

    // Publishing drains it; a replay sets rows back to pending without counting them.
    db.writer()
        .write_blocking(|tx| outbox::mark_published(tx, &[1, 2, 3]))
        .unwrap();
    assert_eq!(backlog(), outbox::Backlog::default());
    db.writer()
        .write_blocking(|tx| outbox::reset_for_replay(tx, "s", 1))
        .unwrap();
    assert_eq!(backlog().events, 0, "replayed rows are already on disk");
    db.writer()
        .write_blocking(|tx| outbox::mark_published(tx, &[1, 2, 3]))
        .unwrap();
    assert_eq!(backlog().events, 0, "and are not subtracted twice");
    assert_eq!(item("d").unwrap(), 4);
    assert_eq!(backlog().events, 1);
}

#[tokio::test]
async fn a_relay_refuses_to_start_on_events_written_under_another_source_or_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("mqtt://127.0.0.1:1", "producer");
    let db = open_db(dir.path(), "p", &cfg);
    create_items(&db, &Outbox::new(&cfg), "x", 2).await;
    for changed in [
        Config {
            source: "someone-else".into(),
            ..cfg.clone()
        },
        Config {
            topic_prefix: "another/prefix".into(),
            ..cfg.clone()
        },
    ] {
        let e = edge_outbox::Relay::new(db.clone(), changed)
            .err()
            .expect("refused");
        let text = e.to_string();
        assert!(text.contains("holds events written for topic"), "{text}");
        assert!(text.contains("items"), "names the stream: {text}");
    }
    edge_outbox::Relay::new(db.clone(), cfg).expect("the settings they were written with");
}

/// A retention pass looks at the oldest rows a window at a time and stops at the
/// first window of rows younger than its cutoff, instead of reading every row.
#[test]
fn retention_stops_at_the_first_young_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("mqtt://127.0.0.1:1", "win");
    let db = open_db(dir.path(), "w", &cfg);
    let outbox = Outbox::new(&cfg);
    let o = outbox.clone();
    db.writer()
        .write_blocking(move |tx| {
            for _ in 0..30 {
                o.enqueue(
                    tx,
                    NewEvent {
                        stream: "s",
                        event_type: "t.e",
                        subject: None,
                        data: &1,
                    },
                )?;
            }
            Ok::<_, OutboxError>(())
        })
        .unwrap();
    let path = db_path(dir.path(), "w");
    // Rows 1-10 old, 11-30 young; all published.
    inspect(&path)
        .execute_batch("UPDATE outbox SET published_at_ms = 1; UPDATE outbox SET created_at_ms = 0 WHERE id <= 10;")
        .unwrap();
    let day = 24 * 3600 * 1000;
    let window_until = |cursor: i64, size: usize, stop: bool| {
        db.writer()
            .write_blocking(move |tx| {
                let mut at = cursor;
                let n = outbox::prune_window(
                    tx,
                    &mut at,
                    edge_outbox::clock::now_ms() - day,
                    30 * day as u64,
                    size,
                    stop,
                )?;
                Ok::<_, DbError>((n, at))
            })
            .unwrap()
    };
    let window = |cursor: i64, size: usize| window_until(cursor, size, true);
    assert_eq!(
        window(0, 4),
        (Some(4), 4),
        "the first window: four old rows"
    );
    assert_eq!(
        window(4, 8),
        (Some(6), 12),
        "old and young rows: the old ones go"
    );
    assert_eq!(
        window(12, 8),
        (None, 12),
        "only young rows: the pass is done"
    );
    assert_eq!(count(&path, "SELECT COUNT(*) FROM outbox"), 20);

    // A clock that stepped back: old rows behind young ones. The cap's pass reads on.
    inspect(&path)
        .execute_batch("UPDATE outbox SET created_at_ms = 0 WHERE id > 25")
        .unwrap();
    assert_eq!(
        window(12, 8),
        (None, 12),
        "the time rule stops at the young rows"
    );
    assert_eq!(
        window_until(12, 8, false),
        (Some(0), 20),
        "the cap's pass goes on"
    );
    assert_eq!(
        window_until(20, 20, false),
        (Some(5), 30),
        "and finds the old rows"
    );
    assert_eq!(
        window_until(30, 20, false),
        (None, 30),
        "to the end of the table"
    );
}
