//! `edge-outbox power-cut`: the whole box under concurrent load, through repeated power
//! cuts (or SIGKILLs of one component at a time), then checked.
//!
//! A power cut, as simulated here (../shared/FIELD-NOTES.md): every database and the
//! broker's persistence live on a loop-mounted ext4 image. Each cycle freezes every
//! process of the box (SIGSTOP), shuts the filesystem down with `FS_IOC_SHUTDOWN`
//! without flushing its log (what the disk would keep if the power went now), kills the
//! processes, unmounts, mounts again (the journal replays), and restarts everything.
//!
//! Clients create users and transactions with `Idempotency-Key`s and retry with the
//! same key until they get a definitive answer, as a real client would. At the end the
//! load stops, the box drains, and the harness checks that every request that got a
//! 2xx is still there exactly once, that `verify` passes, and that nothing is pending.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};
use tokio::process::Command;

use crate::admin::run_all::{
    bin_dir, free_port, has_tool, http, run_cmd, spawn, wait_healthy, wait_listening, Output, Proc,
};
use edge_outbox::protocol::DEFAULT_TOPIC_PREFIX;

use crate::admin::broker_access::{self, BrokerAccess};
use crate::admin::verify::{self, Target};
use edge_outbox::outbox;

/// `FS_IOC_SHUTDOWN`: `_IOR('X', 125, __u32)`.
const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
/// Shut down without flushing the journal: what a power cut leaves.
const FS_SHUTDOWN_NOLOGFLUSH: u32 = 2;

/// What to break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Cut the power to the whole box (needs root and loop devices).
    Power,
    /// SIGKILL one component (a service or the broker) at a time.
    Kill,
}

/// Settings of the harness.
#[derive(Debug, Clone, clap::Args)]
pub struct PowerCut {
    /// Failures to inflict.
    #[arg(long, env = "CYCLES", default_value_t = 20)]
    pub cycles: u32,
    /// power: cut the power to the whole box; kill: SIGKILL one component at a time.
    #[arg(long, value_enum, default_value = "power")]
    pub mode: Mode,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Longest run of load between two failures, in milliseconds (each is random, from
    /// a fifth of this up to it).
    #[arg(long, default_value_t = 1_500)]
    pub interval_ms: u64,
    /// Work folder (image, mount point, logs); wiped at start.
    #[arg(long, default_value = "data/power-cut")]
    pub dir: PathBuf,
    /// The mosquitto executable.
    #[arg(long, env = "MOSQUITTO", default_value = "mosquitto")]
    pub mosquitto: PathBuf,
    /// Folder holding user-service and transaction-service (default: this program's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// Why a power cut cannot be simulated here, if it cannot.
pub fn missing_prerequisites() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (to mount a loop device and shut its filesystem down)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("needs loop devices (/dev/loop-control is missing)".into());
    }
    for tool in ["mkfs.ext4", "mount", "umount"] {
        if !has_tool(tool) {
            return Some(format!("needs {tool} (apt-get install e2fsprogs mount)"));
        }
    }
    None
}

/// The acknowledged requests.
#[derive(Default)]
struct Acks {
    /// (user id, email).
    users: Mutex<Vec<(String, String)>>,
    /// (transaction id, user id, amount, kind).
    transactions: Mutex<Vec<(i64, String, i64, String)>>,
    retries: AtomicU64,
    /// Requests abandoned after RETRIES_MAX attempts (their outcome unknown).
    gave_up: AtomicU64,
    /// Non-2xx answers by status, retried or not.
    answers: Mutex<std::collections::BTreeMap<u16, u64>>,
}

/// The box under test: where it keeps its data and how to (re)start its processes.
struct Box_ {
    opts: PowerCut,
    bin_dir: PathBuf,
    image: PathBuf,
    mnt: PathBuf,
    logs: PathBuf,
    broker_port: u16,
    users_port: u16,
    ledger_port: u16,
    /// broker, user-service, transaction-service
    procs: Vec<Option<Proc>>,
    /// The broker's passwords and ACL (outside the image: a power cut must not eat them).
    access: BrokerAccess,
}

const NAMES: [&str; 3] = ["mosquitto", "user-service", "transaction-service"];

impl Box_ {
    fn users(&self) -> String {
        format!("http://127.0.0.1:{}", self.users_port)
    }

    fn ledger(&self) -> String {
        format!("http://127.0.0.1:{}", self.ledger_port)
    }

    fn mount(&self) -> anyhow::Result<()> {
        run_cmd(
            "mount",
            &[
                "-o",
                "loop",
                self.image.to_str().unwrap(),
                self.mnt.to_str().unwrap(),
            ],
        )
    }

    async fn unmount(&self) -> anyhow::Result<()> {
        for attempt in 0.. {
            match run_cmd("umount", &[self.mnt.to_str().unwrap()]) {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= 50 => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        unreachable!()
    }

    async fn start(&mut self, which: usize) -> anyhow::Result<()> {
        let name = NAMES[which];
        let log = Output::File(self.logs.join(format!("{name}.log")));
        let broker = format!("mqtt://127.0.0.1:{}", self.broker_port);
        let proc = match which {
            0 => {
                let conf = self.opts.dir.join("mosquitto.conf");
                let mut p = spawn(
                    name,
                    Command::new(&self.opts.mosquitto).arg("-c").arg(&conf),
                    log,
                )?;
                wait_listening(&format!("127.0.0.1:{}", self.broker_port), &mut p).await?;
                p
            }
            _ => {
                let port = if which == 1 {
                    self.users_port
                } else {
                    self.ledger_port
                };
                let mut cmd = Command::new(self.bin_dir.join(name));
                cmd.envs(self.access.service_env(name))
                    .env_remove("TOPIC_PREFIX")
                    .arg("--db")
                    .arg(self.mnt.join(format!("{name}.db")))
                    .args([
                        "--listen",
                        &format!("127.0.0.1:{port}"),
                        "--broker",
                        &broker,
                    ])
                    .args([
                        "--relay-heads-interval-ms",
                        "1000",
                        "--consumer-gap-timeout-ms",
                        "500",
                    ])
                    .args([
                        "--consumer-replay-retry-ms",
                        "2000",
                        "--reconnect-backoff-max-ms",
                        "1000",
                    ]);
                let p = spawn(name, &mut cmd, log)?;
                wait_healthy(&format!("http://127.0.0.1:{port}"))
                    .await
                    .with_context(|| {
                        format!("{name} after restart; see {}", self.logs.display())
                    })?;
                p
            }
        };
        self.procs[which] = Some(proc);
        Ok(())
    }

    async fn start_all(&mut self) -> anyhow::Result<()> {
        for which in 0..3 {
            self.start(which).await?;
        }
        Ok(())
    }

    fn signal_all(&self, sig: i32) {
        for p in self.procs.iter().flatten() {
            if let Some(pid) = p.child.id() {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, sig);
                }
            }
        }
    }

    async fn kill(&mut self, which: usize) {
        if let Some(mut p) = self.procs[which].take() {
            let _ = p.child.kill().await;
        }
    }

    /// Freeze, shut the filesystem down without flushing, kill, remount, restart.
    async fn cut_power(&mut self) -> anyhow::Result<()> {
        self.signal_all(libc::SIGSTOP);
        // kill(2) returns before every thread has stopped: wait for all of them, so
        // that no thread sees the filesystem die (a powered-off machine runs nothing).
        let pids: Vec<u32> = self
            .procs
            .iter()
            .flatten()
            .filter_map(|p| p.child.id())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !pids.iter().all(|pid| all_threads_stopped(*pid)) {
            if Instant::now() > deadline {
                bail!("the box's processes did not all stop within 2 s of SIGSTOP");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        {
            let dir = std::fs::File::open(&self.mnt).context("opening the mount point")?;
            let flags = FS_SHUTDOWN_NOLOGFLUSH;
            // SAFETY: FS_IOC_SHUTDOWN reads one u32 from the pointer, which outlives the call.
            let r =
                unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_SHUTDOWN as _, &flags as *const u32) };
            if r != 0 {
                bail!(
                    "FS_IOC_SHUTDOWN failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        for which in 0..3 {
            self.kill(which).await;
        }
        self.unmount().await?;
        self.mount()?;
        self.start_all().await
    }

    async fn stop_all(&mut self) {
        for which in [1, 2, 0] {
            if let Some(p) = self.procs[which].as_mut() {
                crate::admin::run_all::stop(p, Duration::from_secs(10)).await;
            }
            self.procs[which] = None;
        }
    }
}

/// True when every thread of `pid` is stopped (state `T` in /proc).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true; // gone
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .map(|stat| {
                // The state follows the command name, which is in parentheses.
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next())
                    .is_some_and(|state| state == 'T' || state == 't')
            })
            .unwrap_or(true)
    })
}

/// Retries of one request at most (100 ms apart) before the client gives up on it.
const RETRIES_MAX: u32 = 600;

/// Sends `body` until a definitive answer, with the same `Idempotency-Key` every time,
/// as a careful client does: a transport error or any 5xx leaves the outcome unknown
/// (the write may have committed), so it asks again. Every non-2xx final answer is
/// counted by status, so that the summary shows what the clients saw.
fn send(agent: &ureq::Agent, url: &str, key: &str, body: &Value, acks: &Acks) -> (u16, Value) {
    for _ in 0..RETRIES_MAX {
        let res = agent
            .post(url)
            .set("Idempotency-Key", key)
            .send_json(body.clone());
        match res {
            Ok(r) => return (r.status(), r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) if code < 500 => {
                *acks.answers.lock().unwrap().entry(code).or_default() += 1;
                return (code, r.into_json().unwrap_or(Value::Null));
            }
            Err(ureq::Error::Status(code, _)) => {
                *acks.answers.lock().unwrap().entry(code).or_default() += 1;
                acks.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(ureq::Error::Transport(_)) => {
                acks.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    acks.gave_up.fetch_add(1, Ordering::Relaxed);
    (0, Value::Null)
}

/// One client: creates users and transactions until `stop`, finishing the request in
/// progress (so that every committed request is acknowledged).
fn client(n: usize, users: String, ledger: String, stop: Arc<AtomicBool>, acks: Arc<Acks>) {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .build();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let known: Option<String> = {
            let u = acks.users.lock().unwrap();
            (!u.is_empty()).then(|| u[fastrand::usize(..u.len())].0.clone())
        };
        match known {
            Some(user_id) if fastrand::f64() < 0.6 => {
                let (kind, amount) = if fastrand::f64() < 0.2 {
                    ("debit", fastrand::i64(1..=50))
                } else {
                    ("credit", fastrand::i64(1..=500))
                };
                let body = json!({ "user_id": user_id, "amount_cents": amount, "kind": kind });
                let (status, t) = send(
                    &agent,
                    &format!("{ledger}/transactions"),
                    &format!("t-{n}-{i}"),
                    &body,
                    &acks,
                );
                if status == 201 {
                    let id = t["id"].as_i64().unwrap_or(-1);
                    acks.transactions
                        .lock()
                        .unwrap()
                        .push((id, user_id, amount, kind.to_owned()));
                }
            }
            _ => {
                let email = format!("pc-{n}-{i}@example.com");
                let body = json!({ "name": format!("Client {n} user {i}"), "email": email });
                let (status, u) = send(
                    &agent,
                    &format!("{users}/users"),
                    &format!("u-{n}-{i}"),
                    &body,
                    &acks,
                );
                if status == 201 {
                    acks.users
                        .lock()
                        .unwrap()
                        .push((u["id"].as_str().unwrap_or("?").to_owned(), email));
                }
            }
        }
    }
}

/// Runs the harness; returns the summary line, or an error naming every violation.
pub async fn run(opts: PowerCut) -> anyhow::Result<String> {
    if opts.mode == Mode::Power {
        if let Some(missing) = missing_prerequisites() {
            return Ok(format!("power-cut: SKIPPED: {missing}"));
        }
    }
    let bin_dir = bin_dir(&opts.bin_dir)?;
    let dir = opts.dir.clone();
    let mnt = dir.join("mnt");
    let _ = run_cmd("umount", &[mnt.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_dir_all(&dir);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(&mnt)?;
    let image = dir.join("disk.img");
    let mut b = Box_ {
        bin_dir,
        image: image.clone(),
        mnt: mnt.clone(),
        logs,
        broker_port: free_port()?,
        users_port: free_port()?,
        ledger_port: free_port()?,
        procs: vec![None, None, None],
        opts: opts.clone(),
        access: broker_access::ensure(&dir.join("mqtt"), DEFAULT_TOPIC_PREFIX)?,
    };
    if opts.mode == Mode::Power {
        std::fs::File::create(&image)?.set_len(512 * 1024 * 1024)?;
        run_cmd("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()])?;
        b.mount()?;
    }
    std::fs::create_dir_all(mnt.join("mosquitto"))?;
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "listener {} 127.0.0.1\n{}set_tcp_nodelay true\nuser root\npersistence true\npersistence_location {}/\nautosave_interval 5\nmax_queued_messages 100000\nmax_inflight_messages 1000\n",
            b.broker_port,
            b.access.mosquitto_conf_lines(),
            mnt.join("mosquitto").display()
        ),
    )?;
    let result = exercise(&mut b).await;
    b.stop_all().await;
    if opts.mode == Mode::Power {
        let _ = b.unmount().await;
    }
    result
}

async fn exercise(b: &mut Box_) -> anyhow::Result<String> {
    let opts = b.opts.clone();
    b.start_all().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Acks::default());
    let clients: Vec<_> = (0..opts.clients)
        .map(|n| {
            let (users, ledger, stop, acks) = (b.users(), b.ledger(), stop.clone(), acks.clone());
            std::thread::spawn(move || client(n, users, ledger, stop, acks))
        })
        .collect();

    let max = opts.interval_ms.max(10);
    for cycle in 1..=opts.cycles {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(max / 5..=max))).await;
        match opts.mode {
            Mode::Power => {
                b.cut_power()
                    .await
                    .with_context(|| format!("power cut {cycle}"))?;
                println!(
                    "power-cut: cycle {cycle}/{}: power cut, box restarted; {} acknowledged so far",
                    opts.cycles,
                    acknowledged(&acks)
                );
            }
            Mode::Kill => {
                let which = fastrand::usize(0..3);
                b.kill(which).await;
                b.start(which)
                    .await
                    .with_context(|| format!("restarting {} in cycle {cycle}", NAMES[which]))?;
                println!(
                    "power-cut: cycle {cycle}/{}: SIGKILLed {}, restarted; {} acknowledged so far",
                    opts.cycles,
                    NAMES[which],
                    acknowledged(&acks)
                );
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(max)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    }
    drain(b).await?;
    b.stop_all().await;
    check(b, &acks)
}

fn acknowledged(acks: &Acks) -> usize {
    acks.users.lock().unwrap().len() + acks.transactions.lock().unwrap().len()
}

/// Waits until both outboxes are empty and both consumers have no lag.
async fn drain(b: &Box_) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut idle = true;
        for base in [b.users(), b.ledger()] {
            let s = http("GET", format!("{base}/outbox"), None)
                .await
                .map_or(Value::Null, |(_, v)| v);
            let lag: u64 = s["consumer"]["streams"].as_object().map_or(1, |m| {
                m.values().map(|v| v["lag"].as_u64().unwrap_or(1)).sum()
            });
            idle &= s["outbox"]["pending"] == 0 && lag == 0;
        }
        if idle {
            // One more head announcement, so that a lost tail would have shown.
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the box did not drain within 120 s; see {}",
                b.logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn check(b: &Box_, acks: &Acks) -> anyhow::Result<String> {
    let open = |name: &str| -> anyhow::Result<Connection> {
        let path = b.mnt.join(format!("{name}.db"));
        Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))
    };
    let (users_db, ledger_db) = (open("user-service")?, open("transaction-service")?);
    let mut violations = Vec::new();
    let users = acks.users.lock().unwrap();
    let transactions = acks.transactions.lock().unwrap();
    let mut lost = 0;
    for (id, email) in users.iter() {
        let found: Option<String> = users_db
            .query_row("SELECT email FROM users WHERE uid = ?1", [id], |r| r.get(0))
            .ok();
        if found.as_deref() != Some(email.as_str()) {
            lost += 1;
            violations.push(format!(
                "acknowledged user {id} <{email}> is missing (found {found:?})"
            ));
        }
    }
    for (id, user_id, amount, kind) in transactions.iter() {
        let found: Option<(i64, String, String)> = ledger_db
            .query_row("SELECT amount_cents, user_id, kind FROM transactions WHERE id = ?1 AND welcome = 0", [id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .ok();
        if found != Some((*amount, user_id.clone(), kind.clone())) {
            lost += 1;
            violations.push(format!("acknowledged transaction {id} ({kind} {amount} for user {user_id}) is missing (found {found:?})"));
        }
    }
    let distinct_users: HashSet<&str> = users.iter().map(|u| u.0.as_str()).collect();
    let distinct_transactions: HashSet<i64> = transactions.iter().map(|t| t.0).collect();
    let user_rows: i64 = users_db.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?;
    let ledger_rows: i64 = ledger_db.query_row(
        "SELECT COUNT(*) FROM transactions WHERE welcome = 0",
        [],
        |r| r.get(0),
    )?;
    // Every committed request was retried with its key until acknowledged, so each row
    // maps to one acknowledgement; more rows than acknowledgements means one was
    // applied twice.
    let duplicated = (user_rows - distinct_users.len() as i64).max(0)
        + (ledger_rows - distinct_transactions.len() as i64).max(0);
    if duplicated > 0 {
        violations.push(format!(
            "{user_rows} users for {} acknowledged, {ledger_rows} transactions for {} acknowledged: a request was applied twice",
            distinct_users.len(),
            distinct_transactions.len()
        ));
        let mut stmt = ledger_db.prepare("SELECT id, user_id, amount_cents, kind, created_at FROM transactions WHERE welcome = 0 ORDER BY id")?;
        let extra: Vec<String> = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?
            .filter_map(Result::ok)
            .filter(|t| !distinct_transactions.contains(&t.0))
            .take(10)
            .map(|t| format!("{t:?}"))
            .collect();
        violations.push(format!(
            "unacknowledged ledger rows (first 10): {}",
            extra.join(", ")
        ));
    }
    let gave_up = acks.gave_up.load(Ordering::Relaxed);
    if gave_up > 0 {
        violations.push(format!(
            "{gave_up} requests were abandoned after {RETRIES_MAX} attempts"
        ));
    }
    let pending = outbox::stats(&users_db)?.pending + outbox::stats(&ledger_db)?.pending;
    let report = verify::verify(&Target {
        user_db: b.mnt.join("user-service.db"),
        transaction_db: b.mnt.join("transaction-service.db"),
        users_source: "user-service".into(),
        transactions_source: "transaction-service".into(),
        welcome_credit_cents: 1000,
    })?;
    for c in report.checks.iter().filter(|c| !c.ok) {
        violations.push(format!("verify: {}: {}", c.name, c.detail));
    }
    let summary = format!(
        "power-cut: mode={:?} cycles={} acknowledged={} lost={lost} duplicated={duplicated} pending={pending} client_retries={} other_answers={:?}",
        b.opts.mode,
        b.opts.cycles,
        users.len() + transactions.len(),
        acks.retries.load(Ordering::Relaxed),
        acks.answers.lock().unwrap()
    )
    .to_lowercase();
    if violations.is_empty() && users.len() + transactions.len() > 0 {
        Ok(summary)
    } else {
        if users.is_empty() {
            violations.push("no request was acknowledged at all".into());
        }
        bail!("{summary}\n{}", violations.join("\n"))
    }
}
