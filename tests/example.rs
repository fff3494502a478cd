//! examples/embed.rs, run against a real Mosquitto, so that the example the README
//! points at can never rot.

#![allow(clippy::result_large_err)]

mod support;

#[path = "../examples/embed.rs"]
#[allow(dead_code)] // its main() is the example's, not the test's
mod embed;

use support::Broker;

#[tokio::test(flavor = "multi_thread")]
async fn the_embedding_example_ships_each_order_exactly_once_across_restarts() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();

    let first = embed::run(&broker.url(), dir.path()).await.unwrap();
    let expected: Vec<i64> = (1..=embed::ORDERS_PER_RUN as i64).collect();
    assert_eq!(first.orders, expected);
    assert_eq!(
        first.shipments, expected,
        "each order shipped once, in order"
    );

    // A second run on the same databases (a restart), after setting the first run's
    // events back to pending, as a replay request does: the relay publishes them again,
    // and the warehouse's inbox, which has applied them, must not ship them twice.
    let mut shop = rusqlite::Connection::open(dir.path().join("shop.db")).unwrap();
    let tx = shop.transaction().unwrap();
    let reset = edge_outbox::outbox::reset_for_replay(&tx, "orders", 1).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        reset,
        embed::ORDERS_PER_RUN,
        "the first run's events are pending again"
    );
    drop(shop);
    let second = embed::run(&broker.url(), dir.path()).await.unwrap();
    let expected: Vec<i64> = (1..=2 * embed::ORDERS_PER_RUN as i64).collect();
    assert_eq!(second.orders, expected);
    assert_eq!(
        second.shipments, expected,
        "no order shipped twice after a restart"
    );
}
