//! End-to-end delivery through a real Mosquitto: the outbox, the relay, the consumer.
//! Each test names the behaviour it proves.
#![allow(clippy::result_large_err)]

mod support;

use std::time::Duration;

use edge_outbox::outbox::OutboxError;
use edge_outbox::{HandlerError, Handlers, NewEvent};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transaction_publishes_nothing_and_leaves_no_sequence_gap() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);

    // A business write that fails after its event was enqueued.
    let o = p.outbox.clone();
    let failed: Result<(), OutboxError> = p
        .producer
        .writer()
        .write(move |tx| {
            tx.execute("INSERT INTO items (name) VALUES ('doomed')", [])?;
            let data = serde_json::json!({"id": 999});
            o.enqueue(
                tx,
                NewEvent {
                    stream: STREAM,
                    event_type: "item.created",
                    subject: None,
                    data: &data,
                },
            )?;
            Err(OutboxError::InvalidEvent(
                "business rule failed after enqueue".into(),
            ))
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(count(&p.producer_path(), "SELECT COUNT(*) FROM outbox"), 0);
    assert_eq!(count(&p.producer_path(), "SELECT COUNT(*) FROM items"), 0);

    let relay = p.spawn_relay();
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "kept", 1).await;
    wait_for("the committed event to be applied", 20, || {
        status.applied() == 1
    })
    .await;
    // Give a phantom event every chance to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let effects = effects(&p.consumer_path());
    assert_eq!(
        effects.len(),
        1,
        "only the committed event arrives: {effects:?}"
    );
    assert_eq!(
        effects[0].2, 1,
        "the committed event got sequence 1: the rolled-back one left no gap"
    );
    assert_eq!(status.dead_lettered(), 0);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_writes_succeed_then_everything_arrives_in_order() {
    let mut broker = Broker::reserve("");
    let p = Pair::new(&broker.url(), |c| c);
    let relay = p.spawn_relay();
    let (consumer, status) = p.spawn_consumer();

    create_items(&p.producer, &p.outbox, "offline", 300).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        p.pending(),
        300,
        "rows stay pending while the broker is down"
    );

    broker.launch();
    wait_for("all 300 events applied", 30, || status.applied() == 300).await;
    p.wait_all_published().await;
    assert_exactly_once_in_order(&p.consumer_path(), 300);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_between_puback_and_marking_delivers_again_and_the_consumer_applies_once() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| edge_outbox::Config {
        db_busy_timeout_ms: 300,
        ..c
    });
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "x", 50).await;

    // Another process holds the write lock: the relay can publish (reads still work)
    // and receive PUBACKs, but cannot mark anything published.
    let locker = inspect(&p.producer_path());
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let relay = p.spawn_relay();
    wait_for(
        "the consumer to receive all 50 (so the broker PUBACKed them)",
        20,
        || status.applied() == 50,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await; // the mark attempt times out on the lock
    relay.kill().await;
    locker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(
        p.pending(),
        50,
        "the killed relay marked nothing: every row is still pending"
    );

    let relay = p.spawn_relay();
    p.wait_all_published().await;
    let counted = || {
        format!(
            "the consumer to see the redelivered duplicates (received {}, applied {}, duplicates {}, other epoch {}, dead-lettered {})",
            status.received(),
            status.applied(),
            status.duplicates(),
            status.other_epoch(),
            status.dead_lettered()
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while status.duplicates() < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after 20 s waiting for {}",
            counted()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_exactly_once_in_order(&p.consumer_path(), 50);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkilled_after_acknowledging_undelivered_events_loses_nothing() {
    let mut broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    p.subscribe_then_go_offline().await;
    let relay = p.spawn_relay();
    create_items(&p.producer, &p.outbox, "y", 200).await;
    p.wait_all_published().await;

    broker.kill(); // loses the 200 queued messages and the consumer's session
    broker.launch();
    let (consumer, status) = p.spawn_consumer();
    wait_for(
        "all 200 applied after replay, with no operator action",
        30,
        || status.applied() == 200,
    )
    .await;
    assert!(
        status.replays_requested() >= 1,
        "recovery went through a replay request"
    );
    assert_exactly_once_in_order(&p.consumer_path(), 200);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_tail_of_a_stream_is_detected_from_head_announcements_and_recovered() {
    // The broker keeps at most 5 messages for an offline consumer and silently drops
    // the rest after PUBACKing them: the consumer gets 1..5 and nothing later reveals
    // the gap. Only the producer's head announcement can.
    let broker = Broker::start_with("max_queued_messages 5");
    let p = Pair::new(&broker.url(), |c| c);
    p.subscribe_then_go_offline().await;
    let relay = p.spawn_relay();
    create_items(&p.producer, &p.outbox, "z", 40).await;
    p.wait_all_published().await;

    let (consumer, status) = p.spawn_consumer();
    wait_for("all 40 applied", 30, || status.applied() == 40).await;
    assert!(
        status.replays_requested() >= 1,
        "the lost tail was recovered by a replay"
    );
    assert_exactly_once_in_order(&p.consumer_path(), 40);
    relay.stop().await;
    consumer.stop().await;
}

/// Shared by the two "consumer killed mid-batch" tests: the consumer's batch is stuck
/// waiting for the database lock when the consumer is killed; `lock_ms` decides whether
/// that batch then commits (lock released within the busy timeout) or fails.
async fn consumer_killed_mid_batch(lock_ms: u64) {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| edge_outbox::Config {
        db_busy_timeout_ms: 500,
        ..c
    });
    let (consumer, status) = p.spawn_consumer();
    wait_for("consumer connected", 10, || status.connected()).await;

    let locker = inspect(&p.consumer_path());
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let relay = p.spawn_relay();
    create_items(&p.producer, &p.outbox, "k", 60).await;
    // A batch is taken, and then stuck waiting for the lock.
    wait_for("the consumer to take a batch", 20, || status.received() > 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    consumer.kill().await;
    tokio::time::sleep(Duration::from_millis(lock_ms)).await;
    locker.execute_batch("ROLLBACK").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // the orphaned batch finishes
    let committed_while_dead = effects(&p.consumer_path()).len();
    if lock_ms < 500 {
        assert!(
            committed_while_dead > 0,
            "the batch committed after its consumer died, without an ack"
        );
    } else {
        assert_eq!(
            committed_while_dead, 0,
            "the batch failed on the lock: nothing was committed"
        );
    }

    let (consumer, status) = p.spawn_consumer();
    let path = p.consumer_path();
    wait_for("all 60 items applied", 30, || effects(&path).len() == 60).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let redeliveries land
    assert_exactly_once_in_order(&path, 60);
    assert_eq!(status.dead_lettered(), 0);
    if lock_ms < 500 {
        assert!(
            status.duplicates() > 0,
            "the broker redelivered the committed but unacknowledged events"
        );
    }
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_mid_batch_after_commit_before_ack_applies_nothing_twice() {
    consumer_killed_mid_batch(100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_mid_batch_before_commit_loses_nothing() {
    consumer_killed_mid_batch(1_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_is_dead_lettered_and_the_next_valid_event_is_applied() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let (consumer, status) = p.spawn_consumer();
    wait_for("consumer connected", 10, || status.connected()).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the SUBACK

    let topic = format!("{}/events/producer/{STREAM}", p.cfg.topic_prefix);
    let garbage: &[u8] = b"\x00\xffnot json at all";
    broker.publish_raw(&topic, garbage);
    broker.publish_raw(&topic, br#"{"specversion":"1.0","id":"x"}"#);
    wait_for("both bad messages dead-lettered", 10, || {
        status.dead_lettered() == 2
    })
    .await;

    let relay = p.spawn_relay();
    create_items(&p.producer, &p.outbox, "ok", 3).await;
    wait_for("the valid events applied", 20, || status.applied() == 3).await;
    assert_exactly_once_in_order(&p.consumer_path(), 3);

    let c = inspect(&p.consumer_path());
    let letter = |offset: i64| -> (String, Vec<u8>, String) {
        c.query_row(
            "SELECT topic, payload, reason FROM dead_letters ORDER BY id LIMIT 1 OFFSET ?1",
            [offset],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    };
    let (t, payload, reason) = letter(0);
    assert_eq!(t, topic);
    assert_eq!(payload, garbage, "the raw bytes are kept");
    assert!(reason.contains("not JSON"), "{reason}");
    let (_, _, reason) = letter(1);
    assert!(reason.contains("not a CloudEvent"), "{reason}");
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_fails_after_writing_keeps_nothing_and_its_batch_neighbours_are_applied() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    // The five events wait on the broker, so that the consumer gets them in one batch:
    // its first pass runs handlers without a savepoint each, so item 3's failure must
    // roll the whole batch back and apply it again with one savepoint per handler.
    p.subscribe_then_go_offline().await;
    let relay = p.spawn_relay();
    create_items(&p.producer, &p.outbox, "b", 5).await;
    p.wait_all_published().await;
    let refusing = Handlers::new().on("item.created", |tx, event| {
        let id = event.data.get("id").and_then(|v| v.as_i64()).unwrap_or(0);
        let seq = event.seq().map_err(HandlerError::Permanent)? as i64;
        tx.execute(
            "INSERT INTO effects (item_id, applied, seq) VALUES (?1, 1, ?2)",
            [id, seq],
        )?;
        if id == 3 {
            return Err(HandlerError::Permanent(
                "item 3 refused after a write".into(),
            ));
        }
        Ok(())
    });
    let (consumer, status) =
        spawn_consumer_with(&p.consumer_db, &p.consumer_cfg, "producer", refusing);
    wait_for("4 events applied and 1 dead-lettered", 20, || {
        status.applied() == 4 && status.dead_lettered() == 1
    })
    .await;
    let path = p.consumer_path();
    let applied: Vec<i64> = effects(&path).iter().map(|e| e.0).collect();
    assert_eq!(applied, [1, 2, 4, 5], "item 3's own write was undone");
    let letters: Vec<(i64, String)> = inspect(&path)
        .prepare("SELECT seq, reason FROM dead_letters")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(letters, [(3, "item 3 refused after a write".to_string())]);
    assert_eq!(
        count(&path, "SELECT position FROM inbox_positions"),
        5,
        "the stream moved past the refused event"
    );
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_event_is_refused_at_enqueue_together_with_its_business_write() {
    let p = Pair::new("mqtt://127.0.0.1:1", |c| edge_outbox::Config {
        payload_max_bytes: 4096,
        ..c
    });
    let err = create_item(&p.producer, &p.outbox, "x".repeat(5000))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OutboxError::PayloadTooLarge { max: 4096, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("--payload-max-bytes"),
        "the error names the setting: {err}"
    );
    assert_eq!(
        count(&p.producer_path(), "SELECT COUNT(*) FROM items"),
        0,
        "the business write was refused too"
    );
    assert_eq!(count(&p.producer_path(), "SELECT COUNT(*) FROM outbox"), 0);
    let seq = create_item(&p.producer, &p.outbox, "small".into())
        .await
        .unwrap();
    assert_eq!(seq, 1, "the refused event took no sequence number");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_made_by_another_process_are_noticed_through_data_version() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let relay = p.spawn_relay();
    let (consumer, status) = p.spawn_consumer();
    wait_for("consumer connected", 10, || status.connected()).await;

    // Another writer of the same file (as another process would be): no in-process
    // signal reaches the relay.
    let mut other = inspect(&p.producer_path());
    let tx = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    tx.execute(
        "INSERT INTO items (id, name) VALUES (1, 'from elsewhere')",
        [],
    )
    .unwrap();
    let data = serde_json::json!({"id": 1});
    p.outbox
        .enqueue(
            &tx,
            NewEvent {
                stream: STREAM,
                event_type: "item.created",
                subject: None,
                data: &data,
            },
        )
        .unwrap();
    tx.commit().unwrap();

    wait_for(
        "the relay to notice the foreign commit and the event to be applied",
        10,
        || status.applied() == 1,
    )
    .await;
    assert_exactly_once_in_order(&p.consumer_path(), 1);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_retries_while_its_database_is_busy_and_then_applies_everything_once() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| edge_outbox::Config {
        db_busy_timeout_ms: 200,
        ..c
    });
    let (consumer, status) = p.spawn_consumer();
    wait_for("consumer connected", 10, || status.connected()).await;
    let locker = inspect(&p.consumer_path());
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let relay = p.spawn_relay();
    create_items(&p.producer, &p.outbox, "busy", 30).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await; // several attempts fail on the lock
    assert_eq!(status.applied(), 0);
    locker.execute_batch("ROLLBACK").unwrap();
    wait_for("all 30 applied after the lock is gone", 20, || {
        status.applied() == 30
    })
    .await;
    assert_exactly_once_in_order(&p.consumer_path(), 30);
    assert_eq!(
        status.dead_lettered(),
        0,
        "busy is transient: nothing dead-lettered"
    );
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_drains_through_a_broker_that_allows_many_messages_in_flight() {
    // Regression (found by `make bench`): with the box's broker settings the broker
    // sends faster than rumqttc sends acks; acks awaited on rumqttc's full request
    // queue deadlocked the consumer after a few thousand events.
    let broker = Broker::start_with("max_inflight_messages 1000\nmax_queued_messages 200000");
    let p = Pair::new(&broker.url(), |c| c);
    create_items(&p.producer, &p.outbox, "bulk", 12_000).await;
    let (consumer, status) = p.spawn_consumer();
    wait_for("consumer connected", 10, || status.connected()).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the SUBACK
    let relay = p.spawn_relay();
    wait_for("all 12000 applied", 60, || status.applied() == 12_000).await;
    assert_exactly_once_in_order(&p.consumer_path(), 12_000);
    relay.stop().await;
    consumer.stop().await;
}
