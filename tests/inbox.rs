//! The inbox rules on a real SQLite file, without a broker: order, duplicates, gaps,
//! dead letters, handler failures.
#![allow(clippy::result_large_err)]

mod support;

use bytes::Bytes;
use edge_outbox::consumer::inbox::{
    self, ApplyError, HandlerError, Handlers, InboxContext, Isolation, Outcome, StreamKey,
};
use edge_outbox::outbox::envelope::{format_sequence, CloudEvent};
use edge_outbox::protocol::Topics;
use edge_outbox::Database;
use support::*;

const PREFIX: &str = "t";

fn event(seq: u64, event_type: &str, id: i64) -> (String, Bytes) {
    let e = CloudEvent {
        specversion: "1.0".into(),
        id: format!("ev-{seq}-{event_type}"),
        source: "producer".into(),
        event_type: event_type.into(),
        subject: None,
        time: "2026-11-27T12:00:00.000Z".into(),
        datacontenttype: "application/json".into(),
        stream: STREAM.into(),
        sequence: format_sequence(seq),
        epoch: None,
        data: serde_json::json!({ "id": id }),
    };
    (
        Topics::new(PREFIX).events("producer", STREAM),
        Bytes::from(serde_json::to_vec(&e).unwrap()),
    )
}

fn ctx(handlers: Handlers) -> InboxContext {
    InboxContext {
        topics: Topics::new(PREFIX),
        handlers,
        payload_max_bytes: 64 * 1024,
    }
}

fn apply(db: &Database, ctx: &InboxContext, messages: Vec<(String, Bytes)>) -> Vec<Outcome> {
    try_apply(db, ctx, messages, Isolation::PerHandler).unwrap()
}

fn try_apply(
    db: &Database,
    ctx: &InboxContext,
    messages: Vec<(String, Bytes)>,
    isolation: Isolation,
) -> Result<Vec<Outcome>, ApplyError> {
    let ctx = ctx.clone();
    db.writer()
        .write_blocking(move |tx| inbox::apply_batch(tx, &ctx, &messages, isolation))
}

/// The test handlers, and three that write, then fail: permanently, transiently, by
/// panicking.
fn failing_handlers() -> Handlers {
    handlers()
        .on("item.rejected", |tx, _| {
            tx.execute("INSERT INTO items (name) VALUES ('partial write')", [])?;
            Err(HandlerError::Permanent("amount out of range".into()))
        })
        .on("item.flaky", |tx, _| {
            tx.execute("INSERT INTO items (name) VALUES ('partial write')", [])?;
            Err(HandlerError::Transient("database is locked".into()))
        })
        .on("item.buggy", |_, _| panic!("handler bug"))
}

fn key() -> StreamKey {
    stream_key("producer")
}

fn open(dir: &std::path::Path) -> Database {
    open_db(dir, "c", &config("mqtt://127.0.0.1:1", "c"))
}

#[test]
fn events_apply_in_order_and_duplicates_and_events_ahead_of_a_gap_have_no_effect() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let ctx = ctx(handlers());
    let out = apply(
        &db,
        &ctx,
        vec![
            event(1, "item.created", 1),
            event(2, "item.created", 2),
            event(2, "item.created", 2),
            event(4, "item.created", 4),
        ],
    );
    assert!(matches!(out[0], Outcome::Applied { seq: 1, .. }), "{out:?}");
    assert!(matches!(out[1], Outcome::Applied { seq: 2, .. }), "{out:?}");
    assert_eq!(out[2], Outcome::Duplicate { key: key(), seq: 2 });
    assert_eq!(
        out[3],
        Outcome::Ahead {
            key: key(),
            seq: 4,
            position: 2
        }
    );
    let out = apply(
        &db,
        &ctx,
        vec![event(3, "item.created", 3), event(4, "item.created", 4)],
    );
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Applied { .. })),
        "{out:?}"
    );
    assert_exactly_once_in_order(&db_path(dir.path(), "c"), 4);
    assert_eq!(inbox::position(&db.reader().unwrap(), &key()).unwrap(), 4);
}

#[test]
fn unknown_types_and_permanent_handler_errors_are_dead_lettered_and_the_stream_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let ctx = ctx(failing_handlers());
    let out = apply(
        &db,
        &ctx,
        vec![
            event(1, "item.mystery", 1),
            event(2, "item.rejected", 2),
            event(3, "item.buggy", 3),
            event(4, "item.created", 4),
        ],
    );
    let reasons: Vec<String> = out[..3]
        .iter()
        .map(|o| match o {
            Outcome::DeadLettered {
                reason,
                advanced: Some((_, _)),
            } => reason.clone(),
            other => panic!("expected a dead letter that advanced the stream, got {other:?}"),
        })
        .collect();
    assert!(
        reasons[0].contains("no handler for event type \"item.mystery\""),
        "{reasons:?}"
    );
    assert_eq!(reasons[1], "amount out of range");
    assert!(reasons[2].contains("panicked"), "{reasons:?}");
    assert!(matches!(out[3], Outcome::Applied { seq: 4, .. }));
    let path = db_path(dir.path(), "c");
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM items"),
        0,
        "the failed handler's partial write was undone"
    );
    assert_eq!(
        count(
            &path,
            "SELECT COUNT(*) FROM dead_letters WHERE seq IS NOT NULL"
        ),
        3
    );
    assert_eq!(
        count(
            &path,
            "SELECT COUNT(*) FROM inbox WHERE outcome = 'dead_lettered'"
        ),
        3
    );
}

#[test]
fn without_a_savepoint_per_handler_a_failing_handler_stops_the_batch_and_nothing_of_it_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let ctx = ctx(failing_handlers());
    let path = db_path(dir.path(), "c");
    for failing in ["item.rejected", "item.flaky", "item.buggy"] {
        let batch = vec![event(1, "item.created", 1), event(2, failing, 2)];
        let result = try_apply(&db, &ctx, batch, Isolation::Optimistic);
        assert!(
            matches!(result, Err(ApplyError::HandlerFailed)),
            "{failing}: {result:?}"
        );
        for table in [
            "items",
            "effects",
            "inbox",
            "inbox_positions",
            "dead_letters",
        ] {
            let rows = count(&path, &format!("SELECT COUNT(*) FROM {table}"));
            assert_eq!(
                rows, 0,
                "{failing}: the rolled-back batch left rows in {table}"
            );
        }
    }
    // The same batch with a savepoint per handler: event 1 applied, event 2 dead-lettered.
    let batch = vec![event(1, "item.created", 1), event(2, "item.rejected", 2)];
    let out = apply(&db, &ctx, batch);
    assert!(matches!(out[0], Outcome::Applied { seq: 1, .. }), "{out:?}");
    assert!(matches!(out[1], Outcome::DeadLettered { .. }), "{out:?}");
    assert_eq!(count(&path, "SELECT COUNT(*) FROM items"), 0);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM effects"), 1);
}

#[test]
fn a_transient_handler_error_keeps_nothing_and_stops_the_batch_for_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let ctx = ctx(failing_handlers());
    let out = apply(
        &db,
        &ctx,
        vec![
            event(1, "item.created", 1),
            event(2, "item.flaky", 2),
            event(3, "item.created", 3),
        ],
    );
    assert_eq!(
        out.len(),
        2,
        "the batch stops at the transient failure: {out:?}"
    );
    assert_eq!(out[1], Outcome::Retry("database is locked".into()));
    let path = db_path(dir.path(), "c");
    assert_eq!(count(&path, "SELECT COUNT(*) FROM items"), 0);
    assert_eq!(
        inbox::position(&db.reader().unwrap(), &key()).unwrap(),
        1,
        "event 1 kept, event 2 not"
    );
}

#[test]
fn hostile_messages_are_dead_lettered_without_touching_any_position() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let ctx = ctx(handlers());
    let (topic, good) = event(1, "item.created", 1);
    let mut wrong_stream: serde_json::Value = serde_json::from_slice(&good).unwrap();
    wrong_stream["stream"] = "other".into();
    let out = apply(
        &db,
        &ctx,
        vec![
            (topic.clone(), Bytes::from_static(b"\xff\xfe")),
            (topic.clone(), Bytes::from(vec![b'{'; 64 * 1024 + 1])),
            (topic.clone(), Bytes::from_static(br#"[1,2,3]"#)),
            (
                topic.clone(),
                Bytes::from(serde_json::to_vec(&wrong_stream).unwrap()),
            ),
            ("t/elsewhere".into(), good.clone()),
        ],
    );
    let reasons: Vec<&str> = out
        .iter()
        .map(|o| match o {
            Outcome::DeadLettered {
                reason,
                advanced: None,
            } => reason.as_str(),
            other => panic!("expected a dead letter, got {other:?}"),
        })
        .collect();
    assert!(reasons[0].contains("not JSON"), "{reasons:?}");
    assert!(
        reasons[1].contains("exceeds the 65536-byte limit"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("not a CloudEvent"), "{reasons:?}");
    assert!(reasons[3].contains("topic says"), "{reasons:?}");
    assert!(reasons[4].contains("not an event topic"), "{reasons:?}");
    assert_eq!(inbox::position(&db.reader().unwrap(), &key()).unwrap(), 0);
    assert!(matches!(
        apply(&db, &ctx, vec![(topic, good)])[0],
        Outcome::Applied { seq: 1, .. }
    ));
}

#[test]
fn skipping_what_the_producer_no_longer_holds_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let skipped = db
        .writer()
        .write_blocking(|tx| inbox::skip_unrecoverable(tx, &key(), 10))
        .unwrap();
    assert_eq!(skipped, Some((1, 9)));
    let again = db
        .writer()
        .write_blocking(|tx| inbox::skip_unrecoverable(tx, &key(), 10))
        .unwrap();
    assert_eq!(again, None, "nothing more to skip");
    assert_eq!(
        count(
            &db_path(dir.path(), "c"),
            "SELECT COUNT(*) FROM inbox_skipped WHERE first_seq = 1 AND last_seq = 9"
        ),
        1
    );
    assert_eq!(inbox::position(&db.reader().unwrap(), &key()).unwrap(), 9);
}
