//! The classic edge topology: each box keeps its local Mosquitto, bridged to an
//! upstream 3-node NATS cluster, with the per-direction `+` filters of
//! deploy/mosquitto/bridge.conf (without its accounts, TLS and node list: the cluster
//! here admits anyone). The
//! producer's box broker is SIGKILLed while its bridge holds a backlog it had already
//! PUBACKed: the recovery protocol (head announcements and replay requests, which the
//! bridges carry both ways) repairs what the bridge lost.

#![allow(clippy::result_large_err)] // the test domain's writes return rusqlite errors
mod support;

use std::time::Duration;

use support::nats::{self, Cluster};
use support::proxy::{Mode, Proxy};
use support::*;

/// Bridge lines for a box's Mosquitto: `out` topics go upstream, `in` come down.
fn bridge(name: &str, upstream_port: u16, out: &[String], inn: &[String]) -> String {
    let pid = std::process::id();
    let mut conf = format!(
        "connection {name}\naddress 127.0.0.1:{upstream_port}\nbridge_protocol_version mqttv311\n\
         try_private false\nnotifications false\ncleansession false\n\
         remote_clientid {name}-bridge-{pid}\nlocal_clientid {name}-bridge-local-{pid}\n\
         restart_timeout 1\nkeepalive_interval 5\n"
    );
    for t in out {
        conf.push_str(&format!("topic {t} out 1\n"));
    }
    for t in inn {
        conf.push_str(&format!("topic {t} in 1\n"));
    }
    conf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_bridge_a_box_broker_killed_with_a_backlog_in_its_bridge_is_repaired_by_replay() {
    if nats::missing() {
        return;
    }
    // The upstream cluster (deploy/nats/node.conf); box A's bridge goes to node 1
    // through a proxy (to hold its traffic), box B's to node 2.
    let upstream = Cluster::start(3, "");
    let link_a = Proxy::start(upstream.nodes[0].mqtt_port, Mode::Pass);
    let prefix = format!("test-{}", std::process::id());
    let t = |rest: &str| format!("{prefix}/{rest}");
    let box_a = Broker::start_with(&bridge(
        "box-a",
        link_a.port,
        &[t("events/producer/+"), t("heads/producer")],
        &[t("replay/producer/+"), t("positions/producer/+")],
    ));
    let box_b = Broker::start_with(&bridge(
        "box-b",
        upstream.nodes[1].mqtt_port,
        &[
            t("replay/producer/consumer"),
            t("positions/producer/consumer"),
        ],
        &[t("events/producer/+"), t("heads/producer")],
    ));
    let mut pair = Pair::new(&box_a.url(), |c| c);
    pair.consumer_cfg.broker_url = box_b.url();
    let (consumer, cstatus) = pair.spawn_consumer();
    wait_for("consumer connected", 10, || cstatus.connected()).await;
    let (relay, rstatus) = spawn_relay_with_status(&pair.producer, &pair.cfg);
    wait_for("relay connected", 10, || rstatus.connected()).await;
    // Both bridges subscribe upstream when they connect: events flow once they have.
    create_items(&pair.producer, &pair.outbox, "first", 20).await;
    all_applied(&pair, 20).await;

    // Box A's uplink holds its bytes: the box broker PUBACKs the relay and queues.
    link_a.partition(true);
    create_items(&pair.producer, &pair.outbox, "held", 100).await;
    pair.wait_all_published().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        effects(&pair.consumer_path()).len(),
        20,
        "the backlog is in the bridge"
    );

    // Box A's broker dies with it (persistence off: the worst case) and comes back.
    let mut box_a = box_a;
    box_a.kill();
    link_a.partition(false);
    link_a.cut();
    box_a.launch();
    create_items(&pair.producer, &pair.outbox, "after", 10).await;
    all_applied(&pair, 130).await;
    assert!(
        cstatus.replays_requested() > 0 && rstatus.replays_served() > 0,
        "the lost backlog came back by replay (requested {}, served {})",
        cstatus.replays_requested(),
        rstatus.replays_served()
    );
    relay.stop().await;
    consumer.stop().await;
}

async fn all_applied(pair: &Pair, n: usize) {
    let path = pair.consumer_path();
    wait_for(&format!("{n} items applied"), 60, || {
        effects(&path).len() >= n
    })
    .await;
    assert_exactly_once_in_order(&path, n);
}
