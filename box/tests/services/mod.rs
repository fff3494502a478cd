//! The box's services as child processes, for the box's end-to-end tests.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{free_port, Broker};

/// A service binary running as a child process, killed when dropped.
pub struct Service {
    pub name: &'static str,
    pub child: Child,
    /// http://127.0.0.1:PORT
    pub base: String,
    log: PathBuf,
}

impl Service {
    /// Starts `exe` on a free port with its database in `dir`, connected to
    /// `broker_url` with short recovery intervals; `tweak` adds arguments or
    /// environment. Waits until /healthz answers.
    pub fn start_with(
        name: &'static str,
        exe: &str,
        dir: &Path,
        broker_url: &str,
        tweak: impl FnOnce(&mut Command),
    ) -> Service {
        Service::start_under(None, name, exe, dir, broker_url, tweak)
    }

    /// [`Service::start_with`], run by `runner` (e.g. qemu-aarch64) when given.
    pub fn start_under(
        runner: Option<&str>,
        name: &'static str,
        exe: &str,
        dir: &Path,
        broker_url: &str,
        tweak: impl FnOnce(&mut Command),
    ) -> Service {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = match runner {
            Some(runner) => {
                let mut c = Command::new(runner);
                c.arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(["--db", dir.join(format!("{name}.db")).to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--broker", broker_url])
            .args([
                "--relay-heads-interval-ms",
                "300",
                "--consumer-gap-timeout-ms",
                "300",
            ])
            .env("RUST_LOG", "info")
            .env_remove("MQTT_USERNAME")
            .env_remove("MQTT_PASSWORD_FILE")
            .env_remove("MQTT_PASSWORD");
        tweak(&mut cmd);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
        let mut s = Service {
            name,
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        s.wait_healthy();
        s
    }

    /// [`Service::start_with`] on `broker` (anonymous), under a topic prefix of this
    /// test process.
    pub fn start(name: &'static str, exe: &str, dir: &Path, broker: &Broker) -> Service {
        Service::start_with(name, exe, dir, &broker.url(), |cmd| {
            cmd.args(["--topic-prefix", &format!("e2e-{}", std::process::id())]);
        })
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until /healthz answers (200, or 503 from a service that says why it is
    /// degraded), for at most 20 s.
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(
            ureq::get(&format!("{}/healthz", self.base)).call(),
            Ok(_) | Err(ureq::Error::Status(..))
        ) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited with {status}: {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not healthy within 20 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        response(ureq::get(&format!("{}{path}", self.base)).call())
    }

    pub fn post(&self, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
        let mut req = ureq::post(&format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.set("Idempotency-Key", k);
        }
        response(req.send_json(body))
    }

    /// SIGTERM; returns how the process exited and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{} did not stop within 15 s of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn response(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(res) => (res.status(), res.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, res)) => (code, res.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("HTTP request failed: {e}"),
    }
}

pub fn wait_until(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Nothing pending in the service's outbox and no consumer lag.
#[allow(dead_code)] // not every test file that includes this module uses it
pub fn drained(s: &Service) -> bool {
    let (_, st) = s.get("/outbox");
    let lag: u64 = st["consumer"]["streams"].as_object().map_or(1, |m| {
        m.values().map(|v| v["lag"].as_u64().unwrap_or(1)).sum()
    });
    st["outbox"]["pending"] == 0 && lag == 0
}

/// `edge-outbox verify` on the two databases in `dir`: its exit code and output.
pub fn verify(dir: &Path) -> (i32, String) {
    verify_with(dir, &[])
}

/// [`verify`] with extra arguments.
pub fn verify_with(dir: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .args([
            "verify",
            "--user-db",
            dir.join("user-service.db").to_str().unwrap(),
        ])
        .args([
            "--transaction-db",
            dir.join("transaction-service.db").to_str().unwrap(),
        ])
        .args(extra)
        .env_remove("WELCOME_CREDIT_CENTS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Creates `n` users named `{prefix}-{i}`; returns their ids.
pub fn create_users(users: &Service, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let body = json!({ "name": format!("{prefix}-{i}"), "email": format!("{prefix}-{i}@example.com") });
            let (status, user) = users.post("/users", body, None);
            assert_eq!(status, 201, "{user}");
            user["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Waits until each of `ids` has exactly one welcome credit in transaction-service's
/// ledger and its balance of 1000 in user-service.
pub fn wait_welcomed(users: &Service, ledger: &Service, ids: &[String]) {
    wait_until("each new user's one welcome credit", 30, || {
        ids.iter().all(|id| {
            let (_, t) = ledger.get(&format!("/transactions?user_id={id}"));
            let welcomes = t["transactions"]
                .as_array()
                .map_or(0, |t| t.iter().filter(|e| e["welcome"] == true).count());
            welcomes == 1 && users.get(&format!("/users/{id}")).1["balance_cents"] == 1000
        })
    });
}

/// `edge-outbox SUBCOMMAND --dir DIR` for a command that runs a box of its own: the
/// services from this build, mosquitto from Debian's /usr/sbin.
pub fn box_command(subcommand: &str, dir: &Path) -> Command {
    Broker::reserve(""); // fails loudly when mosquitto is missing
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_user-service"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-outbox"));
    cmd.arg(subcommand)
        .arg("--dir")
        .arg(dir)
        .arg("--bin-dir")
        .arg(bin_dir)
        .env("PATH", path);
    cmd
}

/// Runs `cmd` to its end and returns its standard output; fails the test, showing both
/// outputs, when it exits non-zero.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
