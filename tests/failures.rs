//! The failure matrix of docs/failure-scenarios.md: each test puts the box through one
//! failure with a real broker and real databases and checks that nothing is lost,
//! nothing is applied twice, and the consumer keeps going.
#![allow(clippy::result_large_err)]

mod support;

use std::time::{Duration, Instant};

use edge_outbox::outbox::envelope::{format_sequence, CloudEvent};
use support::*;

/// The payload of outbox row `seq` of the producer, as the relay would publish it.
fn outbox_payload(p: &Pair, seq: i64) -> Vec<u8> {
    inspect(&p.producer_path())
        .query_row("SELECT payload FROM outbox WHERE seq = ?1", [seq], |r| {
            r.get(0)
        })
        .unwrap()
}

fn events_topic(p: &Pair) -> String {
    format!("{}/events/producer/{STREAM}", p.cfg.topic_prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_going_away_mid_stream_refused_connections_lose_nothing() {
    let mut broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let relay = p.spawn_relay();
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "before", 100).await;
    wait_for("the first 100 applied", 20, || status.applied() == 100).await;

    broker.kill(); // connections now refused
    let started = Instant::now();
    create_items(&p.producer, &p.outbox, "during", 100).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "writes do not wait for the broker"
    );
    assert_eq!(
        p.pending(),
        100,
        "rows written while the broker is gone stay pending"
    );
    broker.launch();
    create_items(&p.producer, &p.outbox, "after", 100).await;
    wait_for("all 300 applied", 30, || status.applied() == 300).await;
    assert_exactly_once_in_order(&p.consumer_path(), 300);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_after_publishing_before_the_puback_publishes_again() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let (consumer, status) = p.spawn_consumer();
    wait_for("consumer connected", 10, || status.connected()).await;
    let relay = p.spawn_relay();
    tokio::time::sleep(Duration::from_millis(300)).await; // the relay is connected

    broker.signal(libc::SIGSTOP); // receives nothing, acknowledges nothing
    create_items(&p.producer, &p.outbox, "p", 30).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // written to the socket
    relay.kill().await;
    broker.signal(libc::SIGCONT);
    assert_eq!(p.pending(), 30, "no PUBACK, nothing marked");

    let relay = p.spawn_relay();
    p.wait_all_published().await;
    wait_for("all 30 applied", 20, || status.applied() == 30).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // any second copies land
    assert_exactly_once_in_order(&p.consumer_path(), 30);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_crashed_before_publishing_leaves_rows_pending_until_it_runs() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "q", 25).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        (p.pending(), status.applied()),
        (25, 0),
        "no relay, nothing published"
    );
    let relay = p.spawn_relay();
    wait_for("all 25 applied", 20, || status.applied() == 25).await;
    assert_exactly_once_in_order(&p.consumer_path(), 25);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries_are_acknowledged_without_effect() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let relay = p.spawn_relay();
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "d", 3).await;
    wait_for("3 applied", 20, || status.applied() == 3).await;
    for seq in [1, 2, 3, 2] {
        broker.publish_raw(&events_topic(&p), &outbox_payload(&p, seq));
    }
    wait_for("4 duplicates seen", 10, || status.duplicates() >= 4).await;
    assert_exactly_once_in_order(&p.consumer_path(), 3);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arriving_out_of_order_are_applied_in_sequence_order() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let (consumer, status) = p.spawn_consumer();
    wait_for("consumer connected", 10, || status.connected()).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the SUBACK
    create_items(&p.producer, &p.outbox, "o", 3).await;
    // As a reconnect can deliver them: 3 first, then 1, 2.
    for seq in [3, 1, 2] {
        broker.publish_raw(&events_topic(&p), &outbox_payload(&p, seq));
    }
    wait_for("1 and 2 applied", 10, || status.applied() == 2).await;
    assert_eq!(
        effects(&p.consumer_path()).len(),
        2,
        "3 arrived ahead of 1 and 2 and was not applied"
    );
    // The consumer knows 3 exists and asks the producer's relay for it.
    let relay = p.spawn_relay();
    wait_for("3 applied after the replay", 20, || status.applied() == 3).await;
    assert_exactly_once_in_order(&p.consumer_path(), 3);
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_and_the_consumer_keeps_going() {
    let broker = Broker::start();
    let p = Pair::new(&broker.url(), |c| c);
    let relay = p.spawn_relay();
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "h", 2).await;
    wait_for("2 applied", 20, || status.applied() == 2).await;

    let topic = events_topic(&p);
    // A 2 MiB message: above the event limit, below the client's packet limit.
    broker.publish_raw(&topic, &vec![b'x'; 2 * 1024 * 1024]);
    // Valid JSON of the wrong shape, and a CloudEvent of another producer on this topic.
    broker.publish_raw(
        &topic,
        br#"{"specversion":"1.0","id":"1","source":"producer","type":"item.created"}"#,
    );
    let mut forged: CloudEvent = serde_json::from_slice(&outbox_payload(&p, 1)).unwrap();
    forged.source = "intruder".into();
    broker.publish_raw(&topic, &serde_json::to_vec(&forged).unwrap());
    wait_for("3 dead letters", 20, || status.dead_lettered() == 3).await;
    let (len, kept): (i64, i64) = inspect(&p.consumer_path())
        .query_row(
            "SELECT payload_len, length(payload) FROM dead_letters ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (len, kept),
        (2 * 1024 * 1024, 1024 * 1024),
        "its size is recorded, its first MiB kept"
    );

    // A forged event far ahead: not applied; it only causes a harmless replay.
    forged.source = "producer".into();
    forged.id = "forged".into();
    forged.sequence = format_sequence(1_000_000);
    broker.publish_raw(&topic, &serde_json::to_vec(&forged).unwrap());
    create_items(&p.producer, &p.outbox, "h2", 3).await;
    wait_for("the next real events applied", 20, || status.applied() == 5).await;
    assert_exactly_once_in_order(&p.consumer_path(), 5);
    let forged_applied = count(
        &p.consumer_path(),
        "SELECT COUNT(*) FROM inbox WHERE event_id = 'forged'",
    );
    assert_eq!(forged_applied, 0);
    // The next head announcement closes the forged gap: the lag goes back to 0.
    wait_for("the forged gap forgotten", 10, || {
        status.streams().values().all(|s| s.lag() == 0)
    })
    .await;
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_broker_does_not_hang_the_relay_and_the_backlog_drains_after_needs_root() {
    let test = "black_hole_broker_does_not_hang_the_relay_and_the_backlog_drains_after_needs_root";
    if let Some(missing) = root_missing(&["ip", "iptables"]) {
        return skip(test, &missing);
    }
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(e) => return skip(test, &format!("cannot create a network namespace: {e}")),
    };
    let broker = Broker::start_in(&ns);
    // A short keep-alive so that the dead connection is noticed within seconds.
    let p = Pair::new(&broker.url(), |c| edge_outbox::Config {
        mqtt_keep_alive_s: 2,
        ..c
    });
    let relay_task = edge_outbox::Relay::new(p.producer.clone(), p.cfg.clone()).unwrap();
    let relay_status = relay_task.status();
    let cancel = tokio_util::sync::CancellationToken::new();
    let relay = Running {
        cancel: cancel.clone(),
        task: tokio::spawn(async move { relay_task.run(cancel).await.unwrap() }),
    };
    let (consumer, status) = p.spawn_consumer();
    create_items(&p.producer, &p.outbox, "b", 50).await;
    wait_for("50 applied", 20, || status.applied() == 50).await;

    ns.black_hole(broker.port, true);
    let started = Instant::now();
    create_items(&p.producer, &p.outbox, "hole", 50).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "writes do not wait for the broker"
    );
    wait_for("the relay to notice the dead connection", 20, || {
        !relay_status.connected()
    })
    .await;
    assert!(
        p.pending() > 0,
        "events written into the black hole stay pending"
    );

    ns.black_hole(broker.port, false);
    wait_for("all 100 applied after the black hole", 60, || {
        status.applied() == 100
    })
    .await;
    p.wait_all_published().await;
    assert_exactly_once_in_order(&p.consumer_path(), 100);
    relay.stop().await;
    consumer.stop().await;
}
