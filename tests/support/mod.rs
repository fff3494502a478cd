//! Test harness: a real Mosquitto on a free loopback port with its own config, real
//! SQLite files in a temp dir, and a tiny domain ("items") whose consumer counts how
//! often each item's event took effect.
#![allow(dead_code)] // each test file uses its own part of the harness

pub mod nats;
pub mod proxy;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_outbox::consumer::inbox::HandlerError;
use edge_outbox::storage::{Migration, Schema};
use edge_outbox::{Config, Consumer, Database, Handlers, NewEvent, Outbox, Relay, StreamKey};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A Mosquitto process owned by the test, killed when dropped.
pub struct Broker {
    pub port: u16,
    /// The address it listens on (loopback, or an address inside a test namespace).
    pub host: String,
    /// Command prefix, e.g. `ip netns exec NS` to run it inside a namespace.
    prefix: Vec<String>,
    dir: tempfile::TempDir,
    extra_conf: String,
    child: Option<Child>,
}

/// A port nobody listens on now (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    /// A port and a config, no process yet (for "broker down at start").
    pub fn reserve(extra_conf: &str) -> Broker {
        let which = Command::new("sh")
            .args(["-c", "command -v mosquitto || test -x /usr/sbin/mosquitto"])
            .output();
        assert!(
            which.is_ok_and(|o| o.status.success()),
            "mosquitto is not installed: run `apt-get install -y mosquitto mosquitto-clients` (.ci/run does)"
        );
        Broker {
            port: free_port(),
            host: "127.0.0.1".into(),
            prefix: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            extra_conf: extra_conf.to_owned(),
            child: None,
        }
    }

    /// A running broker inside `ns`, listening on the namespace's address.
    pub fn start_in(ns: &NetNs) -> Broker {
        let mut b = Broker::reserve("user root");
        b.host = ns.ns_ip.clone();
        b.prefix = vec!["ip".into(), "netns".into(), "exec".into(), ns.name.clone()];
        b.launch();
        b
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    /// Freezes (SIGSTOP) or resumes (SIGCONT) the broker.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, sig);
        }
    }

    /// A running broker with the default test config.
    pub fn start() -> Broker {
        Broker::start_with("")
    }

    /// A running broker with extra config lines (e.g. `max_queued_messages 5`).
    pub fn start_with(extra_conf: &str) -> Broker {
        let mut b = Broker::reserve(extra_conf);
        b.launch();
        b
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.port)
    }

    /// Starts (or restarts) the process on the same port; waits until it accepts.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let conf = self.dir.path().join("mosquitto.conf");
        // persistence false: a SIGKILL loses everything in memory, the worst case
        // that the recovery protocol must repair.
        std::fs::write(
            &conf,
            format!(
                "listener {} {}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n{}\n",
                self.port, self.host, self.extra_conf
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let mosquitto = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(mosquitto);
                c
            }
            None => Command::new(mosquitto),
        };
        let child = cmd
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((self.host.as_str(), self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.path().join("mosquitto.log"))
                    .unwrap_or_default();
                panic!(
                    "mosquitto exited with {status} on port {}: {log}",
                    self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the broker loses every message and session it held in memory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Publishes raw bytes with mosquitto_pub (QoS1), as a hostile or broken client would.
    pub fn publish_raw(&self, topic: &str, payload: &[u8]) {
        self.mosquitto_pub(topic, payload, &["-f"]);
    }

    /// [`Broker::publish_raw`], retained.
    pub fn publish_retained(&self, topic: &str, payload: &[u8]) {
        self.mosquitto_pub(topic, payload, &["-r", "-f"]);
    }

    /// Each line of `lines` as one message, over one connection, as fast as it goes.
    pub fn publish_lines(&self, topic: &str, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        self.mosquitto_pub(topic, text.as_bytes(), &["-l"]);
    }

    fn mosquitto_pub(&self, topic: &str, payload: &[u8], mode: &[&str]) {
        let file = self.dir.path().join("raw-payload");
        std::fs::write(&file, payload).unwrap();
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
        ])
        .args(mode);
        if mode.contains(&"-l") {
            cmd.stdin(std::fs::File::open(&file).unwrap());
        } else {
            cmd.arg(&file);
        }
        let status = cmd
            .status()
            .expect("mosquitto_pub (package mosquitto-clients) must be installed");
        assert!(status.success(), "mosquitto_pub failed");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings for tests: short intervals so that recovery happens in well under a second.
pub fn config(broker_url: &str, name: &str) -> Config {
    Config {
        broker_url: broker_url.to_owned(),
        client_id: format!("{name}-{}", std::process::id()),
        source: name.to_owned(),
        topic_prefix: format!("test-{}", std::process::id()),
        relay_heads_interval_ms: 200,
        relay_poll_interval_ms: 100,
        consumer_gap_timeout_ms: 200,
        consumer_replay_retry_ms: 500,
        consumer_report_interval_ms: 500,
        reconnect_backoff_min_ms: 50,
        reconnect_backoff_max_ms: 300,
        mqtt_keep_alive_s: 5,
        shutdown_timeout_ms: 2_000,
        ..Config::default()
    }
}

/// The test domain, in both producer and consumer databases.
pub const ITEMS_SCHEMA: Schema = Schema {
    component: "test_items",
    migrations: &[Migration {
        version: 1,
        name: "items",
        sql: "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE) STRICT;
              CREATE TABLE effects (order_no INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER NOT NULL UNIQUE,
                                    applied INTEGER NOT NULL, seq INTEGER NOT NULL) STRICT;",
    }],
};

pub const STREAM: &str = "items";

pub fn open_db(dir: &Path, name: &str, config: &Config) -> Database {
    Database::open(
        &config.db_options(dir.join(format!("{name}.db"))),
        &[ITEMS_SCHEMA],
    )
    .unwrap()
}

/// Creates `name` and its `item.created` event in one transaction.
pub async fn create_item(
    db: &Database,
    outbox: &Outbox,
    name: String,
) -> Result<u64, edge_outbox::outbox::OutboxError> {
    let outbox = outbox.clone();
    db.writer()
        .write(move |tx| {
            tx.execute("INSERT INTO items (name) VALUES (?1)", [&name])?;
            let id = tx.last_insert_rowid();
            let e = outbox.enqueue(
                tx,
                NewEvent {
                    stream: STREAM,
                    event_type: "item.created",
                    subject: Some(&id.to_string()),
                    data: &serde_json::json!({"id": id, "name": name}),
                },
            )?;
            Ok(e.seq)
        })
        .await
}

/// Creates `n` items concurrently (so that they share group commits).
pub async fn create_items(db: &Database, outbox: &Outbox, prefix: &str, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (db, outbox, name) = (db.clone(), outbox.clone(), format!("{prefix}-{i}"));
            tokio::spawn(async move { create_item(&db, &outbox, name).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Enqueues `item.created` events, (stream, data) each, 500 to a transaction.
pub async fn enqueue_events(
    db: &Database,
    outbox: &Outbox,
    events: Vec<(String, serde_json::Value)>,
) {
    for chunk in events.chunks(500) {
        let (o, chunk) = (outbox.clone(), chunk.to_vec());
        db.writer()
            .write(move |tx| {
                for (stream, data) in &chunk {
                    o.enqueue(
                        tx,
                        NewEvent {
                            stream,
                            event_type: "item.created",
                            subject: None,
                            data,
                        },
                    )?;
                }
                Ok::<_, edge_outbox::outbox::OutboxError>(())
            })
            .await
            .unwrap();
    }
}

/// The consumer's handler: counts each item's effects and notes the order applied.
pub fn handlers() -> Handlers {
    Handlers::new().on("item.created", |tx, event| {
        let id = event
            .data
            .get("id")
            .and_then(|v| v.as_i64())
            .ok_or_else(|| HandlerError::Permanent("data.id missing".into()))?;
        let seq = event.seq().map_err(HandlerError::Permanent)? as i64;
        tx.prepare_cached(
            "INSERT INTO effects (item_id, applied, seq) VALUES (?1, 1, ?2)
             ON CONFLICT (item_id) DO UPDATE SET applied = applied + 1",
        )?
        .execute(rusqlite::params![id, seq])?;
        Ok(())
    })
}

pub fn stream_key(source: &str) -> StreamKey {
    StreamKey {
        source: source.to_owned(),
        stream: STREAM.to_owned(),
    }
}

/// A running background task and the token that stops it.
pub struct Running {
    pub cancel: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    /// Clean stop, waiting for the task.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stopped within 10 s")
            .unwrap();
    }

    /// Abrupt stop, as if the process were killed: the task is dropped wherever it is.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

pub fn spawn_relay(db: &Database, config: &Config) -> Running {
    spawn_relay_with_status(db, config).0
}

/// [`spawn_relay`], with the relay's status for the test to read.
pub fn spawn_relay_with_status(
    db: &Database,
    config: &Config,
) -> (Running, std::sync::Arc<edge_outbox::RelayStatus>) {
    let relay = Relay::new(db.clone(), config.clone()).unwrap();
    let status = relay.status();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let running = Running {
        cancel,
        task: tokio::spawn(async move { relay.run(c).await.unwrap() }),
    };
    (running, status)
}

pub fn spawn_consumer(
    db: &Database,
    config: &Config,
    source: &str,
) -> (
    Running,
    std::sync::Arc<edge_outbox::consumer::ConsumerStatus>,
) {
    spawn_consumer_with(db, config, source, handlers())
}

/// [`spawn_consumer`] with handlers of the test's own.
pub fn spawn_consumer_with(
    db: &Database,
    config: &Config,
    source: &str,
    handlers: Handlers,
) -> (
    Running,
    std::sync::Arc<edge_outbox::consumer::ConsumerStatus>,
) {
    let consumer = Consumer::new(
        db.clone(),
        config.clone(),
        vec![stream_key(source)],
        handlers,
    )
    .unwrap();
    let status = consumer.status();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    (
        Running {
            cancel,
            task: tokio::spawn(async move { consumer.run(c).await.unwrap() }),
        },
        status,
    )
}

/// Polls `check` until it returns true, failing the test with `what` after `secs`.
pub async fn wait_for(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Outbox rows of the database at `path` not yet marked published.
pub fn pending(path: &Path) -> u64 {
    edge_outbox::outbox::stats(&inspect(path)).unwrap().pending
}

/// Opens a plain connection to a database file, for assertions.
pub fn inspect(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

pub fn count(path: &Path, sql: &str) -> i64 {
    inspect(path).query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Every item effect, (item_id, times applied, seq), ordered by application order.
pub fn effects(path: &Path) -> Vec<(i64, i64, i64)> {
    let c = inspect(path);
    let mut s = c
        .prepare("SELECT item_id, applied, seq FROM effects ORDER BY order_no")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Asserts that items 1..=n were each applied exactly once, in sequence order.
pub fn assert_exactly_once_in_order(path: &Path, n: usize) {
    let effects = effects(path);
    assert_eq!(
        effects.len(),
        n,
        "effects: {} of {n} items applied",
        effects.len()
    );
    let twice: Vec<_> = effects.iter().filter(|e| e.1 != 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    let seqs: Vec<i64> = effects.iter().map(|e| e.2).collect();
    let expected: Vec<i64> = (1..=n as i64).collect();
    assert_eq!(seqs, expected, "events were not applied in sequence order");
}

pub fn db_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.db"))
}

/// A producer and a consumer database in one temp dir, with their settings.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub cfg: Config,
    pub consumer_cfg: Config,
    pub producer: Database,
    pub consumer_db: Database,
    pub outbox: Outbox,
}

impl Pair {
    /// Producer "producer" and consumer "consumer" on `broker_url`; `tweak` adjusts
    /// both settings before the databases are opened.
    pub fn new(broker_url: &str, tweak: impl Fn(Config) -> Config) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tweak(config(broker_url, "producer"));
        let consumer_cfg = tweak(config(broker_url, "consumer"));
        let producer = open_db(dir.path(), "producer", &cfg);
        let consumer_db = open_db(dir.path(), "consumer", &consumer_cfg);
        let outbox = Outbox::new(&cfg);
        Pair {
            dir,
            cfg,
            consumer_cfg,
            producer,
            consumer_db,
            outbox,
        }
    }

    pub fn producer_path(&self) -> PathBuf {
        db_path(self.dir.path(), "producer")
    }

    pub fn consumer_path(&self) -> PathBuf {
        db_path(self.dir.path(), "consumer")
    }

    /// Outbox rows not yet marked published.
    pub fn pending(&self) -> u64 {
        pending(&self.producer_path())
    }

    pub async fn wait_all_published(&self) {
        wait_for("every outbox row PUBACKed and marked published", 20, || {
            self.pending() == 0
        })
        .await;
    }

    pub fn spawn_relay(&self) -> Running {
        spawn_relay(&self.producer, &self.cfg)
    }

    pub fn spawn_consumer(
        &self,
    ) -> (
        Running,
        std::sync::Arc<edge_outbox::consumer::ConsumerStatus>,
    ) {
        spawn_consumer(&self.consumer_db, &self.consumer_cfg, "producer")
    }

    /// Starts the consumer until it has subscribed (a persistent session), then stops
    /// it: from now on the broker queues its events, in memory only.
    pub async fn subscribe_then_go_offline(&self) {
        let (consumer, status) = self.spawn_consumer();
        wait_for("consumer connected", 10, || status.connected()).await;
        tokio::time::sleep(Duration::from_millis(100)).await; // the SUBACK
        consumer.stop().await;
    }
}

/// Says loudly that a test did not run, and why. Tests that can skip have
/// `needs_root` in their name; .config/nextest.toml shows their output even when they
/// pass, so that a skip is never silent.
pub fn skip(test: &str, missing: &str) {
    eprintln!("SKIPPED {test}: {missing}");
}

/// Why root-only tests cannot run here, if they cannot.
pub fn root_missing(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root".into());
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t} || test -x /usr/sbin/{t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "needs {} (apt-get install iproute2 iptables)",
            missing.join(", ")
        )
    })
}

/// A network namespace joined to the host by a veth pair: a second host whose traffic
/// the test can drop with iptables (a black hole). Removed when dropped.
pub struct NetNs {
    pub name: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl NetNs {
    pub fn create() -> Result<NetNs, String> {
        let id = std::process::id() % 60_000;
        let name = format!("eo{id}");
        let (host_if, ns_if) = (format!("eoh{id}"), format!("eon{id}"));
        let net = format!("10.{}.{}", 100 + id / 250 % 100, id % 250);
        let ns = NetNs {
            name: name.clone(),
            host_ip: format!("{net}.1"),
            ns_ip: format!("{net}.2"),
        };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &host_if,
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns_if,
        ])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Drops (`true`) or stops dropping (`false`) every TCP packet to `port` inside the
    /// namespace: no RST, no answer, a black hole.
    pub fn black_hole(&self, port: u16, on: bool) {
        let action = if on { "-I" } else { "-D" };
        let port = port.to_string();
        for chain in ["INPUT", "OUTPUT"] {
            let flag = if chain == "INPUT" {
                "--dport"
            } else {
                "--sport"
            };
            let status = Command::new("ip")
                .args([
                    "netns", "exec", &self.name, "iptables", action, chain, "-p", "tcp", flag,
                    &port, "-j", "DROP",
                ])
                .status()
                .unwrap();
            assert!(status.success(), "iptables {action} {chain} failed");
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and so the pair.
        let _ = ip(&["netns", "del", &self.name]);
    }
}
