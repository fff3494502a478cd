//! `make bench`: the outbox against the raw limits of the disk and the broker,
//! each measured in the same run. `BENCH=full` for longer runs (100,000 events).
//!
//! Every figure is the median of several runs with its spread, next to a baseline
//! measured in the same run on the same machine (it is shared and noisy: absolute
//! numbers mean little, ratios mean more). A run that loses or duplicates an event
//! panics instead of printing a figure.
#![allow(clippy::result_large_err)]

// The library's test support (real brokers, databases), shared rather than copied.
#[path = "../../tests/support/mod.rs"]
mod support;

mod scale;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_outbox::{Config, Consumer, NewEvent, Outbox, Relay};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use serde_json::{json, Value};
use support::{free_port, Broker};

/// Payload of every benchmark event: about 300 bytes of envelope, a typical small event.
fn event_data(i: usize) -> Value {
    json!({ "id": i, "name": "x".repeat(100) })
}

struct Plan {
    /// "quick", "full" or "scale".
    mode: &'static str,
    runs: usize,
    events: usize,
    http_requests: usize,
    http_requests_fsync_bound: usize,
    latency_secs: u64,
}

/// Median and spread of one figure.
struct Figure(Vec<f64>);

impl Figure {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    fn spread(&self) -> String {
        let (lo, hi) = self
            .0
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.0}-{hi:.0}")
    }
}

fn main() {
    let mode = std::env::var("BENCH").unwrap_or_default();
    if mode == "scale" {
        return main_scale();
    }
    let full = mode == "full";
    let plan = if full {
        Plan {
            mode: "full",
            runs: 5,
            events: 100_000,
            http_requests: 40_000,
            http_requests_fsync_bound: 4_000,
            latency_secs: 15,
        }
    } else {
        Plan {
            mode: "quick",
            runs: 3,
            events: 30_000,
            http_requests: 12_000,
            http_requests_fsync_bound: 1_500,
            latency_secs: 5,
        }
    };
    edge_box::service::init_tracing(edge_box::service::LogFormat::Text);
    let started = Instant::now();
    let broker = Broker::start_with(&repo_broker_settings());
    let dir = tempfile::tempdir().unwrap();
    print_setup(&plan, &broker);

    let payload_len = envelope_len();
    let mut rows: Vec<[String; 5]> = Vec::new();
    // Tables printed after the figures.
    let mut notes: Vec<String> = Vec::new();

    // BENCH_ONLY=drain,e2e,http,latency,replay,cluster runs only those figures (when
    // chasing one).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |f: &str| only.is_empty() || only.split(',').any(|o| o == f);

    // 1. Relay drain vs a bare publisher, and 2. end to end with FULL durability on
    // both sides. The runs alternate (bare, drain, end to end, bare, ...) so that a
    // change in the shared machine's load hits the figure and its baseline alike.
    if want("drain") || want("e2e") {
        let (mut bare, mut drain, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        let mut through = Vec::new();
        let (mut drain_busy, mut e2e_busy) = (Vec::new(), Vec::new());
        for r in 0..plan.runs {
            bare.push(bare_publisher(&broker, plan.events, payload_len));
            if want("drain") {
                let (rate, busy) = relay_drain(&broker, dir.path(), r, plan.events);
                drain.push(rate);
                drain_busy.push(busy);
            }
            if want("e2e") {
                through.push(bare_through(&broker, plan.events, payload_len));
                let (rate, busy) = end_to_end(&broker, dir.path(), r, plan.events);
                e2e.push(rate);
                e2e_busy.push(busy);
            }
        }
        for (what, busy) in [("relay drain", drain_busy), ("end to end", e2e_busy)] {
            if !busy.is_empty() {
                let median = Figure(busy).median() * 100.0;
                notes.push(format!(
                    "{what}: the machine was {median:.0}% busy (median of the runs)"
                ));
            }
        }
        let bare = Figure(bare);
        if want("drain") {
            rows.push(row(
                "relay drain: pending rows -> all PUBACKed and marked, events/s",
                &Figure(drain),
                "bare rumqttc QoS1 publisher, 100 in flight",
                &bare,
                Some(0.9),
            ));
        }
        if want("e2e") {
            let e2e = Figure(e2e);
            rows.push(row(
                "end to end: backlog -> all applied by the consumer, events/s",
                &e2e,
                "the same bare publisher",
                &bare,
                Some(0.5),
            ));
            // Not a target of its own: how close the figure is to what the two MQTT
            // hops alone allow on this machine.
            rows.push(row(
                "end to end (as above)",
                &e2e,
                "bare publisher -> broker -> bare QoS1 subscriber, no databases (the MQTT path alone)",
                &Figure(through),
                None,
            ));
        }
    }

    // 3 and 4. POST /users, 64 connections.
    if want("http") {
        let mut cpu_rows = String::from(
            "\n| POST /users, CPU (median of the runs) | user-service per request | \
             transaction-service per request | machine busy during the load | \
             user-service disk writes per request |\n|---|---|---|---|---|\n",
        );
        // The modes alternate run by run, like the drains.
        let modes = [
            (HttpMode::Full, plan.http_requests),
            (HttpMode::Off, plan.http_requests),
            (
                HttpMode::OneWritePerTransaction,
                plan.http_requests_fsync_bound,
            ),
        ];
        let mut runs: [Vec<HttpRun>; 3] = Default::default();
        for r in 0..plan.runs {
            for (i, (mode, n)) in modes.iter().enumerate() {
                runs[i].push(post_users(&broker, dir.path(), r, *mode, *n));
            }
        }
        let [full_rate, off_rate, single] = [0, 1, 2].map(|i| {
            let median = |f: fn(&HttpRun) -> f64| Figure(runs[i].iter().map(f).collect()).median();
            cpu_rows.push_str(&format!(
                "| {:?} | {:.0} µs | {:.0} µs | {:.0}% | {:.1} KiB |\n",
                modes[i].0,
                median(|r| r.user_cpu_us),
                median(|r| r.ledger_cpu_us),
                median(|r| r.busy) * 100.0,
                median(|r| r.user_disk_bytes) / 1024.0
            ));
            Figure(runs[i].iter().map(|r| r.rate).collect())
        });
        notes.push(cpu_rows);
        rows.push(row(
            "POST /users, 64 keep-alive connections, FULL, requests/s",
            &full_rate,
            "same with synchronous=OFF",
            &off_rate,
            Some(0.5),
        ));
        // 10x the fsync-bound rate, or the OFF rate when that is lower.
        let target = (off_rate.median() / single.median()).min(10.0);
        rows.push(row(
            "POST /users, 64 connections, FULL (group commit), requests/s",
            &full_rate,
            "one write per transaction at FULL (fsync-bound; target: 10x it or the OFF rate, whichever is lower)",
            &single,
            Some(target),
        ));
    }

    // 8. End to end over a 3-node NATS cluster (deploy/nats/node.conf, replicas 3), the
    // producer on one node and the consumer on another, against the box's Mosquitto.
    if want("cluster") {
        if support::nats::available() {
            let cluster = support::nats::Cluster::start(3, "");
            let (from, to) = (cluster.urls_from(0), cluster.urls_from(1));
            let n = plan.events / 3;
            let node = |i: usize| ("127.0.0.1".to_owned(), cluster.nodes[i].mqtt_port);
            let (mut local, mut clustered, mut bare) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..plan.runs {
                let url = broker.url();
                bare.push(bare_through_on(node(0), node(1), n, payload_len));
                clustered.push(end_to_end_on((&from, &to), dir.path(), &format!("n{r}"), n).0);
                local.push(end_to_end_on((&url, &url), dir.path(), &format!("m{r}"), n).0);
            }
            let clustered = Figure(clustered);
            rows.push(row(
                &format!("end to end over a 3-node NATS cluster (producer on node A, consumer on B), {n} events, events/s"),
                &clustered,
                "bare publisher on A -> cluster -> bare QoS1 subscriber on B (the cluster's MQTT path alone)",
                &Figure(bare),
                Some(0.5),
            ));
            rows.push(row(
                "end to end over the NATS cluster (as above)",
                &clustered,
                "end to end over the box's Mosquitto",
                &Figure(local),
                None,
            ));
        } else {
            notes.push("SKIPPED the NATS cluster figure: nats-server is not installed (apt-get install nats-server)".into());
        }
    }

    // 7. Live events while a consumer's replay of the whole history goes out.
    if want("replay") {
        notes.push(live_beside_replay(&broker, dir.path(), 200_000));
    }

    // 5. Latency at a steady 1,000 requests/s, and 6. the idle service.
    let (lat, idle) = if want("latency") {
        latency_and_idle(&broker, dir.path(), plan.latency_secs)
    } else {
        Default::default()
    };
    println!("\n{}", render(&rows));
    for note in &notes {
        println!("{note}");
    }
    println!("{lat}");
    println!("{idle}");
    println!(
        "\nbench: done in {:.0} s ({} mode)",
        started.elapsed().as_secs_f64(),
        plan.mode
    );
}

/// `BENCH=scale`: the figures of the scale module, with the setup printed first.
fn main_scale() {
    edge_box::service::init_tracing(edge_box::service::LogFormat::Text);
    let started = Instant::now();
    let broker = Broker::start_with(&repo_broker_settings());
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan {
        mode: "scale",
        runs: 2,
        events: 0,
        http_requests: 19_200,
        http_requests_fsync_bound: 0,
        latency_secs: 0,
    };
    print_setup(&plan, &broker);
    let scale = scale::Scale::from_env();
    scale.print();
    // BENCH_ONLY=backlog,history,streams,disk runs only those figures.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |f: &str| only.is_empty() || only.split(',').any(|o| o == f);
    let (mut rows, mut notes) = (Vec::new(), Vec::new());
    scale::run(&scale, &broker, dir.path(), &want, &mut rows, &mut notes);
    println!("\n{}", render(&rows));
    for note in &notes {
        println!("{note}\n");
    }
    println!(
        "bench: done in {:.0} s (scale mode)",
        started.elapsed().as_secs_f64()
    );
}

/// A table row; `target` is the lowest ratio of the medians that meets the target
/// (`None`: a row that explains another and has no target of its own).
fn row(
    what: &str,
    value: &Figure,
    baseline: &str,
    base: &Figure,
    target: Option<f64>,
) -> [String; 5] {
    let ratio = value.median() / base.median();
    let verdict = match target {
        None => "(no target)".to_string(),
        Some(t) if ratio >= t => format!(">= {t:.2}x: met"),
        Some(t) => format!(">= {t:.2}x: MISSED by {:.0}%", (1.0 - ratio / t) * 100.0),
    };
    [
        what.into(),
        format!("{:.0} ({})", value.median(), value.spread()),
        format!("{baseline}: {:.0} ({})", base.median(), base.spread()),
        format!("{ratio:.2}x"),
        verdict,
    ]
}

fn render(rows: &[[String; 5]]) -> String {
    let mut out = String::from("| figure | median (spread) | baseline in the same run: median (spread) | ratio | target |\n|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r[0], r[1], r[2], r[3], r[4]
        ));
    }
    out
}

/// The lines of the repo's mosquitto.conf that shape throughput, for the bench broker
/// (which has its own listener and no persistence). The file is at the workspace root,
/// one level above this package.
fn repo_broker_settings() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mosquitto.conf");
    let conf = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    conf.lines()
        .filter(|l| {
            [
                "max_queued_messages",
                "max_queued_bytes",
                "max_inflight_messages",
                "max_packet_size",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn print_setup(plan: &Plan, broker: &Broker) {
    let mosquitto = Command::new("/usr/sbin/mosquitto")
        .arg("-h")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    println!("bench setup:");
    println!(
        "  mode: {} ({} runs per figure, {} events per drain, {} requests per HTTP run)",
        plan.mode, plan.runs, plan.events, plan.http_requests
    );
    println!(
        "  machine: {} cores; broker: {mosquitto} on {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        broker.url()
    );
    println!(
        "  broker settings from mosquitto.conf: {}",
        repo_broker_settings().replace('\n', ", ")
    );
    println!(
        "  SQLite: WAL, synchronous=FULL unless stated, group commit up to 512 requests, {} B pages, checkpoint every {} MiB of WAL; rusqlite 0.40 (bundled)",
        edge_outbox::storage::DEFAULT_PAGE_SIZE,
        edge_outbox::storage::DEFAULT_CHECKPOINT_BYTES >> 20
    );
    println!("  MQTT: rumqttc 0.25, QoS1, 100 in flight (relay and bare publisher), TCP_NODELAY");
    println!(
        "  event envelope: {} bytes; HTTP load: 64 threads, one keep-alive connection each",
        envelope_len()
    );
}

fn bench_config(broker_url: &str, name: &str) -> Config {
    Config {
        broker_url: broker_url.to_owned(),
        client_id: format!("bench-{name}-{}", std::process::id()),
        source: "producer".into(),
        topic_prefix: format!("bench-{}", std::process::id()),
        ..Config::default()
    }
}

fn envelope_len() -> usize {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::default();
    let db = support::open_db(dir.path(), "len", &cfg);
    fill(&db, &Outbox::new(&cfg), 1);
    support::count(
        &dir.path().join("len.db"),
        "SELECT length(payload) FROM outbox",
    ) as usize
}

/// `n` pending events in the outbox, in transactions of 1,000.
fn fill(db: &edge_outbox::Database, outbox: &Outbox, n: usize) {
    for start in (0..n).step_by(1_000) {
        let o = outbox.clone();
        let end = (start + 1_000).min(n);
        db.writer()
            .write_blocking(move |tx| {
                for i in start..end {
                    tx.execute(
                        "INSERT INTO items (id, name) VALUES (?1, ?2)",
                        rusqlite::params![i as i64 + 1, format!("item-{i}")],
                    )?;
                    let data = event_data(i + 1);
                    o.enqueue(
                        tx,
                        NewEvent {
                            stream: support::STREAM,
                            event_type: "item.created",
                            subject: None,
                            data: &data,
                        },
                    )?;
                }
                Ok::<_, edge_outbox::outbox::OutboxError>(())
            })
            .unwrap();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A bare rumqttc client with the relay's MQTT settings (100 in flight, TCP_NODELAY).
fn bare_client(broker: &(String, u16), role: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(
        format!("bench-bare-{role}-{}", std::process::id()),
        broker.0.clone(),
        broker.1,
    );
    opts.set_inflight(100)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_request_channel_capacity(1_000);
    let (client, mut eventloop) = AsyncClient::new(opts, 1_000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Publishes `n` messages of `payload_len` bytes to `topic` with QoS1 and waits for
/// every PUBACK. Returns the time from the CONNACK to the last PUBACK.
async fn publish_all(
    broker: (String, u16),
    topic: String,
    n: usize,
    payload_len: usize,
) -> Duration {
    let (client, mut eventloop) = bare_client(&broker, "pub");
    let payload = vec![b'x'; payload_len];
    let publisher = tokio::spawn(async move {
        for _ in 0..n {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let mut started = None;
    while acked < n {
        match eventloop.poll().await.expect("bare publisher connection") {
            Event::Incoming(Packet::ConnAck(_)) => started = Some(Instant::now()),
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            _ => {}
        }
    }
    let elapsed = started.unwrap().elapsed();
    let _ = publisher.await;
    elapsed
}

/// A bare rumqttc QoS1 publisher with 100 in flight: publishes `n` messages of
/// `payload_len` bytes and waits for every PUBACK. Events/s.
fn bare_publisher(broker: &Broker, n: usize, payload_len: usize) -> f64 {
    let topic = format!("bench-{}/bare", std::process::id());
    let address = (broker.host.clone(), broker.port);
    let elapsed = runtime().block_on(publish_all(address, topic, n, payload_len));
    n as f64 / elapsed.as_secs_f64()
}

/// The MQTT path of the end-to-end figure without any database: the bare publisher ->
/// broker -> a bare QoS1 subscriber that acknowledges each message on receipt (rumqttc
/// does it). Events/s until the subscriber has received all `n`.
fn bare_through(broker: &Broker, n: usize, payload_len: usize) -> f64 {
    let address = (broker.host.clone(), broker.port);
    bare_through_on(address.clone(), address, n, payload_len)
}

/// [`bare_through`] with the publisher on `from` and the subscriber on `to`.
fn bare_through_on(from: (String, u16), to: (String, u16), n: usize, payload_len: usize) -> f64 {
    runtime().block_on(async {
        let topic = format!("bench-{}/through", std::process::id());
        let (subscriber, mut eventloop) = bare_client(&to, "sub");
        subscriber
            .subscribe(topic.clone(), QoS::AtLeastOnce)
            .await
            .unwrap();
        while !matches!(
            eventloop.poll().await.expect("bare subscriber connection"),
            Event::Incoming(Packet::SubAck(_))
        ) {}
        let started = Instant::now();
        let publisher = tokio::spawn(publish_all(from, topic, n, payload_len));
        let mut received = 0;
        while received < n {
            if let Event::Incoming(Packet::Publish(_)) =
                eventloop.poll().await.expect("bare subscriber connection")
            {
                received += 1;
            }
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        publisher.await.unwrap();
        rate
    })
}

/// `n` pending rows -> all PUBACKed and marked. Events/s.
fn relay_drain(broker: &Broker, dir: &Path, run: usize, n: usize) -> (f64, f64) {
    let cfg = bench_config(&broker.url(), &format!("drain{run}"));
    let db = support::open_db(dir, &format!("drain{run}"), &cfg);
    fill(&db, &Outbox::new(&cfg), n);
    let (rate, busy) = runtime().block_on(async {
        let relay = Relay::new(db.clone(), cfg).unwrap();
        let status = relay.status();
        let cancel = tokio_util::sync::CancellationToken::new();
        let started = Instant::now();
        let cpu = machine_cpu();
        let task = tokio::spawn(relay.run(cancel.clone()));
        wait_for_count("relay drain", n, started, || status.marked_published()).await;
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let busy = busy_since(cpu);
        cancel.cancel();
        task.await.unwrap().unwrap();
        (rate, busy)
    });
    let pending = support::pending(&dir.join(format!("drain{run}.db")));
    assert_eq!(pending, 0, "relay drain left rows pending");
    (rate, busy)
}

/// Enqueues one event on the stream "live" every 5 ms while `until` is false (at most
/// 20,000); returns their outbox row ids.
async fn enqueue_live(
    db: &edge_outbox::Database,
    outbox: &Outbox,
    until: impl Fn() -> bool,
) -> Vec<i64> {
    let mut ids = Vec::new();
    while !until() && ids.len() < 20_000 {
        let o = outbox.clone();
        let id = db
            .writer()
            .write(move |tx| {
                let data = event_data(0);
                let e = o.enqueue(
                    tx,
                    NewEvent {
                        stream: "live",
                        event_type: "item.created",
                        subject: None,
                        data: &data,
                    },
                )?;
                Ok::<_, edge_outbox::outbox::OutboxError>(e.row_id)
            })
            .await
            .unwrap();
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ids
}

/// Commit -> marked published (after its PUBACK) of the given rows, in ms, sorted.
fn commit_to_marked(path: &Path, ids: &[i64]) -> Vec<f64> {
    let c = support::inspect(path);
    let mut v: Vec<f64> = ids
        .iter()
        .map(|id| {
            c.query_row(
                "SELECT published_at_ms - created_at_ms FROM outbox WHERE id = ?1 AND published_at_ms IS NOT NULL",
                [id],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or_else(|_| panic!("live row {id} was never published")) as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// `history` published events are replayed to a consumer that asked from sequence 1,
/// while live events of another stream are written every 5 ms: their commit -> marked
/// published (an upper bound of commit -> PUBACK), against the same without a replay.
fn live_beside_replay(broker: &Broker, dir: &Path, history: usize) -> String {
    let cfg = bench_config(&broker.url(), "replay");
    let db = support::open_db(dir, "replay", &cfg);
    let path = dir.join("replay.db");
    let outbox = Outbox::new(&cfg);
    fill(&db, &outbox, history);
    runtime().block_on(async {
        let relay = Relay::new(db.clone(), cfg.clone()).unwrap();
        let status = relay.status();
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(relay.run(cancel.clone()));
        wait_for_count("history published", history, Instant::now(), || status.marked_published()).await;

        // Without a replay: 1 s of live events.
        let t0 = Instant::now();
        let baseline = enqueue_live(&db, &outbox, || t0.elapsed() > Duration::from_secs(1)).await;
        let base_total = history + baseline.len();
        wait_for_count("baseline published", base_total, Instant::now(), || status.marked_published()).await;

        // A consumer asks for the whole history again.
        let (client, mut eventloop) = bare_client(&(broker.host.clone(), broker.port), "replay");
        let topics = edge_outbox::protocol::Topics::new(&cfg.topic_prefix);
        let request = json!({ "consumer": "bench-consumer", "stream": support::STREAM, "from_seq": 1 });
        client
            .publish(topics.replay(&cfg.source, "bench-consumer"), QoS::AtLeastOnce, false, request.to_string())
            .await
            .unwrap();
        let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        let replay_started = Instant::now();
        wait_for_count("replay served", 1, replay_started, || status.replays_served()).await;
        let marked = status.clone();
        let during = enqueue_live(&db, &outbox, move || {
            marked.marked_published() as usize >= base_total + history
        })
        .await;
        wait_for_count("replay and live published", base_total + history + during.len(), replay_started, || {
            status.marked_published()
        })
        .await;
        let replay_secs = replay_started.elapsed().as_secs_f64();
        poller.abort();
        cancel.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(support::pending(&path), 0, "replay left rows pending");
        let (b, d) = (commit_to_marked(&path, &baseline), commit_to_marked(&path, &during));
        let q = |v: &[f64], p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        let verdict = if q(&d, 0.99) < 100.0 { "meets" } else { "MISSES" };
        format!(
            "live events beside a replay of {history} events ({replay_secs:.1} s; one live event every 5 ms on another stream):\n  \
             commit -> marked published (after PUBACK) during the replay: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} events; {verdict} the target p99 < 100 ms)\n  \
             baseline, the same without a replay:                       p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} events)",
            q(&d, 0.5), q(&d, 0.99), q(&d, 1.0), d.len(),
            q(&b, 0.5), q(&b, 0.99), q(&b, 1.0), b.len(),
        )
    })
}

/// Polls `count` every millisecond (the resolution of the timed figures) until it
/// reaches `n`; fails the benchmark 120 s after `started`.
async fn wait_for_count(what: &str, n: usize, started: Instant, count: impl Fn() -> u64) {
    while count() < n as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what} did not finish: {} of {n}",
            count()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `n` pending rows -> all applied by a consumer, FULL durability on both sides.
fn end_to_end(broker: &Broker, dir: &Path, run: usize, n: usize) -> (f64, f64) {
    let url = broker.url();
    end_to_end_on((&url, &url), dir, &format!("{run}"), n)
}

/// [`end_to_end`] with the producer on `urls.0` and the consumer on `urls.1`.
fn end_to_end_on(urls: (&str, &str), dir: &Path, run: &str, n: usize) -> (f64, f64) {
    let cfg = bench_config(urls.0, &format!("e2e-producer{run}"));
    let consumer_cfg = bench_config(urls.1, &format!("e2e-consumer{run}"));
    let producer = support::open_db(dir, &format!("e2e-p{run}"), &cfg);
    let consumer_db = support::open_db(dir, &format!("e2e-c{run}"), &consumer_cfg);
    fill(&producer, &Outbox::new(&cfg), n);
    let (rate, busy) = runtime().block_on(async {
        let consumer = Consumer::new(
            consumer_db.clone(),
            consumer_cfg,
            vec![support::stream_key("producer")],
            support::handlers(),
        )
        .unwrap();
        let status = consumer.status();
        let cancel = tokio_util::sync::CancellationToken::new();
        let consumer_task = tokio::spawn(consumer.run(cancel.clone()));
        while !status.connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // the SUBACK
        let relay = Relay::new(producer.clone(), cfg).unwrap();
        let started = Instant::now();
        let cpu = machine_cpu();
        let relay_task = tokio::spawn(relay.run(cancel.clone()));
        wait_for_count("end to end", n, started, || status.applied()).await;
        let rate = n as f64 / started.elapsed().as_secs_f64();
        let busy = busy_since(cpu);
        cancel.cancel();
        relay_task.await.unwrap().unwrap();
        consumer_task.await.unwrap().unwrap();
        (rate, busy)
    });
    // Loses or duplicates nothing, or fails loudly.
    support::assert_exactly_once_in_order(&dir.join(format!("e2e-c{run}.db")), n);
    (rate, busy)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum HttpMode {
    Full,
    Off,
    OneWritePerTransaction,
}

/// Both services as release processes with their own databases.
struct Services {
    children: Vec<Child>,
    pids: Vec<u32>,
    users: String,
    users_db: PathBuf,
    ledger_db: PathBuf,
    /// Spawn -> listening, per service.
    startup: Vec<Duration>,
    ledger: String,
    logs: Vec<PathBuf>,
}

impl Services {
    fn start(broker: &Broker, dir: &Path, tag: &str, extra: &[&str]) -> Services {
        Services::start_on(&broker.url(), dir, tag, extra)
    }

    /// [`Services::start`] on the broker at `broker_url` (e.g. through a proxy).
    fn start_on(broker_url: &str, dir: &Path, tag: &str, extra: &[&str]) -> Services {
        let log = std::env::var("BENCH_SERVICE_LOG").unwrap_or_else(|_| "warn".into());
        Services::start_logged(broker_url, dir, tag, extra, &log)
    }

    /// [`Services::start_on`], logging what `rust_log` (RUST_LOG) asks for.
    fn start_logged(
        broker_url: &str,
        dir: &Path,
        tag: &str,
        extra: &[&str],
        rust_log: &str,
    ) -> Services {
        let prefix = format!("bench-{}-{tag}", std::process::id());
        let mut children = Vec::new();
        let mut bases = Vec::new();
        let mut logs = Vec::new();
        let mut startup = Vec::new();
        for (name, exe) in [
            ("user-service", env!("CARGO_BIN_EXE_user-service")),
            (
                "transaction-service",
                env!("CARGO_BIN_EXE_transaction-service"),
            ),
        ] {
            let port = free_port();
            let spawned = Instant::now();
            let child = Command::new(exe)
                .args([
                    "--db",
                    dir.join(format!("{tag}-{name}.db")).to_str().unwrap(),
                ])
                .args([
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--broker",
                    broker_url,
                    "--topic-prefix",
                    &prefix,
                ])
                .args(["--client-id", &format!("{prefix}-{name}")])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("{tag}-{name}.log"))).unwrap())
                .env("RUST_LOG", rust_log)
                .spawn()
                .unwrap();
            children.push(child);
            logs.push(dir.join(format!("{tag}-{name}.log")));
            let deadline = Instant::now() + Duration::from_secs(20);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "{name} did not listen");
                std::thread::sleep(Duration::from_millis(2));
            }
            startup.push(spawned.elapsed());
            bases.push(format!("http://127.0.0.1:{port}"));
        }
        let pids = children.iter().map(Child::id).collect();
        Services {
            children,
            pids,
            users: bases[0].clone(),
            ledger: bases[1].clone(),
            users_db: dir.join(format!("{tag}-user-service.db")),
            ledger_db: dir.join(format!("{tag}-transaction-service.db")),
            startup,
            logs,
        }
    }

    /// Waits until transaction-service applied `n` user.created, then checks exactly once.
    fn assert_all_applied(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s: Value = ureq::get(&format!("{}/outbox", self.ledger))
                .call()
                .unwrap()
                .into_json()
                .unwrap();
            let position = s["consumer"]["streams"]
                .as_object()
                .and_then(|m| m.values().next())
                .and_then(|v| v["position"].as_u64())
                .unwrap_or(0);
            if position >= n as u64 {
                break;
            }
            if Instant::now() > deadline {
                for base in [&self.users, &self.ledger] {
                    let status = ureq::get(&format!("{base}/outbox"))
                        .call()
                        .map(|r| r.into_string().unwrap_or_default());
                    eprintln!("{base}/outbox: {status:?}");
                }
                for log in &self.logs {
                    let text = std::fs::read_to_string(log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!(
                        "last lines of {}:\n{}",
                        log.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                panic!("transaction-service applied {position} of {n} user.created events");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let applied = support::count(
            &self.ledger_db,
            "SELECT COUNT(*) FROM inbox WHERE event_type = 'user.created' AND outcome = 'applied'",
        );
        let known = support::count(&self.ledger_db, "SELECT COUNT(*) FROM known_users");
        assert_eq!(
            (applied, known),
            (n as i64, n as i64),
            "every acknowledged POST /users must produce exactly one applied event"
        );
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }
}

/// One run of POST /users: requests/s, and where the CPU went.
struct HttpRun {
    rate: f64,
    /// CPU time of user-service per request, during the load.
    user_cpu_us: f64,
    /// CPU time of transaction-service per request, until it applied every event.
    ledger_cpu_us: f64,
    /// Share of the machine's CPU time that was busy during the load.
    busy: f64,
    /// Bytes user-service sent to the disk per request (its /proc/PID/io write_bytes).
    user_disk_bytes: f64,
    /// Bytes transaction-service sent to the disk per applied user.created, from the
    /// start of the load until it applied every one.
    ledger_disk_bytes: f64,
    /// Bytes both services sent to the disk per request, from the start of the load
    /// until transaction-service applied every event and one more second (user-service
    /// applying the welcome credits).
    box_disk_bytes: f64,
}

/// POST /users from 64 keep-alive connections, `n` requests in all; checks that every
/// 201 produced exactly one applied event.
fn post_users(broker: &Broker, dir: &Path, run: usize, mode: HttpMode, n: usize) -> HttpRun {
    let extra: &[&str] = match mode {
        HttpMode::Full => &[],
        HttpMode::Off => &["--db-synchronous", "off"],
        HttpMode::OneWritePerTransaction => &["--db-write-batch-max", "1"],
    };
    let tag = format!("http-{mode:?}-{run}").to_lowercase();
    let services = Services::start(broker, dir, &tag, extra);
    let url = format!("{}/users", services.users);
    let per = n / 64;
    let cpu = |i: usize| cpu_seconds(services.pids[i]);
    let (user_cpu, ledger_cpu, machine) = (cpu(0), cpu(1), machine_cpu());
    let disk = |i: usize| disk_write_bytes(services.pids[i]);
    let (user_disk, ledger_disk) = (disk(0), disk(1));
    let (rate, _) = post_load(&url, &tag, per * 64);
    let user_cpu = cpu(0) - user_cpu;
    let user_disk_load = disk(0) - user_disk;
    let busy = busy_since(machine);
    services.assert_all_applied(per * 64);
    let ledger_disk_applied = disk(1) - ledger_disk;
    std::thread::sleep(Duration::from_secs(1));
    let box_disk = disk(0) - user_disk + disk(1) - ledger_disk;
    let per_request = |x: f64| x / (per * 64) as f64;
    HttpRun {
        rate,
        user_cpu_us: per_request(user_cpu * 1e6),
        ledger_cpu_us: per_request((cpu(1) - ledger_cpu) * 1e6),
        busy,
        user_disk_bytes: per_request(user_disk_load),
        ledger_disk_bytes: per_request(ledger_disk_applied),
        box_disk_bytes: per_request(box_disk),
    }
}

/// `n` POST /users (a multiple of 64) from 64 keep-alive connections: requests/s, and
/// each request's (time answered, latency in µs).
fn post_load(url: &str, tag: &str, n: usize) -> (f64, Vec<(Instant, f64)>) {
    let per = n / 64;
    let started = Instant::now();
    let answered: Vec<(Instant, f64)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..64)
            .map(|t| {
                s.spawn(move || {
                    let agent = ureq::AgentBuilder::new().max_idle_connections_per_host(1).build();
                    let mut times = Vec::with_capacity(per);
                    for i in 0..per {
                        let body = json!({ "name": "Bench User", "email": format!("{tag}-{t}-{i}@example.com") });
                        let sent = Instant::now();
                        let res = agent.post(url).send_json(body).expect("POST /users");
                        assert_eq!(res.status(), 201);
                        let now = Instant::now();
                        times.push((now, (now - sent).as_secs_f64() * 1e6));
                    }
                    times
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    (
        (per * 64) as f64 / started.elapsed().as_secs_f64(),
        answered,
    )
}

/// Bytes a process has caused to be written to storage so far.
fn disk_write_bytes(pid: u32) -> f64 {
    proc_field(pid, "io")
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The share of the machine's CPU time that was busy since `start` (a [`machine_cpu`]).
fn busy_since(start: (f64, f64)) -> f64 {
    let (busy, total) = machine_cpu();
    (busy - start.0) / (total - start.1).max(1.0)
}

/// Busy and total CPU time of the whole machine so far (jiffies, from /proc/stat).
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// p50 and p99 of `v` (in microseconds) as milliseconds.
fn percentiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize] / 1_000.0;
    (at(0.50), at(0.99))
}

/// A steady 1,000 requests/s for `secs`: 201 -> user.created on the broker (the
/// commit -> PUBACK path) and 201 -> transaction-service's welcome-credit event on the
/// broker (user.created applied by transaction-service, plus its own relay hop: an
/// upper bound of "applied"). Then the idle cost of both services.
fn latency_and_idle(broker: &Broker, dir: &Path, secs: u64) -> (String, String) {
    let services = Services::start(broker, dir, "latency", &[]);
    let prefix = format!("bench-{}-latency", std::process::id());
    let seen: Arc<Mutex<HashMap<(bool, String), Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let subscriber = {
        let (seen, stop, host, port) =
            (seen.clone(), stop.clone(), broker.host.clone(), broker.port);
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut opts = MqttOptions::new(format!("{prefix}-watcher"), host, port);
                opts.set_max_packet_size(1 << 20, 1 << 20);
                let (client, mut eventloop) = AsyncClient::new(opts, 100);
                let mut net = NetworkOptions::new();
                net.set_tcp_nodelay(true);
                eventloop.set_network_options(net);
                client
                    .subscribe(format!("{prefix}/events/#"), QoS::AtMostOnce)
                    .await
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                        tokio::time::timeout(Duration::from_millis(100), eventloop.poll()).await
                    {
                        let now = Instant::now();
                        let e: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let welcome = e["type"] == "transaction.created";
                        let user = if welcome {
                            e["data"]["user_id"].as_str()
                        } else {
                            e["data"]["id"].as_str()
                        };
                        if let Some(user) = user.map(str::to_owned) {
                            seen.lock().unwrap().insert((welcome, user), now);
                        }
                    }
                }
            })
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let sent: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let threads = 16;
    let total = 1_000 * secs as usize / threads * threads;
    let start = Instant::now() + Duration::from_millis(100);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (url, sent) = (format!("{}/users", services.users), sent.clone());
            s.spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                // Open loop: request k of this thread is due at start + (k * threads + t) ms.
                for k in 0..total / threads {
                    let due = start + Duration::from_millis((k * threads + t) as u64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let body =
                        json!({ "name": "Latency", "email": format!("lat-{t}-{k}@example.com") });
                    let res: Value = agent
                        .post(&url)
                        .send_json(body)
                        .expect("POST /users")
                        .into_json()
                        .unwrap();
                    sent.lock()
                        .unwrap()
                        .push((res["id"].as_str().unwrap().to_owned(), Instant::now()));
                }
            });
        }
    });
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    services.assert_all_applied(total);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    subscriber.join().unwrap();
    let seen = seen.lock().unwrap();
    let (mut published, mut applied) = (Vec::new(), Vec::new());
    for (id, t201) in sent.lock().unwrap().iter() {
        let since = |at: &Instant| at.saturating_duration_since(*t201).as_micros() as f64;
        published.push(since(
            seen.get(&(false, id.clone()))
                .expect("every user.created seen on the broker"),
        ));
        applied.push(since(
            seen.get(&(true, id.clone()))
                .expect("every welcome credit seen on the broker"),
        ));
    }
    let (p50, p99) = percentiles(&mut published);
    let (a50, a99) = percentiles(&mut applied);
    let latency = format!(
        "latency at a steady {achieved:.0} requests/s for {secs} s ({total} users; 0 when the event arrived before the HTTP answer):\n  \
         201 -> event applied by transaction-service (its welcome credit seen on the broker): p50 {a50:.2} ms, p99 {a99:.2} ms (target p50 <= 2 ms, p99 <= 10 ms)\n  \
         baseline, same run: 201 -> user.created seen on the broker (commit -> PUBACK): p50 {p50:.2} ms, p99 {p99:.2} ms"
    );

    // Idle: nothing for 2 s, then 10 s of measurement.
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<f64> = services.pids.iter().map(|p| cpu_seconds(*p)).collect();
    std::thread::sleep(Duration::from_secs(10));
    let mut idle = String::from("idle services, 10 s with no traffic (target <= 0.05 CPU s each):");
    for (i, (pid, name)) in services
        .pids
        .iter()
        .zip(["user-service", "transaction-service"])
        .enumerate()
    {
        idle.push_str(&format!(
            "\n  {name}: {:.3} CPU s, RSS {} KiB",
            cpu_seconds(*pid) - before[i],
            rss_kib(*pid)
        ));
    }
    (latency, idle)
}

fn proc_field(pid: u32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = proc_field(pid, "stat");
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks // utime, stime: fields 14 and 15 of stat
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A KiB field of /proc/PID/status, e.g. "VmRSS:" or "VmHWM:" (the peak).
fn status_kib(pid: u32, field: &str) -> u64 {
    proc_field(pid, "status")
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
