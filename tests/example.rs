//! examples/embed.rs, run against a real Mosquitto, so that the example the README
//! points at can never rot.

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

    // A second run on the same databases (a restart): the new orders are shipped and
    // the old ones, already in the warehouse's inbox, are not shipped again.
    let second = embed::run(&broker.url(), dir.path()).await.unwrap();
    let expected: Vec<i64> = (1..=2 * embed::ORDERS_PER_RUN as i64).collect();
    assert_eq!(second.orders, expected);
    assert_eq!(
        second.shipments, expected,
        "no order shipped twice after a restart"
    );
}
