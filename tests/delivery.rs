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

/// A gateway with one stream per device: 10,000 streams, one consumer of all of them.
/// Every stream is delivered; head announcements and position reports go in pages
/// within the size limit (one message listing them all would exceed it); a tail lost
/// by the broker on one of the 10,000 streams is found from the announcements and
/// replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_are_announced_in_pages_and_a_lost_tail_on_one_is_recovered() {
    use edge_outbox::protocol::{self, HeadAnnouncement};
    use edge_outbox::{Consumer, StreamKey};
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    const STREAMS: usize = 10_000;
    const LOST: usize = 4_242;
    let mut broker = Broker::start_with("max_inflight_messages 1000\nmax_queued_messages 200000");
    let p = Pair::new(&broker.url(), |c| c);
    let stream = |i: usize| format!("dev-{i:05}");
    let keys: Vec<StreamKey> = (0..STREAMS)
        .map(|i| StreamKey {
            source: "producer".into(),
            stream: stream(i),
        })
        .collect();
    let spawn_consumer = || {
        let c = Consumer::new(
            p.consumer_db.clone(),
            p.consumer_cfg.clone(),
            keys.clone(),
            handlers(),
        )
        .unwrap();
        let status = c.status();
        let cancel = tokio_util::sync::CancellationToken::new();
        let token = cancel.clone();
        let task = tokio::spawn(async move { c.run(token).await.unwrap() });
        (Running { cancel, task }, status)
    };
    // (stream, item id); the ids say the stream and the sequence: stream * 1000 + seq.
    let enqueue = |events: Vec<(usize, usize)>| {
        let events = events
            .into_iter()
            .map(|(i, id)| (stream(i), serde_json::json!({ "id": id })))
            .collect();
        enqueue_events(&p.producer, &p.outbox, events)
    };
    let applied = |path: &std::path::Path| count(path, "SELECT COUNT(*) FROM effects");

    // Watch the head announcements as any consumer does.
    let mut o = MqttOptions::new(
        format!("heads-watch-{}", std::process::id()),
        "127.0.0.1",
        broker.port,
    );
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (watcher, mut watch) = AsyncClient::new(o, 64);
    let heads_topic = protocol::Topics::new(&p.cfg.topic_prefix).heads("producer");
    watcher
        .subscribe(&heads_topic, QoS::AtMostOnce)
        .await
        .unwrap();
    let pages = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let seen = pages.clone();
    let watching = tokio::spawn(async move {
        while let Ok(e) = watch.poll().await {
            if let Event::Incoming(Packet::Publish(m)) = e {
                seen.lock().unwrap().push(m.payload.to_vec());
            }
        }
    });

    let (consumer, _) = spawn_consumer();
    tokio::time::sleep(Duration::from_secs(2)).await; // connected, 10,000 filters granted
    let relay = p.spawn_relay();
    enqueue((0..STREAMS).map(|i| (i, i * 1000 + 1)).collect()).await;
    wait_for("one event on each of 10,000 streams applied", 60, || {
        applied(&p.consumer_path()) == STREAMS as i64
    })
    .await;

    // Every stream announced, in pages within the limit.
    pages.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(3)).await; // more than 6 intervals of 200 ms
    let got = std::mem::take(&mut *pages.lock().unwrap());
    let mut announced = std::collections::BTreeMap::new();
    for page in &got {
        assert!(
            page.len() <= protocol::CONTROL_PAGE_MAX_BYTES,
            "a page of {} bytes",
            page.len()
        );
        let h: HeadAnnouncement = serde_json::from_slice(page).unwrap();
        h.validate().unwrap();
        announced.extend(h.streams);
    }
    assert_eq!(
        announced.len(),
        STREAMS,
        "every stream announced within the sweep ({} pages)",
        got.len()
    );
    assert!(announced.values().all(|h| h.head == 1));
    // Every position reported, in pages, and recorded by the producer.
    wait_for("the consumer's 10,000 positions recorded by the producer", 20, || {
        count(&p.producer_path(), "SELECT COUNT(*) FROM consumer_positions WHERE consumer = 'consumer' AND position = 1")
            == STREAMS as i64
    })
    .await;

    // The broker loses a tail of one stream: queued for the offline consumer, then
    // gone with the broker.
    consumer.stop().await;
    enqueue((2..=21).map(|seq| (LOST, LOST * 1000 + seq)).collect()).await;
    p.wait_all_published().await;
    broker.kill();
    broker.launch();
    let (consumer, status) = spawn_consumer();
    wait_for("the lost tail of one of 10,000 streams applied", 60, || {
        applied(&p.consumer_path()) == (STREAMS + 20) as i64
    })
    .await;
    assert!(
        status.replays_requested() >= 1,
        "recovered through a replay"
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // nothing more arrives
    let effects = effects(&p.consumer_path());
    assert_eq!(effects.len(), STREAMS + 20);
    assert!(effects.iter().all(|e| e.1 == 1), "nothing applied twice");
    let tail: Vec<i64> = effects
        .iter()
        .filter(|e| e.0 / 1000 == LOST as i64)
        .map(|e| e.2)
        .collect();
    assert_eq!(
        tail,
        (1..=21).collect::<Vec<i64>>(),
        "the stream applied in order"
    );
    relay.stop().await;
    consumer.stop().await;
    watching.abort();
}

/// `--retention-max-bytes`: the oldest published history goes, before its
/// --retention-ms, until the database fits; rows a known consumer still lacks, rows
/// younger than an hour and unpublished rows stay, even above the cap; the consumer's
/// inbox records go too, but not those of the last half of --retention-ms, and never
/// its domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_beyond_the_byte_cap_is_deleted_oldest_first_and_nothing_needed_goes() {
    use edge_outbox::storage::used_bytes;
    const CAP: u64 = edge_outbox::config::RETENTION_MAX_BYTES_MIN;
    const HOUR: i64 = 3_600_000;
    let mut broker = Broker::start_with("max_inflight_messages 1000\nmax_queued_messages 200000");
    let p = Pair::new(&broker.url(), |c| edge_outbox::Config {
        retention_max_bytes: CAP,
        retention_interval_ms: 300,
        retention_ms: 2 * HOUR as u64,
        ..c
    });
    // Item ids: 1.. on STREAM, which the consumer consumes; negative elsewhere.
    let enqueue = |stream: &str, n: usize, first_id: i64| {
        let events = (0..n as i64)
            .map(|i| {
                let id = if stream == STREAM {
                    first_id + i
                } else {
                    -first_id - i
                };
                let data = serde_json::json!({ "id": id, "pad": "x".repeat(2_000) });
                (stream.to_owned(), data)
            })
            .collect();
        enqueue_events(&p.producer, &p.outbox, events)
    };
    let used = |path: &std::path::Path| used_bytes(&inspect(path)).unwrap();
    let seqs = |stream: &str| -> (i64, i64, i64) {
        inspect(&p.producer_path())
            .query_row(
                "SELECT COUNT(*), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM outbox WHERE stream = ?1",
                [stream],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    };
    // 90 minutes older: beyond the cap's hour and the inbox's half of --retention-ms,
    // within --retention-ms (the time rule deletes none of it).
    let age = |path: &std::path::Path, sql: &str| {
        inspect(path).execute(sql, [HOUR * 3 / 2]).unwrap();
    };

    // A consumer that has applied only 10 events of "held" holds the rest back.
    enqueue("held", 100, 1).await;
    p.producer
        .writer()
        .write(|tx| edge_outbox::outbox::record_position(tx, "slow", "held", 10))
        .await
        .unwrap();
    let (consumer, _) = p.spawn_consumer();
    tokio::time::sleep(Duration::from_millis(300)).await; // the SUBACK
    let relay = p.spawn_relay();
    enqueue(STREAM, 5_000, 1).await; // about 12 MB of history
    p.wait_all_published().await;
    wait_for("every event applied", 30, || {
        count(&p.consumer_path(), "SELECT COUNT(*) FROM effects") == 5_000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await; // passes: nothing young goes
    assert_eq!(
        seqs(STREAM).0,
        5_000,
        "no row younger than an hour is deleted for the cap"
    );
    assert_eq!(
        count(&p.consumer_path(), "SELECT COUNT(*) FROM inbox"),
        5_000
    );

    age(
        &p.producer_path(),
        "UPDATE outbox SET created_at_ms = created_at_ms - ?1",
    );
    age(
        &p.consumer_path(),
        "UPDATE inbox SET applied_at_ms = applied_at_ms - ?1",
    );
    wait_for("the producer's database within the cap", 30, || {
        used(&p.producer_path()) <= CAP
    })
    .await;
    let (items, first, last) = seqs(STREAM);
    assert!(items > 0 && items < 5_000, "{items} rows of history left");
    assert_eq!(
        (first, last),
        (5_000 - items + 1, 5_000),
        "the oldest went first"
    );
    assert_eq!(
        seqs("held"),
        (90, 11, 100),
        "what a known consumer lacks stays"
    );
    wait_for("the consumer's database within the cap", 30, || {
        used(&p.consumer_path()) <= CAP
    })
    .await;
    let inbox = count(&p.consumer_path(), "SELECT COUNT(*) FROM inbox");
    assert!(inbox < 5_000, "the oldest inbox records went: {inbox} left");
    assert_exactly_once_in_order(&p.consumer_path(), 5_000);

    // Young history above the cap stays, and so does what is unpublished.
    enqueue(STREAM, 1_000, 5_001).await;
    p.wait_all_published().await;
    broker.kill();
    enqueue("late", 1_000, 10_000).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await; // several retention passes
    assert_eq!(p.pending(), 1_000, "nothing unpublished is deleted");
    let young = count(
        &p.producer_path(),
        "SELECT COUNT(*) FROM outbox WHERE stream = 'items' AND seq > 5000",
    );
    assert_eq!(
        young, 1_000,
        "no row younger than an hour is deleted, even above the cap"
    );
    assert!(used(&p.producer_path()) > CAP);
    assert!(seqs(STREAM).1 > first, "the older rows went first");
    relay.stop().await;
    consumer.stop().await;
}
