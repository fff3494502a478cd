//! The MQTT link (src/mqtt.rs) under faults that a proxy in front of a real Mosquitto,
//! or a real NATS server, makes: a slow CONNACK, a broker that drops every connection
//! right after accepting it, connections cut while the relay publishes, a subscription
//! refused.

#![allow(clippy::result_large_err)] // the test domain's writes return rusqlite errors
mod support;

use std::time::{Duration, Instant};

use edge_outbox::{Config, Secret};
use support::nats::{self, Cluster};
use support::proxy::{Mode, Proxy};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_opens_one_connection_while_its_connack_is_slow_and_commits_keep_waking_it() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port, Mode::SlowConnack(Duration::from_millis(2_000)));
    let pair = Pair::new(&proxy.url(), |c| Config {
        relay_poll_interval_ms: 20,
        ..c
    });
    let (relay, status) = spawn_relay_with_status(&pair.producer, &pair.cfg);
    // Commits while the relay connects wake it, as on a busy service; so do its timers.
    for i in 0..30 {
        create_item(&pair.producer, &pair.outbox, format!("slow-{i}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("relay connected", 10, || status.connected()).await;
    pair.wait_all_published().await;
    assert_eq!(
        proxy.accepted(),
        1,
        "the relay must not drop a connection it is making and open another with the same client id"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_drops_each_connection_after_connack_is_retried_with_a_growing_backoff() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port, Mode::CloseAfterConnack);
    let pair = Pair::new(&proxy.url(), |c| Config {
        reconnect_backoff_min_ms: 100,
        reconnect_backoff_max_ms: 1_000,
        ..c
    });
    let (relay, status) = spawn_relay_with_status(&pair.producer, &pair.cfg);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let attempts = proxy.accepted();
    // Waits of 50-100, 100-200, 200-400, 400-800 ms, then 500-1000 ms: at most 9 in 4 s.
    // Reset at every CONNACK, the backoff would allow about 50.
    assert!(
        (3..=10).contains(&attempts),
        "{attempts} connections in {:?}",
        started.elapsed()
    );
    let why = status.connection_error().unwrap_or_default();
    assert!(why.contains("connections in a row"), "says why: {why}");
    // Once the broker keeps the connection, everything is published.
    proxy.set_mode(Mode::Pass);
    create_item(&pair.producer, &pair.outbox, "after".into())
        .await
        .unwrap();
    pair.wait_all_published().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_while_publishing_never_make_a_puback_resolve_another_row() {
    const N: usize = 3_000;
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port, Mode::Pass);
    let mut pair = Pair::new(&proxy.url(), |c| Config {
        reconnect_backoff_min_ms: 10,
        reconnect_backoff_max_ms: 50,
        ..c
    });
    pair.consumer_cfg.broker_url = broker.url(); // only the relay's connection is cut
    pair.subscribe_then_go_offline().await;
    let (relay, status) = spawn_relay_with_status(&pair.producer, &pair.cfg);
    let writer = {
        let (db, outbox) = (pair.producer.clone(), pair.outbox.clone());
        tokio::spawn(async move {
            for chunk in 0..(N / 50) {
                create_items(&db, &outbox, &format!("cut-{chunk}"), 50).await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let mut cuts = 0;
    while !writer.is_finished() || (pair.pending() > 0 && cuts < 200) {
        tokio::time::sleep(Duration::from_millis(25)).await;
        proxy.cut();
        cuts += 1;
    }
    writer.await.unwrap();
    pair.wait_all_published().await;
    assert!(
        status.publish_retries() > 0,
        "the cuts took PUBACKs with them"
    );
    assert_eq!(
        status.unmatched_publishes(),
        0,
        "an outgoing publish of a dead connection was matched to a row of the new one ({cuts} cuts)"
    );
    let (consumer, _) = pair.spawn_consumer();
    let path = pair.consumer_path();
    wait_for("every item applied", 30, || effects(&path).len() == N).await;
    assert_exactly_once_in_order(&path, N);
    consumer.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_refused_subscription_is_reported_and_asked_for_again_on_the_same_connection() {
    if nats::missing() {
        return;
    }
    let prefix = format!("test-{}", std::process::id());
    let users = |deny: &str| {
        format!(
            "authorization {{ users: [ \
               {{ user: producer, password: pw, permissions: {{ subscribe: {{ allow: \">\", deny: [{deny}] }} }} }}, \
               {{ user: consumer, password: pw }} ] }}"
        )
    };
    let nats = Cluster::start_as(
        1,
        &users(&format!("\"{prefix}.replay.>\"")),
        Some(("consumer", "pw")),
    );
    let pair = Pair::new(&nats.url(0), |c| Config {
        mqtt_username: Some("producer".into()),
        mqtt_password: Some(Secret::new("pw")),
        ..c
    });
    create_item(&pair.producer, &pair.outbox, "one".into())
        .await
        .unwrap();
    let (relay, status) = spawn_relay_with_status(&pair.producer, &pair.cfg);
    wait_for("the refusal reported", 20, || {
        status.link().subscription_refused().is_some()
    })
    .await;
    let why = status.link().subscription_refused().unwrap();
    assert!(
        why.contains(&format!("{prefix}/replay/producer/+")),
        "{why}"
    );

    // Asked for again and again on the same connection, not only at the next connect
    // (nats-server 2.9.10 panics when it reloads `authorization` with MQTT clients
    // connected, so the permission cannot be granted here without a restart).
    let violations = || {
        nats.log(0)
            .matches(&format!("Subject \"{prefix}.replay.producer.*\""))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while violations() < 4 {
        assert!(
            Instant::now() < deadline,
            "asked {} times in 20 s",
            violations()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status.link().connections(), 1, "without reconnecting");
    assert!(status.connected());
    relay.stop().await;
    drop(nats);
}
