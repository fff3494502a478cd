//! The smallest real embedding of edge-outbox: a shop that records orders, and a
//! warehouse that ships each order exactly once.
//!
//! - The shop owns `shop.db`. Each order row and its `order.placed` event are written
//!   in one transaction: both commit, or neither does.
//! - Its relay publishes the event to the MQTT broker with QoS1 and marks it published
//!   when the broker acknowledges it.
//! - The warehouse owns `warehouse.db`. Its consumer applies each `order.placed` once,
//!   in order, inserting a shipment in the same transaction that records the event in
//!   its inbox, and acknowledges to the broker only after that commit.
//!
//! Both live in one process here to keep the example short; in practice they are two
//! programs, usually on two boxes, each with its own database.
//!
//! ```text
//! mosquitto -p 1883 &
//! cargo run --example embed -- mqtt://127.0.0.1:1883 /tmp/embed
//! ```
//!
//! Run it again on the same folder: the next orders are shipped, the old ones are not
//! shipped twice. `make test` runs this program against a real Mosquitto
//! (tests/example.rs).

// The library's errors carry rusqlite's error by value (see the crate doc).
#![allow(clippy::result_large_err)]

use std::path::Path;
use std::time::{Duration, Instant};

use edge_outbox::{
    Config, Consumer, Database, HandlerError, Handlers, Migration, NewEvent, Outbox, OutboxError,
    Relay, Schema, StreamKey,
};
use tokio_util::sync::CancellationToken;

/// The shop's domain table, next to the outbox the library adds.
const SHOP: Schema = Schema {
    component: "shop",
    migrations: &[Migration {
        version: 1,
        name: "0001_orders.sql",
        sql: "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL) STRICT;",
    }],
};

/// The warehouse's domain table, next to the inbox the library adds.
const WAREHOUSE: Schema = Schema {
    component: "warehouse",
    migrations: &[Migration {
        version: 1,
        name: "0001_shipments.sql",
        sql: "CREATE TABLE shipments (order_id INTEGER NOT NULL, item TEXT NOT NULL) STRICT;",
    }],
};

/// Orders placed per run.
pub const ORDERS_PER_RUN: usize = 3;

/// What a run did, read back from the two databases at its end.
#[derive(Debug)]
pub struct Report {
    /// Every order in the shop's database.
    pub orders: Vec<i64>,
    /// Every shipment in the warehouse's database, in the order they were made.
    pub shipments: Vec<i64>,
}

/// Places [`ORDERS_PER_RUN`] orders, relays their events through the broker at
/// `broker_url`, and waits until the warehouse has shipped every order the shop holds.
pub async fn run(broker_url: &str, dir: &Path) -> Result<Report, Box<dyn std::error::Error>> {
    let shop_config = Config {
        broker_url: broker_url.to_owned(),
        source: "shop".into(),
        client_id: "shop".into(),
        ..Config::default()
    };
    let warehouse_config = Config {
        client_id: "warehouse".into(),
        source: "warehouse".into(),
        ..shop_config.clone()
    };
    shop_config.validate()?;
    warehouse_config.validate()?;

    let shop = Database::open(&shop_config.db_options(dir.join("shop.db")), &[SHOP])?;
    let warehouse = Database::open(
        &warehouse_config.db_options(dir.join("warehouse.db")),
        &[WAREHOUSE],
    )?;

    // The order and its event, in one transaction.
    let outbox = Outbox::new(&shop_config);
    for item in ["tea", "rice", "soap"].into_iter().take(ORDERS_PER_RUN) {
        let outbox = outbox.clone();
        shop.writer()
            .write(move |tx| {
                tx.execute("INSERT INTO orders (item) VALUES (?1)", [item])?;
                let id = tx.last_insert_rowid();
                outbox.enqueue(
                    tx,
                    NewEvent {
                        stream: "orders",
                        event_type: "order.placed",
                        subject: Some(&id.to_string()),
                        data: &serde_json::json!({ "order_id": id, "item": item }),
                    },
                )?;
                Ok::<_, OutboxError>(())
            })
            .await?;
    }

    // The warehouse's handler runs inside the transaction that records the event in
    // its inbox: the shipment and "order.placed #n applied" commit together.
    let handlers = Handlers::new().on("order.placed", |tx, event| {
        let order_id = event.data["order_id"]
            .as_i64()
            .ok_or_else(|| HandlerError::Permanent("order.placed without order_id".into()))?;
        let item = event.data["item"]
            .as_str()
            .ok_or_else(|| HandlerError::Permanent("order.placed without item".into()))?;
        tx.execute(
            "INSERT INTO shipments (order_id, item) VALUES (?1, ?2)",
            rusqlite::params![order_id, item],
        )?;
        Ok(())
    });
    let streams = vec![StreamKey {
        source: "shop".into(),
        stream: "orders".into(),
    }];

    let stop = CancellationToken::new();
    let relay = tokio::spawn(Relay::new(shop.clone(), shop_config)?.run(stop.clone()));
    let consumer = tokio::spawn(
        Consumer::new(warehouse.clone(), warehouse_config, streams, handlers)?.run(stop.clone()),
    );

    // Done when every order is shipped and nothing is left to publish. Events arrive in
    // the stream's order, so the last order's shipment also means that every event
    // before it (a replayed one included) has been taken in.
    let orders = ids(&shop, "SELECT id FROM orders ORDER BY id").await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shipped = ids(&warehouse, "SELECT order_id FROM shipments").await?;
        let pending = shop
            .read(|c| Ok(edge_outbox::outbox::stats(c)?.pending))
            .await?;
        if orders.last().is_none_or(|last| shipped.contains(last)) && pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after 30 s the warehouse has shipped {} of {} orders ({pending} events still to publish)",
                shipped.len(),
                orders.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    stop.cancel();
    relay.await??;
    consumer.await??;
    let shipments = ids(&warehouse, "SELECT order_id FROM shipments ORDER BY rowid").await?;
    Ok(Report { orders, shipments })
}

/// The integers the query returns, read on a pooled reader connection.
async fn ids(db: &Database, sql: &'static str) -> Result<Vec<i64>, edge_outbox::DbError> {
    db.read(move |c| {
        let mut stmt = c.prepare(sql)?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<i64>, _>>()?)
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let (Some(broker_url), Some(dir), None) = (args.next(), args.next(), args.next()) else {
        return Err(
            "usage: embed BROKER_URL DIR (e.g. embed mqtt://127.0.0.1:1883 /tmp/embed)".into(),
        );
    };
    let report = run(&broker_url, Path::new(&dir)).await?;
    if report.shipments != report.orders {
        return Err(format!(
            "orders {:?} but shipments {:?}: not each order shipped once, in order",
            report.orders, report.shipments
        )
        .into());
    }
    println!("orders {:?}: each shipped once, in order", report.orders);
    Ok(())
}
