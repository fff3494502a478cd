//! The outbox over a 3-node NATS cluster (JetStream + MQTT, `stream_replicas: 3`, as
//! deploy/nats/ configures it): the relay and the consumer each take the list of all
//! nodes and start on a different one. A node is SIGKILLed under load and brought
//! back, then the other service's node; a service host is partitioned from every node
//! for longer than the keep-alive. Every event is applied exactly once, in order.

#![allow(clippy::result_large_err)] // the test domain's writes return rusqlite errors
mod support;

use std::time::{Duration, Instant};

use edge_outbox::Config;
use support::nats::{self, Cluster};
use support::proxy::{Mode, Proxy};
use support::*;

/// Writes `n` items in chunks of 25, 20 ms apart (a steady load), in the background.
fn load(pair: &Pair, prefix: &str, n: usize) -> tokio::task::JoinHandle<()> {
    let (db, outbox, prefix) = (
        pair.producer.clone(),
        pair.outbox.clone(),
        prefix.to_owned(),
    );
    tokio::spawn(async move {
        for chunk in 0..n.div_ceil(25) {
            create_items(
                &db,
                &outbox,
                &format!("{prefix}-{chunk}"),
                25.min(n - chunk * 25),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// A consumer that waits a minute before it asks for a replay: within these tests'
/// time, every event must come from the broker (the cluster keeps what it PUBACKed,
/// and the consumer's session), not from a replay that repairs a loss.
fn no_replays(c: Config) -> Config {
    Config {
        consumer_gap_timeout_ms: 60_000,
        ..c
    }
}

/// SIGKILLs node `i` while 300 items are written, and waits until `link` is connected
/// to another node and the writes are done. Returns how long the move took.
async fn kill_under_load(
    pair: &Pair,
    cluster: &mut Cluster,
    i: usize,
    link: &edge_outbox::LinkStatus,
) -> Duration {
    let writes = load(pair, &format!("kill-{i}"), 300);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let killed = Instant::now();
    cluster.kill(i);
    wait_for(&format!("a move off node {i}"), 30, || {
        link.failovers() >= 1 && link.connected()
    })
    .await;
    let took = killed.elapsed();
    writes.await.unwrap();
    took
}

async fn all_applied(pair: &Pair, n: usize, secs: u64) {
    let path = pair.consumer_path();
    wait_for(&format!("{n} items applied"), secs, || {
        effects(&path).len() >= n
    })
    .await;
    assert_exactly_once_in_order(&path, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster_a_killed_node_is_failed_over_under_load_and_nothing_is_lost_or_applied_twice()
{
    if nats::missing() {
        return;
    }
    let mut cluster = Cluster::start(3, "");
    let mut pair = Pair::new(&cluster.urls_from(0), no_replays);
    pair.consumer_cfg.broker_url = cluster.urls_from(1);
    let (consumer, cstatus) = pair.spawn_consumer();
    let (relay, rstatus) = spawn_relay_with_status(&pair.producer, &pair.cfg);
    wait_for("both connected", 20, || {
        rstatus.connected() && cstatus.connected()
    })
    .await;
    let node = |s: Option<String>| s.unwrap_or_default();
    assert!(node(rstatus.link().broker()).ends_with(&cluster.nodes[0].mqtt_port.to_string()));
    load(&pair, "warm", 100).await.unwrap();
    all_applied(&pair, 100, 30).await;

    // The relay's node dies under load: the relay moves to another node.
    let relay_failover = kill_under_load(&pair, &mut cluster, 0, rstatus.link()).await;
    all_applied(&pair, 400, 60).await;

    // It comes back; then the consumer's node dies: its persistent session, replicated
    // by JetStream, resumes on the third node with what was queued meanwhile.
    cluster.launch(0);
    cluster.wait_ready(0, Duration::from_secs(60));
    let consumer_failover = kill_under_load(&pair, &mut cluster, 1, cstatus.link()).await;
    all_applied(&pair, 700, 60).await;
    eprintln!(
        "failover after SIGKILL of the node: relay {relay_failover:?}, consumer {consumer_failover:?} \
         (relay retries {}, consumer duplicates {})",
        rstatus.publish_retries(),
        cstatus.duplicates(),
    );
    assert_eq!(cstatus.replays_requested(), 0, "the cluster lost nothing");
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster_a_service_host_partitioned_longer_than_the_keep_alive_loses_nothing() {
    if nats::missing() {
        return;
    }
    let cluster = Cluster::start(3, "");
    // The consumer's host reaches every node through its own link: a proxy per node.
    let proxies: Vec<Proxy> = cluster
        .nodes
        .iter()
        .map(|n| Proxy::start(n.mqtt_port, Mode::Pass))
        .collect();
    let through = proxies.iter().map(Proxy::url).collect::<Vec<_>>().join(",");
    let keep_alive_s = 2;
    let mut pair = Pair::new(&cluster.urls_from(0), |c| Config {
        mqtt_keep_alive_s: keep_alive_s,
        ..no_replays(c)
    });
    pair.consumer_cfg.broker_url = through;
    let (consumer, cstatus) = pair.spawn_consumer();
    let (relay, rstatus) = spawn_relay_with_status(&pair.producer, &pair.cfg);
    wait_for("both connected", 20, || {
        rstatus.connected() && cstatus.connected()
    })
    .await;
    load(&pair, "before", 100).await.unwrap();
    all_applied(&pair, 100, 30).await;

    // Cut off for 4 keep-alives while the producer writes: the consumer notices, its
    // attempts time out, the cluster queues its events in its session.
    for p in &proxies {
        p.partition(true);
    }
    let writes = load(&pair, "during", 300);
    wait_for("the consumer noticed", 20, || !cstatus.connected()).await;
    tokio::time::sleep(Duration::from_secs(4 * keep_alive_s)).await;
    writes.await.unwrap();
    assert_eq!(
        effects(&pair.consumer_path()).len(),
        100,
        "nothing crossed the partition"
    );
    let healed = Instant::now();
    for p in &proxies {
        p.partition(false);
    }
    all_applied(&pair, 400, 60).await;
    eprintln!(
        "partition of {} s healed: all applied {:?} later (consumer connections {}, duplicates {})",
        4 * keep_alive_s,
        healed.elapsed(),
        cstatus.link().connections(),
        cstatus.duplicates()
    );
    assert_eq!(
        cstatus.replays_requested(),
        0,
        "the session kept every event"
    );
    relay.stop().await;
    consumer.stop().await;
}
