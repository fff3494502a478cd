//! Control messages that cannot destroy data, on an open broker (defence in depth: the
//! box's ACL keeps strangers out, but a box may talk to brokers it does not control).
//! Regression tests for issue 12; each message here did damage before.

#![allow(clippy::result_large_err)]

mod support;

use std::sync::Arc;

use edge_outbox::outbox::envelope::{format_sequence, CloudEvent};
use edge_outbox::RelayStatus;
use support::*;

/// A relay of the pair's producer whose status the test can read.
fn relay_with_status(p: &Pair) -> (Running, Arc<RelayStatus>) {
    spawn_relay_with_status(&p.producer, &p.cfg)
}

fn topic(p: &Pair, rest: &str) -> String {
    format!("{}/{rest}", p.cfg.topic_prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_announcement_cannot_skip_events_and_a_sequence_beyond_i64_is_dead_lettered() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let relay = p.spawn_relay();
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "a", 2).await;
    wait_for("2 applied", 20, || status.applied() == 2).await;

    // first far beyond head (it moved the position past every future event), and a head
    // beyond i64 (the position overflowed and the consumer stalled for good).
    let heads = topic(&p, "heads/producer");
    broker.publish_retained(
        &heads,
        br#"{"source":"producer","streams":{"items":{"head":1,"first":1000000000000}}}"#,
    );
    broker.publish_raw(
        &heads,
        br#"{"source":"producer","streams":{"items":{"head":9223372036854775808,"first":9223372036854775808}}}"#,
    );
    // An event whose sequence is beyond what SQLite can hold.
    let mut huge: CloudEvent = serde_json::from_slice(&outbox_row_payload(&p, 1)).unwrap();
    huge.id = "huge".into();
    huge.sequence = format_sequence(1 << 63);
    broker.publish_raw(
        &topic(&p, "events/producer/items"),
        &serde_json::to_vec(&huge).unwrap(),
    );
    wait_for("the huge sequence dead-lettered", 20, || {
        status.dead_lettered() == 1
    })
    .await;

    create_items(&p.producer, &p.outbox, "b", 3).await;
    wait_for("the next real events applied", 20, || status.applied() == 5).await;
    assert_exactly_once_in_order(&p.consumer_path(), 5);
    assert_eq!(
        count(&p.consumer_path(), "SELECT COUNT(*) FROM inbox_skipped"),
        0,
        "nothing skipped"
    );
    relay.stop().await;
    consumer.stop().await;
}

/// The envelope of the producer's outbox row with sequence `seq`.
fn outbox_row_payload(p: &Pair, seq: i64) -> Vec<u8> {
    inspect(&p.producer_path())
        .query_row("SELECT payload FROM outbox WHERE seq = ?1", [seq], |r| {
            r.get(0)
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_reports_are_clamped_to_the_last_event_retained_ones_and_bad_names_ignored() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let relay = p.spawn_relay();
    create_items(&p.producer, &p.outbox, "p", 5).await;
    let positions = |consumer: &str| topic(&p, &format!("positions/producer/{consumer}"));
    let report = |consumer: &str, json: String| {
        broker.publish_raw(&positions(consumer), json.as_bytes());
    };
    let position = |consumer: &str| -> i64 {
        count(
            &p.producer_path(),
            &format!("SELECT COALESCE(MAX(position), -1) FROM consumer_positions WHERE consumer = '{consumer}'"),
        )
    };
    report("c1", r#"{"consumer":"c1","positions":{"items":3}}"#.into());
    wait_for("c1 at 3", 10, || position("c1") == 3).await;
    // Far beyond the last event (5): clamped, so retention can never be told that a
    // consumer has what was never written.
    report(
        "c1",
        r#"{"consumer":"c1","positions":{"items":1000000}}"#.into(),
    );
    wait_for("c1 clamped to the last event", 10, || position("c1") == 5).await;
    // Back: a consumer whose database was restored wins back the rows it lacks.
    report("c1", r#"{"consumer":"c1","positions":{"items":2}}"#.into());
    wait_for("c1 back at 2", 10, || position("c1") == 2).await;

    // A retained report, delivered when the relay (re)subscribes, may be the last word
    // of a consumer that is gone: it renews nothing and moves nothing.
    relay.stop().await;
    broker.publish_retained(
        &positions("c1"),
        br#"{"consumer":"c1","positions":{"items":5}}"#,
    );
    broker.publish_retained(
        &positions("gone"),
        br#"{"consumer":"gone","positions":{"items":1}}"#,
    );
    let relay = p.spawn_relay();

    // A name no consumer can have, a stream this producer does not have, and a sentinel
    // that shows the relay has handled everything before it.
    let long = "x".repeat(30_000);
    report(
        &long[..100],
        format!(r#"{{"consumer":"{long}","positions":{{"items":1}}}}"#),
    );
    report(
        "c2",
        r#"{"consumer":"c2","positions":{"nosuchstream":7}}"#.into(),
    );
    report("c3", r#"{"consumer":"c3","positions":{"items":4}}"#.into());
    wait_for("the sentinel report recorded", 10, || position("c3") == 4).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // writes may land out of order
    assert_eq!(position("c1"), 2, "a retained report moved a position");
    assert_eq!(position("gone"), -1, "a retained report created a consumer");
    assert_eq!(
        count(&p.producer_path(), "SELECT COUNT(*) FROM consumer_positions WHERE length(consumer) > 64 OR stream <> 'items'"),
        0,
        "no row for an invalid name or an unknown stream"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_and_repeated_replay_requests_cannot_replay_the_history_again_and_again() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "r", 50).await;

    let replay = topic(&p, "replay/producer/consumer");
    let request =
        |from: u64| format!(r#"{{"consumer":"consumer","stream":"items","from_seq":{from}}}"#);
    let replayed = || {
        count(
            &p.producer_path(),
            "SELECT COUNT(*) FROM outbox WHERE replayed = 1",
        )
    };
    let relay = p.spawn_relay();
    wait_for("50 applied", 20, || status.applied() == 50).await;
    wait_for("50 published", 20, || pending(&p.producer_path()) == 0).await;
    relay.stop().await;

    // A retained request waits on the broker: every relay that connects gets it, after
    // every row was published (so that serving it would set all 50 back to pending).
    broker.publish_retained(&replay, request(1).as_bytes());
    let (relay, relay_status) = relay_with_status(&p);
    // A sentinel for the last event only, after the retained one on the same topic.
    wait_for("the relay connected", 20, || relay_status.connected()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // its SUBSCRIBE is in
    broker.publish_raw(&replay, request(50).as_bytes());
    wait_for("the sentinel served", 20, || {
        relay_status.replays_served() >= 1
    })
    .await;
    wait_for("the sentinel's row set back to pending", 20, || {
        replayed() >= 1
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // a spawned write may lag
    assert_eq!(
        relay_status.replays_served(),
        1,
        "the retained request was served"
    );
    assert_eq!(replayed(), 1, "only the sentinel's row was replayed");
    wait_for("the sentinel drained", 20, || {
        pending(&p.producer_path()) == 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await; // past REPLAY_MIN_INTERVAL

    // A storm: 60 requests from sequence 1 at once, and invalid ones.
    let mut storm: Vec<String> = (0..60).map(|_| request(1)).collect();
    storm.push(r#"{"consumer":"consumer","stream":"items","from_seq":9223372036854775808}"#.into());
    storm.push(format!(
        r#"{{"consumer":"{}","stream":"items","from_seq":1}}"#,
        "y".repeat(30_000)
    ));
    broker.publish_lines(&replay, &storm);
    wait_for("the storm replayed and drained", 20, || {
        relay_status.replays_served() >= 2 && pending(&p.producer_path()) == 0
    })
    .await;
    let served = relay_status.replays_served() - 1;
    assert!(
        served <= 3,
        "60 requests for the same replay were served {served} times: they must coalesce (the retained one never)"
    );
    wait_for("the replayed events seen as duplicates", 20, || {
        status.duplicates() >= 50
    })
    .await;
    assert_exactly_once_in_order(&p.consumer_path(), 50);
    relay.stop().await;
    consumer.stop().await;
}

/// Regression test for issue 12 ("two services started with the same MQTT client id
/// take over each other's sessions forever"): the takeover is named, and the
/// reconnects slow down instead of going on at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_with_one_client_id_are_told_that_they_take_over_each_other() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let (a, a_status) = relay_with_status(&p);
    let other_db = open_db(p.dir.path(), "other", &p.cfg);
    let (b, b_status) = spawn_relay_with_status(&other_db, &p.cfg);
    let told = |s: &RelayStatus| {
        s.connection_error()
            .is_some_and(|e| e.contains("same client id"))
    };
    wait_for("a relay names the client-id takeover", 20, || {
        told(&a_status) || told(&b_status)
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_position_reports_is_written_as_the_latest_of_each_consumer() {
    // Before: one task and one write per report; 3,000 reports took the relay's RSS
    // from 85 to 349 MB. Now the latest report of each consumer is written with the
    // others every 250 ms, in one transaction.
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let (relay, status) = relay_with_status(&p);
    create_items(&p.producer, &p.outbox, "r", 5).await;
    p.wait_all_published().await;
    let mut lines: Vec<String> = (0..3_000)
        .map(|i| format!(r#"{{"consumer":"c1","positions":{{"items":{}}}}}"#, i % 5))
        .collect();
    lines.push(r#"{"consumer":"c1","positions":{"items":4}}"#.into());
    broker.publish_lines(&topic(&p, "positions/producer/c1"), &lines);
    let position = || {
        count(
            &p.producer_path(),
            "SELECT COALESCE(MAX(position), -1) FROM consumer_positions WHERE consumer = 'c1'",
        )
    };
    wait_for("the last report recorded", 10, || position() == 4).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(
        position(),
        4,
        "no older report of the burst written after it"
    );
    // The relay still publishes.
    create_items(&p.producer, &p.outbox, "s", 3).await;
    p.wait_all_published().await;
    assert_eq!(status.marked_published(), 8);
    relay.stop().await;
}
