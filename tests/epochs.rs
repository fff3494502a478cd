//! Producer identity: a producer that starts on a new database, or on one restored from
//! an older backup, under the same `--source`. Its numbering starts again (or goes
//! back); consumers must apply every new event exactly once and record what the
//! producer no longer has, instead of taking new events for ones they applied.

#![allow(clippy::result_large_err)]

mod support;

use std::path::Path;

use edge_outbox::consumer::inbox::HandlerError;
use edge_outbox::Handlers;
use support::*;

/// Records every application by event id and item name, so that two events about
/// "item 1" of two databases stay apart.
fn seen_handlers() -> Handlers {
    Handlers::new().on("item.created", |tx, event| {
        let name = event
            .data
            .get("name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| HandlerError::Permanent("data.name missing".into()))?;
        tx.prepare_cached(
            "INSERT INTO seen (event_id, name, times) VALUES (?1, ?2, 1)
             ON CONFLICT (event_id) DO UPDATE SET times = times + 1",
        )?
        .execute(rusqlite::params![event.id, name])?;
        Ok(())
    })
}

fn create_seen_table(path: &Path) {
    inspect(path)
        .execute_batch(
            "CREATE TABLE seen (event_id TEXT PRIMARY KEY, name TEXT NOT NULL, times INTEGER NOT NULL) STRICT;",
        )
        .unwrap();
}

/// The names applied, sorted, and whether any event was applied more than once.
fn seen(path: &Path) -> (Vec<String>, i64) {
    let c = inspect(path);
    let mut s = c.prepare("SELECT name FROM seen ORDER BY name").unwrap();
    let names = s
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let twice = c
        .query_row("SELECT COUNT(*) FROM seen WHERE times != 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    (names, twice)
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn epoch_of(path: &Path) -> (String, String) {
    inspect(path)
        .query_row("SELECT epoch, reason FROM outbox_epoch", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap()
}

/// (from_position, to_position, orphaned_first, orphaned_last) of every epoch change.
fn epoch_changes(path: &Path) -> Vec<(i64, i64, Option<i64>, Option<i64>)> {
    let c = inspect(path);
    let mut s = c
        .prepare("SELECT from_position, to_position, orphaned_first, orphaned_last FROM inbox_epoch_changes ORDER BY id")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn consumer_position(path: &Path) -> (i64, String) {
    inspect(path)
        .query_row(
            "SELECT position, epoch FROM inbox_positions WHERE stream = 'items'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// A producer and a consumer that records what it applies, both running.
fn seen_pair(
    broker: &Broker,
) -> (
    Pair,
    Running,
    std::sync::Arc<edge_outbox::consumer::ConsumerStatus>,
    Running,
) {
    let p = Pair::new(&broker.url(), |c| c);
    create_seen_table(&p.consumer_path());
    let (consumer, status) =
        spawn_consumer_with(&p.consumer_db, &p.consumer_cfg, "producer", seen_handlers());
    let relay = p.spawn_relay();
    (p, consumer, status, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_on_a_new_database_is_a_new_epoch_and_its_events_are_all_applied() {
    let broker = Broker::start();
    let (p, consumer, status, relay) = seen_pair(&broker);
    create_items(&p.producer, &p.outbox, "old", 3).await;
    wait_for("3 applied", 20, || status.applied() == 3).await;
    relay.stop().await;

    // The same source on a new database: its numbering starts at 1 again. Before
    // epochs, the consumer dropped sequences 1-3 as duplicates.
    let fresh = open_db(p.dir.path(), "fresh", &p.cfg);
    let relay = spawn_relay(&fresh, &p.cfg);
    create_items(&fresh, &p.outbox, "new", 4).await;
    wait_for("the new database's 4 events applied", 30, || {
        status.applied() == 7
    })
    .await;

    let (applied, twice) = seen(&p.consumer_path());
    let mut want = names("new", 4);
    want.extend(names("old", 3));
    assert_eq!(applied, want, "every event of both databases, once");
    assert_eq!(twice, 0);
    let (fresh_epoch, reason) = epoch_of(&p.dir.path().join("fresh.db"));
    assert_eq!(reason, "created");
    assert_ne!(fresh_epoch, epoch_of(&p.producer_path()).0);
    assert_eq!(
        consumer_position(&p.consumer_path()),
        (4, fresh_epoch),
        "the position counts in the new epoch"
    );
    assert_eq!(
        epoch_changes(&p.consumer_path()),
        vec![(3, 0, Some(1), Some(3))],
        "the three events the producer no longer has are recorded as orphaned"
    );
    assert_eq!(status.epoch_changes(), 1);
    assert_eq!(status.orphaned(), 3);
    relay.stop().await;
    consumer.stop().await;
}

/// A producer that wrote 5 events, all applied, with a backup taken after the second;
/// the relay still runs. Returns the backup's path last.
async fn backup_after_two_of_five(
    broker: &Broker,
) -> (
    Pair,
    Running,
    std::sync::Arc<edge_outbox::consumer::ConsumerStatus>,
    Running,
    std::path::PathBuf,
) {
    let (p, consumer, status, relay) = seen_pair(broker);
    create_items(&p.producer, &p.outbox, "a", 2).await;
    wait_for("2 applied", 20, || status.applied() == 2).await;
    let backup = p.dir.path().join("restored.db");
    inspect(&p.producer_path())
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    create_items(&p.producer, &p.outbox, "b", 3).await;
    wait_for("5 applied", 20, || status.applied() == 5).await;
    (p, consumer, status, relay, backup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_restored_from_an_older_backup_begins_a_new_epoch_and_nothing_is_conflated() {
    let broker = Broker::start();
    let (p, consumer, status, relay, backup) = backup_after_two_of_five(&broker).await;
    // The consumer's report of position 5 is retained by the broker.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    relay.stop().await;
    let old_epoch = epoch_of(&p.producer_path()).0;

    // The backup holds 2 events and the same epoch; the consumer's retained report
    // says it applied 5 of them: the relay begins a new epoch as soon as it hears it.
    let restored = open_db(p.dir.path(), "restored", &p.cfg);
    let relay = spawn_relay(&restored, &p.cfg);
    wait_for("the restored database found rewound", 20, || {
        epoch_of(&backup).1 == "rewound"
    })
    .await;
    create_items(&restored, &p.outbox, "c", 4).await;
    wait_for("the 4 events written after the restore applied", 30, || {
        status.applied() == 9
    })
    .await;

    let (applied, twice) = seen(&p.consumer_path());
    let mut want = names("a", 2);
    want.extend(names("b", 3));
    want.extend(names("c", 4));
    assert_eq!(applied, want, "every event, once");
    assert_eq!(twice, 0);
    let (new_epoch, reason) = epoch_of(&backup);
    assert_eq!(reason, "rewound");
    assert_ne!(new_epoch, old_epoch);
    let changes = epoch_changes(&p.consumer_path());
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        changes[0],
        (5, 2, Some(3), Some(5)),
        "the new epoch shares the backup's 2 events; the 3 after them are orphaned"
    );
    assert_eq!(consumer_position(&p.consumer_path()), (6, new_epoch));
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_producer_whose_numbering_overtook_the_consumer_is_caught_by_event_ids() {
    // The backup is older than the consumer's position by 3 events, and the restored
    // producer writes 6 before it publishes: its last sequence (8) is beyond the
    // consumer's position (5), so only the event ids at 3-5 show the rewind.
    let broker = Broker::start();
    let (p, consumer, _status, relay, backup) = backup_after_two_of_five(&broker).await;
    relay.stop().await;

    let restored = open_db(p.dir.path(), "restored", &p.cfg);
    create_items(&restored, &p.outbox, "c", 6).await;
    let relay = spawn_relay(&restored, &p.cfg);
    wait_for("the 6 events written after the restore applied", 30, || {
        seen(&p.consumer_path()).0.len() == 11
    })
    .await;
    let (applied, twice) = seen(&p.consumer_path());
    let mut want = names("a", 2);
    want.extend(names("b", 3));
    want.extend(names("c", 6));
    assert_eq!(applied, want, "every event, once");
    assert_eq!(twice, 0);
    assert_eq!(epoch_of(&backup).1, "rewound");
    relay.stop().await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_epoch_change_costs_a_replay_and_the_consumer_gets_back_to_where_it_was() {
    // On an open broker: a head announcement with a made-up epoch. The consumer follows
    // it (position 0), then the real producer's next announcement (position 0 again,
    // in the real epoch): the replay brings events it applied, recognised by id at
    // their place. Before, they were dead-lettered and the stream stalled for good.
    let broker = Broker::start();
    let (p, consumer, status, relay) = seen_pair(&broker);
    create_items(&p.producer, &p.outbox, "a", 3).await;
    wait_for("3 applied", 20, || status.applied() == 3).await;
    broker.publish_raw(
        &format!("{}/heads/producer", p.cfg.topic_prefix),
        br#"{"source":"producer","epoch":"forged","streams":{"items":{"head":3,"first":1,"last":3,"base":0}}}"#,
    );
    wait_for("the forged epoch and the real one followed", 20, || {
        status.epoch_changes() >= 2
    })
    .await;
    create_items(&p.producer, &p.outbox, "b", 2).await;
    wait_for("back at 5", 20, || {
        consumer_position(&p.consumer_path()).0 == 5
    })
    .await;
    let (applied, twice) = seen(&p.consumer_path());
    let mut want = names("a", 3);
    want.extend(names("b", 2));
    assert_eq!(applied, want);
    assert_eq!(twice, 0, "nothing applied twice");
    assert_eq!(
        consumer_position(&p.consumer_path()).1,
        epoch_of(&p.producer_path()).0
    );
    assert_eq!(
        count(&p.consumer_path(), "SELECT COUNT(*) FROM dead_letters"),
        0
    );
    relay.stop().await;
    consumer.stop().await;
}
