//! `BENCH=scale`: how the cost grows with the work. A day offline (a million events to
//! drain), weeks of history (ten million rows), 10,000 streams, and what goes to an
//! SD card. Each figure against a baseline of the same run; docs/performance.md,
//! "Scale", records them. `BENCH_SCALE_BACKLOG`, `BENCH_SCALE_HISTORY` and
//! `BENCH_SCALE_STREAMS` set the sizes (for a quicker look; the targets are for the
//! defaults).

use super::*;
use edge_box::contract::{User, UserId, USERS_STREAM, USER_CREATED};
use edge_outbox::storage::{used_bytes, Synchronous};
use edge_outbox::{Database, StreamKey};
use support::proxy::{Mode, Proxy};

/// The sizes of a scale run.
pub(crate) struct Scale {
    backlog: usize,
    backlog_base: usize,
    history: usize,
    history_requests: usize,
    pass_rows: usize,
    streams: usize,
    stream_events: usize,
    disk_requests: usize,
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Scale {
    pub(crate) fn from_env() -> Scale {
        let backlog = env_or("BENCH_SCALE_BACKLOG", 1_000_000);
        let history = env_or("BENCH_SCALE_HISTORY", 10_000_000);
        Scale {
            backlog,
            backlog_base: (backlog / 10).max(1_000),
            history,
            history_requests: 19_200,
            pass_rows: (history / 10).max(1),
            streams: env_or("BENCH_SCALE_STREAMS", 10_000),
            stream_events: 100_000,
            disk_requests: 19_200,
        }
    }

    pub(crate) fn print(&self) {
        println!(
            "  scale: backlog {} events (baseline {}), history {} outbox rows and inbox records \
             ({} requests per HTTP run, a retention pass of {} rows), {} streams ({} events), \
             disk writes over {} requests",
            self.backlog,
            self.backlog_base,
            self.history,
            self.history_requests,
            self.pass_rows,
            self.streams,
            self.stream_events,
            self.disk_requests
        );
    }
}

/// Runs every scale figure; rows and notes as the other modes make them.
pub(crate) fn run(
    scale: &Scale,
    broker: &Broker,
    dir: &Path,
    want: &dyn Fn(&str) -> bool,
    rows: &mut Vec<[String; 5]>,
    notes: &mut Vec<String>,
) {
    if want("backlog") {
        backlog_figures(scale, broker, dir, rows, notes);
    }
    if want("history") {
        history_figures(scale, broker, dir, rows, notes);
    }
    if want("streams") {
        stream_figures(scale, broker, dir, rows, notes);
    }
    if want("disk") {
        disk_figures(scale, broker, dir, notes);
    }
}

// ---------------------------------------------------------------------------------
// 1. Backlog

struct Backlog {
    rate: f64,
    /// Broker back -> first event applied by transaction-service.
    first_applied: Duration,
    /// Peak RSS (VmHWM) of user-service and transaction-service, KiB.
    peak_rss_kib: [u64; 2],
    /// Per database: bytes in use, and per table with its indexes.
    space: Vec<Space>,
}

/// A database's name, bytes in use, and bytes per table with its indexes.
type Space = (String, u64, Vec<(String, u64)>);

/// Both services through a proxy; the broker goes away, `n` user.created events
/// pile up in user-service's outbox (written into its database by this process, as
/// its API would), the broker comes back: until transaction-service applied them all.
fn backlog(broker: &Broker, dir: &Path, tag: &str, n: usize) -> Backlog {
    let proxy = Proxy::start(broker.port, Mode::Pass);
    let services = Services::start_on(&proxy.url(), dir, tag, &[]);
    // Both connected and subscribed (persistent sessions), then the broker is away.
    std::thread::sleep(Duration::from_millis(1_500));
    proxy.set_down(true);
    let prefix = format!("bench-{}-{tag}", std::process::id());
    fill_users(&services.users_db, &prefix, n);
    std::thread::sleep(Duration::from_secs(1));

    let ledger = support::inspect(&services.ledger_db);
    let position = || -> u64 {
        ledger
            .query_row(
                "SELECT COALESCE(MAX(position), 0) FROM inbox_positions WHERE stream = ?1",
                [USERS_STREAM],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0) as u64
    };
    let back = Instant::now();
    proxy.set_down(false);
    let deadline = Duration::from_secs(120 + n as u64 / 1_000);
    while position() == 0 {
        assert!(back.elapsed() < deadline, "{tag}: nothing applied");
        std::thread::sleep(Duration::from_millis(1));
    }
    let first_applied = back.elapsed();
    while position() < n as u64 {
        assert!(
            back.elapsed() < deadline,
            "{tag}: applied {} of {n}",
            position()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rate = n as f64 / back.elapsed().as_secs_f64();
    services.assert_all_applied(n);
    let peak_rss_kib = [0, 1].map(|i| peak_rss_kib(services.pids[i]));
    let space = [&services.users_db, &services.ledger_db]
        .iter()
        .map(|p| {
            let c = support::inspect(p);
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, used_bytes(&c).unwrap(), table_bytes(&c))
        })
        .collect();
    drop(services);
    Backlog {
        rate,
        first_applied,
        peak_rss_kib,
        space,
    }
}

/// The settings user-service writes its events with, for a database of `prefix`.
fn user_service_config(prefix: &str) -> Config {
    Config {
        source: "user-service".into(),
        topic_prefix: prefix.into(),
        db_synchronous: Synchronous::Off,
        outbox_backlog_max_events: u64::MAX / 2,
        outbox_backlog_max_bytes: u64::MAX / 2,
        ..Config::default()
    }
}

fn open_user_db(path: &Path, cfg: &Config) -> Database {
    Database::open(
        &cfg.db_options(path),
        &[
            edge_box::service::SERVICE_SCHEMA,
            edge_box::user_service::SCHEMA,
        ],
    )
    .unwrap()
}

/// `n` users and their user.created events, as POST /users writes them, 1,000 per
/// transaction (synchronous=OFF: the fill is not what is measured).
fn fill_users(path: &Path, prefix: &str, n: usize) {
    let cfg = user_service_config(prefix);
    let db = open_user_db(path, &cfg);
    let outbox = Outbox::new(&cfg);
    for start in (0..n).step_by(1_000) {
        let o = outbox.clone();
        let end = (start + 1_000).min(n);
        let prefix = prefix.to_owned();
        db.writer()
            .write_blocking(move |tx| {
                for i in start..end {
                    let email = format!("{prefix}-{i}@example.com");
                    let user = User {
                        id: UserId::generate(),
                        name: "Backlog User".into(),
                        email: email.clone(),
                        balance_cents: 0,
                        created_at: "2026-12-01T00:00:00.000Z".into(),
                    };
                    tx.prepare_cached(
                        "INSERT INTO users (uid, name, email, email_key, balance_cents, created_at) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                    )?
                    .execute(rusqlite::params![
                        user.id,
                        user.name,
                        email,
                        edge_box::user_service::email_key(&email),
                        user.created_at
                    ])?;
                    let subject = user.id.to_string();
                    o.enqueue(
                        tx,
                        NewEvent {
                            stream: USERS_STREAM,
                            event_type: USER_CREATED,
                            subject: Some(&subject),
                            data: &user,
                        },
                    )?;
                }
                Ok::<_, edge_outbox::outbox::OutboxError>(())
            })
            .unwrap();
    }
}

/// Bytes of each table with its indexes (SQLite's dbstat), largest first.
fn table_bytes(c: &rusqlite::Connection) -> Vec<(String, u64)> {
    let mut s = c
        .prepare(
            "SELECT COALESCE(m.tbl_name, d.name), SUM(d.pgsize) FROM dbstat d
             LEFT JOIN sqlite_schema m ON m.name = d.name
             GROUP BY 1 ORDER BY 2 DESC",
        )
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn backlog_figures(
    scale: &Scale,
    broker: &Broker,
    dir: &Path,
    rows: &mut Vec<[String; 5]>,
    notes: &mut Vec<String>,
) {
    let base = backlog(broker, dir, "backlog-base", scale.backlog_base);
    let big = backlog(broker, dir, "backlog", scale.backlog);
    rows.push(row(
        &format!(
            "backlog of {} events after the broker's return -> all applied by transaction-service, events/s",
            scale.backlog
        ),
        &Figure(vec![big.rate]),
        &format!("the same with {} events", scale.backlog_base),
        &Figure(vec![base.rate]),
        Some(0.9),
    ));
    let mb = |kib: u64| kib as f64 / 1024.0;
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let peak = big.peak_rss_kib.iter().copied().max().unwrap_or(0);
    notes.push(format!(
        "backlog of {} events:\n  peak RSS during the drain: user-service {:.1} MB, transaction-service {:.1} MB \
         ({} the target <= 40 MB; with {} events: {:.1} MB and {:.1} MB)\n  \
         broker back -> first event applied: {:.0} ms ({} the target <= 1 s; with {} events: {:.0} ms)",
        scale.backlog,
        mb(big.peak_rss_kib[0]),
        mb(big.peak_rss_kib[1]),
        verdict(mb(peak) <= 40.0),
        scale.backlog_base,
        mb(base.peak_rss_kib[0]),
        mb(base.peak_rss_kib[1]),
        big.first_applied.as_secs_f64() * 1e3,
        verdict(big.first_applied <= Duration::from_secs(1)),
        scale.backlog_base,
        base.first_applied.as_secs_f64() * 1e3,
    ));
    // 5. Disk space, from the drained databases: real rows, as the services wrote them.
    let mut space = format!(
        "disk space after the drain of {} events (one user, one user.created, one welcome credit each):",
        scale.backlog
    );
    for (db, used, tables) in &big.space {
        space.push_str(&format!(
            "\n  {db}: {:.0} MB in use, {:.0} bytes per event; per table with its indexes:",
            *used as f64 / 1e6,
            *used as f64 / scale.backlog as f64
        ));
        for (table, bytes) in tables.iter().take(6) {
            space.push_str(&format!(
                " {table} {:.0} B,",
                *bytes as f64 / scale.backlog as f64
            ));
        }
    }
    let per_event: u64 =
        big.space.iter().map(|(_, used, _)| *used).sum::<u64>() / scale.backlog as u64;
    let per_day = per_event as f64 * 100.0 * 86_400.0;
    let cap = Config::default().retention_max_bytes as f64;
    space.push_str(&format!(
        "\n  at 100 requests/s both databases grow {:.1} GB a day ({per_event} bytes per request): \
         the default --retention-max-bytes ({:.1} GiB per database) holds the history at {:.1} GiB \
         for the two, reached after {:.1} days; the default --retention-ms (7 days) alone would hold {:.0} GB",
        per_day / 1e9,
        cap / (1u64 << 30) as f64,
        2.0 * cap / (1u64 << 30) as f64,
        2.0 * cap / per_day,
        per_day * 7.0 / 1e9,
    ));
    notes.push(space);
}

// ---------------------------------------------------------------------------------
// 2. History

/// What a real envelope of user-service looks like, for the history's rows.
fn envelope_template(dir: &Path, prefix: &str) -> Vec<u8> {
    let path = dir.join("template-user-service.db");
    fill_users(&path, prefix, 1);
    support::inspect(&path)
        .query_row("SELECT payload FROM outbox", [], |r| r.get(0))
        .unwrap()
}

/// `n` published outbox rows in user-service's database and as many inbox records in
/// transaction-service's, with their positions, as `n` events of history leave them:
/// the oldest `old` rows created 8 days ago (beyond the default --retention-ms), the
/// rest 3 days ago. Plain SQL, rollback journal and no fsync (the fill is not what is
/// measured); the databases are in WAL mode again after.
fn fill_history(dir: &Path, tag: &str, n: usize, old: usize) {
    let prefix = format!("bench-{}-{tag}", std::process::id());
    let template = envelope_template(dir, &prefix);
    let users = dir.join(format!("{tag}-user-service.db"));
    let ledger = dir.join(format!("{tag}-transaction-service.db"));
    drop(open_user_db(&users, &user_service_config(&prefix)));
    let ledger_cfg = Config {
        source: "transaction-service".into(),
        ..user_service_config(&prefix)
    };
    drop(
        Database::open(
            &ledger_cfg.db_options(&ledger),
            &[
                edge_box::service::SERVICE_SCHEMA,
                edge_box::transaction_service::SCHEMA,
            ],
        )
        .unwrap(),
    );
    let now = edge_outbox::clock::now_ms();
    let day = 86_400_000;
    let topic = format!("{prefix}/events/user-service/{USERS_STREAM}");
    let bulk = |path: &Path| {
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = DELETE; PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;",
        )
        .unwrap();
        c
    };
    let u = bulk(&users);
    let epoch: String = u
        .query_row("SELECT epoch FROM outbox_epoch", [], |r| r.get(0))
        .unwrap();
    let l = bulk(&ledger);
    for start in (0..n).step_by(1_000_000) {
        let end = (start + 1_000_000).min(n) as i64;
        let rows = "WITH RECURSIVE k(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM k WHERE i < ?2)";
        u.execute(
            &format!(
                "{rows} INSERT INTO outbox (event_id, stream, seq, event_type, topic, payload, created_at_ms, published_at_ms)
                 SELECT printf('%08x-0000-7000-8000-%012x', ?7, i), ?3, i, ?4, ?5, ?6,
                        CASE WHEN i <= ?8 THEN ?9 ELSE ?10 END + i, CASE WHEN i <= ?8 THEN ?9 ELSE ?10 END + i + 5
                 FROM k"
            ),
            rusqlite::params![
                start as i64 + 1, end, USERS_STREAM, USER_CREATED, topic, template,
                now / 1000, old as i64, now - 8 * day - n as i64, now - 3 * day - n as i64
            ],
        )
        .unwrap();
        l.execute(
            &format!(
                "{rows} INSERT INTO inbox (event_id, source, stream, epoch, seq, event_type, outcome, applied_at_ms)
                 SELECT printf('%08x-0000-7000-8000-%012x', ?5, i), 'user-service', ?3, ?4, i, ?6, 'applied', ?7 + i
                 FROM k"
            ),
            rusqlite::params![start as i64 + 1, end, USERS_STREAM, epoch, now / 1000, USER_CREATED, now - 3 * day - n as i64],
        )
        .unwrap();
    }
    u.execute(
        "INSERT INTO outbox_streams (stream, last_seq) VALUES (?1, ?2)
         ON CONFLICT (stream) DO UPDATE SET last_seq = excluded.last_seq",
        rusqlite::params![USERS_STREAM, n as i64],
    )
    .unwrap();
    l.execute(
        "INSERT INTO inbox_positions (source, stream, position, updated_at_ms, epoch) VALUES ('user-service', ?1, ?2, ?3, ?4)
         ON CONFLICT (source, stream) DO UPDATE SET position = excluded.position, epoch = excluded.epoch",
        rusqlite::params![USERS_STREAM, n as i64, now, epoch],
    )
    .unwrap();
    for c in [&u, &l] {
        c.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
    }
}

/// One load of POST /users.
struct Load {
    rate: f64,
    /// ms.
    p99: f64,
    /// (time answered, latency in µs) of each request.
    answered: Vec<(Instant, f64)>,
}

fn timed_load(services: &Services, tag: &str, n: usize) -> Load {
    let (rate, answered) = post_load(&format!("{}/users", services.users), tag, n);
    let mut lat: Vec<f64> = answered.iter().map(|a| a.1).collect();
    let (_, p99) = percentiles(&mut lat);
    Load {
        rate,
        p99,
        answered,
    }
}

fn history_figures(
    scale: &Scale,
    broker: &Broker,
    dir: &Path,
    rows: &mut Vec<[String; 5]>,
    notes: &mut Vec<String>,
) {
    let filled = Instant::now();
    fill_history(dir, "hist", scale.history, scale.pass_rows);
    let fill_s = filled.elapsed().as_secs_f64();
    let sizes: Vec<String> = ["user-service", "transaction-service"]
        .iter()
        .map(|s| {
            let bytes = std::fs::metadata(dir.join(format!("hist-{s}.db"))).map_or(0, |m| m.len());
            format!("{s} {:.1} GB", bytes as f64 / 1e9)
        })
        .collect();
    // History never pruned during these runs: the time rule reaches back 10 years and
    // the byte cap is off, so that the figure is the cost of holding the history.
    let hold: &[&str] = &[
        "--retention-ms",
        "315360000000",
        "--retention-max-bytes",
        "0",
    ];
    let n = scale.history_requests;
    let (mut empty, mut full, mut startup) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..2 {
        let s = Services::start(broker, dir, &format!("hist-empty-{r}"), hold);
        empty.push(timed_load(&s, &format!("e{r}"), n));
        s.assert_all_applied(n);
        drop(s);
        let s = Services::start(broker, dir, "hist", hold);
        startup.push(s.startup.clone());
        full.push(timed_load(&s, &format!("h{r}"), n));
        drop(s);
    }
    let rate = |v: &[Load]| Figure(v.iter().map(|x| x.rate).collect());
    let p99 = |v: &[Load]| Figure(v.iter().map(|x| x.p99 * 1e3).collect());
    rows.push(row(
        &format!(
            "POST /users with {} published outbox rows and inbox records retained, requests/s",
            scale.history
        ),
        &rate(&full),
        "the same on empty databases",
        &rate(&empty),
        Some(0.9),
    ));
    let (quiet_p99, empty_p99) = (p99(&full).median(), p99(&empty).median());
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let slowest_start = startup.iter().flatten().max().copied().unwrap_or_default();
    let mut note = format!(
        "history of {} events ({fill_s:.0} s to fill; files: {}):\n  \
         POST /users p99 {:.1} ms against {:.1} ms on empty databases: {:.2}x ({} the target <= 1.5x)\n  \
         start-up (spawn -> listening) on that database: {} ({} the target <= 1 s)",
        scale.history,
        sizes.join(", "),
        quiet_p99 / 1e3,
        empty_p99 / 1e3,
        quiet_p99 / empty_p99,
        verdict(quiet_p99 / empty_p99 <= 1.5),
        startup
            .iter()
            .map(|s| format!(
                "user-service {:.0} ms, transaction-service {:.0} ms",
                s[0].as_secs_f64() * 1e3,
                s[1].as_secs_f64() * 1e3
            ))
            .collect::<Vec<_>>()
            .join("; "),
        verdict(slowest_start <= Duration::from_secs(1)),
    );

    // A retention pass deleting the oldest rows (created 8 days ago) while writes go
    // on: it starts with the relay, the load at once.
    let s = Services::start_logged(
        &broker.url(),
        dir,
        "hist",
        &["--retention-max-bytes", "0"],
        "warn,edge_outbox::relay=info",
    );
    let log = s.logs[0].clone();
    let pass_end: Arc<Mutex<Option<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (pass_end, stop) = (pass_end.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && pass_end.lock().unwrap().is_none() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if let Some(line) = text
                    .lines()
                    .find(|l| l.contains("retention deleted old published outbox rows"))
                {
                    *pass_end.lock().unwrap() = Some((Instant::now(), line.to_owned()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let load_start = Instant::now();
    let answered = timed_load(&s, "pass", n).answered;
    let load_end = Instant::now();
    // The pass may outlast the load; wait for its end (bounded) to report it.
    let deadline = Instant::now() + Duration::from_secs(300);
    while pass_end.lock().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let left_old = support::count(
        &s.users_db,
        &format!(
            "SELECT COUNT(*) FROM outbox WHERE seq <= {}",
            scale.pass_rows
        ),
    );
    drop(s);
    let (ended, line) = pass_end
        .lock()
        .unwrap()
        .clone()
        .expect("the retention pass did not end within 300 s");
    let mut during: Vec<f64> = answered
        .iter()
        .filter(|(at, _)| *at <= ended)
        .map(|a| a.1)
        .collect();
    assert_eq!(left_old, 0, "the retention pass left {left_old} old rows");
    let rows_deleted = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rows="))
        .unwrap_or("?")
        .to_owned();
    if during.len() < 100 {
        note.push_str(&format!(
            "\n  retention pass: deleted {rows_deleted} rows, ended {:.1} s into the load, before 100 writes were answered: no p99 during it",
            ended.saturating_duration_since(load_start).as_secs_f64()
        ));
    } else {
        let (_, p99_during) = percentiles(&mut during);
        let ratio = p99_during * 1e3 / quiet_p99;
        note.push_str(&format!(
            "\n  retention pass deleting {rows_deleted} rows while {} writes were answered ({:.1} s of the {:.1} s load): \
             write p99 {p99_during:.1} ms against the quiet {:.1} ms: {ratio:.2}x ({} the target <= 2x)",
            during.len(),
            ended.saturating_duration_since(load_start).as_secs_f64(),
            (load_end - load_start).as_secs_f64(),
            quiet_p99 / 1e3,
            verdict(ratio <= 2.0),
        ));
    }
    notes.push(note);
}

// ---------------------------------------------------------------------------------
// 3. Streams

/// `n` events spread over `streams` streams, all applied by one consumer of every
/// stream (library relay and consumer, FULL on both sides). Events/s.
fn across_streams(broker: &Broker, dir: &Path, run: &str, n: usize, streams: usize) -> f64 {
    let name = |i: usize| format!("dev-{:05}", i % streams);
    let cfg = bench_config(&broker.url(), &format!("streams-p{run}"));
    let consumer_cfg = bench_config(&broker.url(), &format!("streams-c{run}"));
    let producer = support::open_db(dir, &format!("streams-p{run}"), &cfg);
    let consumer_db = support::open_db(dir, &format!("streams-c{run}"), &consumer_cfg);
    let events = (0..n)
        .map(|i| (name(i), json!({ "id": i + 1, "name": "x".repeat(100) })))
        .collect();
    runtime().block_on(async {
        support::enqueue_events(&producer, &Outbox::new(&cfg), events).await;
        let keys: Vec<StreamKey> = (0..streams.min(n))
            .map(|i| StreamKey {
                source: "producer".into(),
                stream: name(i),
            })
            .collect();
        let consumer =
            Consumer::new(consumer_db.clone(), consumer_cfg, keys, support::handlers()).unwrap();
        let status = consumer.status();
        let cancel = tokio_util::sync::CancellationToken::new();
        let consumer_task = tokio::spawn(consumer.run(cancel.clone()));
        while !status.connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(1_000)).await; // the SUBACKs
        let relay = Relay::new(producer.clone(), cfg).unwrap();
        let started = Instant::now();
        let relay_task = tokio::spawn(relay.run(cancel.clone()));
        wait_for_count("across streams", n, started, || status.applied()).await;
        let rate = n as f64 / started.elapsed().as_secs_f64();
        cancel.cancel();
        relay_task.await.unwrap().unwrap();
        consumer_task.await.unwrap().unwrap();
        // Each event once, and in order within its stream.
        let effects = support::effects(&dir.join(format!("streams-c{run}.db")));
        assert_eq!(effects.len(), n, "{run}: events lost");
        assert!(
            effects.iter().all(|e| e.1 == 1),
            "{run}: an event applied twice"
        );
        let mut last = HashMap::new();
        for (id, _, seq) in effects {
            let stream = (id as usize - 1) % streams;
            let before = last.insert(stream, seq).unwrap_or(0);
            assert_eq!(
                seq,
                before + 1,
                "{run}: stream {stream} applied out of order"
            );
        }
        rate
    })
}

fn stream_figures(
    scale: &Scale,
    broker: &Broker,
    dir: &Path,
    rows: &mut Vec<[String; 5]>,
    notes: &mut Vec<String>,
) {
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for r in 0..2 {
        one.push(across_streams(
            broker,
            dir,
            &format!("one{r}"),
            scale.stream_events,
            1,
        ));
        many.push(across_streams(
            broker,
            dir,
            &format!("many{r}"),
            scale.stream_events,
            scale.streams,
        ));
    }
    rows.push(row(
        &format!(
            "end to end, {} events over {} streams (one consumer of all), events/s",
            scale.stream_events, scale.streams
        ),
        &Figure(many),
        "the same on one stream",
        &Figure(one),
        Some(0.8),
    ));
    notes.push(format!(
        "{} streams: head announcements and position reports go in pages of at most {} bytes, \
         subscriptions in SUBSCRIBE packets within the packet limit; a tail lost on one of 10,000 streams is \
         recovered (test ten_thousand_streams_are_announced_in_pages_and_a_lost_tail_on_one_is_recovered)",
        scale.streams,
        edge_outbox::protocol::CONTROL_PAGE_MAX_BYTES
    ));
}

// ---------------------------------------------------------------------------------
// 4. Disk writes

/// POST /users at a steady `rate` for `secs` (open loop): bytes both services wrote
/// to the disk per request, until every event was applied and one more second; and
/// how many requests.
fn paced_disk(broker: &Broker, dir: &Path, rate: u64, secs: u64) -> (f64, usize) {
    let services = Services::start(broker, dir, "paced", &[]);
    std::thread::sleep(Duration::from_millis(500));
    let disk = || disk_write_bytes(services.pids[0]) + disk_write_bytes(services.pids[1]);
    let before = disk();
    let n = (rate * secs) as usize;
    let agent = ureq::AgentBuilder::new().build();
    let url = format!("{}/users", services.users);
    let start = Instant::now();
    for k in 0..n {
        let due = start + Duration::from_micros(k as u64 * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let body = json!({ "name": "Paced User", "email": format!("paced-{k}@example.com") });
        let res = agent.post(&url).send_json(body).expect("POST /users");
        assert_eq!(res.status(), 201);
    }
    services.assert_all_applied(n);
    std::thread::sleep(Duration::from_secs(1));
    ((disk() - before) / n as f64, n)
}

fn disk_figures(scale: &Scale, broker: &Broker, dir: &Path, notes: &mut Vec<String>) {
    let (mut full, mut off) = (Vec::new(), Vec::new());
    for r in 0..2 {
        full.push(post_users(
            broker,
            dir,
            100 + r,
            HttpMode::Full,
            scale.disk_requests,
        ));
        off.push(post_users(
            broker,
            dir,
            100 + r,
            HttpMode::Off,
            scale.disk_requests,
        ));
    }
    let median = |v: &[HttpRun], f: fn(&HttpRun) -> f64| Figure(v.iter().map(f).collect()).median();
    let kib = |b: f64| b / 1024.0;
    let mut note = String::from(
        "disk writes (/proc/PID/io write_bytes), POST /users from 64 connections:\n\
         | durability | requests/s | user-service per request | transaction-service per applied event | both services per request | at 100 requests/s |\n|---|---|---|---|---|---|\n",
    );
    for (mode, runs) in [("FULL", &full), ("OFF", &off)] {
        let both = median(runs, |r| r.box_disk_bytes);
        note.push_str(&format!(
            "| {mode} | {:.0} | {:.1} KiB | {:.1} KiB | {:.1} KiB | {:.1} GB a day |\n",
            median(runs, |r| r.rate),
            kib(median(runs, |r| r.user_disk_bytes)),
            kib(median(runs, |r| r.ledger_disk_bytes)),
            kib(both),
            both * 100.0 * 86_400.0 / 1e9
        ));
    }
    // The card's real day: requests one at a time, 100 a second, each its own commit.
    let (paced, paced_n) = paced_disk(broker, dir, 100, 20);
    note.push_str(&format!(
        "| FULL, a steady 100 requests/s for 20 s ({paced_n} requests, each its own commit) | 100 | | | {:.1} KiB | {:.1} GB a day |\n",
        kib(paced),
        paced * 100.0 * 86_400.0 / 1e9
    ));
    let user_full = kib(median(&full, |r| r.user_disk_bytes));
    note.push_str(&format!(
        "user-service at FULL: {user_full:.1} KiB per request ({} the target <= 4 KiB)",
        if user_full <= 4.0 { "meets" } else { "MISSES" }
    ));
    notes.push(note);
}
