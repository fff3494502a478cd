//! `edge-outbox run-all`: the whole box in one terminal. Starts Mosquitto with the
//! repo's config, waits until it listens, starts user-service and transaction-service,
//! and prefixes every line they print with their name. Ctrl-C (or SIGTERM) stops the
//! services first (SIGTERM: they finish in-flight work), then the broker. If any of
//! them exits on its own, the others are stopped too and the exit is reported.
//!
//! Before the broker starts, the broker's passwords and ACL are prepared in `data/mqtt/`
//! ([`super::broker_access`]; created on first start), and each service connects with
//! its own username and password file.
//!
//! The children run in their own process groups, so that a terminal's Ctrl-C reaches
//! only this supervisor, which then stops them in order.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use edge_outbox::protocol::DEFAULT_TOPIC_PREFIX;

use super::broker_access;

/// Where run-all keeps the broker's passwords and ACL (mosquitto.conf names them).
pub const BROKER_ACCESS_DIR: &str = "data/mqtt";

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct RunAll {
    /// Mosquitto configuration for the box.
    #[arg(long, default_value = "mosquitto.conf")]
    pub mosquitto_conf: PathBuf,
    /// The mosquitto executable.
    #[arg(long, env = "MOSQUITTO", default_value = "mosquitto")]
    pub mosquitto: PathBuf,
    /// The services' topic prefix (as they read it), for the broker's ACL.
    #[arg(long, env = "TOPIC_PREFIX", default_value = DEFAULT_TOPIC_PREFIX)]
    pub topic_prefix: String,
    /// Address the broker listens on (as set in the config), to wait for.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker_addr: String,
    /// Folder holding user-service and transaction-service (default: this program's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// How long each service may take to stop after SIGTERM before it is killed.
    #[arg(long, default_value_t = 10)]
    pub stop_timeout_s: u64,
}

/// A child process of the box.
pub(crate) struct Proc {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
}

/// Where a child's output goes.
pub(crate) enum Output {
    /// Printed, each line prefixed with the child's name.
    Prefixed,
    /// Appended to a file.
    File(PathBuf),
}

/// Starts `cmd` in its own process group (a terminal's Ctrl-C reaches only us).
pub(crate) fn spawn(name: &'static str, cmd: &mut Command, output: Output) -> anyhow::Result<Proc> {
    cmd.stdin(Stdio::null()).process_group(0).kill_on_drop(true);
    match &output {
        Output::Prefixed => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        Output::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(prefix_lines(name, out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(prefix_lines(name, err));
    }
    if matches!(output, Output::Prefixed) {
        println!("[run-all] started {name} (pid {})", child.id().unwrap_or(0));
    }
    Ok(Proc { name, child })
}

async fn prefix_lines(name: &'static str, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("[{name:<19}] {line}");
    }
}

/// SIGTERM, then SIGKILL after `timeout`.
pub(crate) async fn stop(p: &mut Proc, timeout: Duration) {
    let Some(pid) = p.child.id() else { return };
    // SAFETY: kill(2) on a child we spawned and have not reaped: the pid is ours.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    match tokio::time::timeout(timeout, p.child.wait()).await {
        Ok(Ok(status)) => println!("[box] {} stopped ({status})", p.name),
        _ => {
            println!(
                "[box] {} did not stop within {timeout:?}: killing it",
                p.name
            );
            let _ = p.child.kill().await;
        }
    }
}

/// Waits until `addr` accepts connections, failing if `broker` exits first.
pub(crate) async fn wait_listening(addr: &str, broker: &mut Proc) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = broker.child.try_wait()? {
            bail!("mosquitto exited ({status}) before listening on {addr}; is another broker already using the port?");
        }
        if tokio::time::Instant::now() > deadline {
            bail!("mosquitto did not listen on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The folder of user-service and transaction-service: `given`, or this program's.
pub(crate) fn bin_dir(given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(d) => Ok(d.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("this program has no folder")?
            .to_owned()),
    }
}

/// Runs `program ARGS` to its end, failing with its error output.
pub(crate) fn run_cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// True when `tool` is on PATH or in /sbin or /usr/sbin (root's tools, often not on
/// a user's PATH).
pub(crate) fn has_tool(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args([
            "-c",
            &format!("command -v {tool} || test -x /sbin/{tool} || test -x /usr/sbin/{tool}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A loopback port nobody listens on now.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One HTTP call, off the async threads.
pub(crate) async fn http(
    method: &'static str,
    url: String,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    tokio::task::spawn_blocking(move || {
        let req = ureq::request(method, &url).timeout(Duration::from_secs(10));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => Ok((r.status(), r.into_json().unwrap_or(Value::Null))),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_json().unwrap_or(Value::Null))),
            Err(e) => Err(anyhow::anyhow!("{method} {url}: {e}")),
        }
    })
    .await?
}

/// Waits until `base`/healthz answers, for at most 30 s.
pub(crate) async fn wait_healthy(base: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http("GET", format!("{base}/healthz"), None).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("{base} did not answer /healthz within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs the box until Ctrl-C, SIGTERM, or one of its processes exits.
pub async fn run(opts: RunAll) -> anyhow::Result<()> {
    let bin_dir = bin_dir(&opts.bin_dir)?;
    if !opts.mosquitto_conf.exists() {
        bail!(
            "{} not found: run from the repository root or pass --mosquitto-conf",
            opts.mosquitto_conf.display()
        );
    }
    std::fs::create_dir_all("data/mosquitto").context("creating data/mosquitto")?;
    let access = broker_access::ensure(Path::new(BROKER_ACCESS_DIR), &opts.topic_prefix)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let mut broker = spawn(
        "mosquitto",
        Command::new(&opts.mosquitto)
            .arg("-c")
            .arg(&opts.mosquitto_conf),
        Output::Prefixed,
    )?;
    wait_listening(&opts.broker_addr, &mut broker).await?;
    let mut services = Vec::new();
    for name in ["user-service", "transaction-service"] {
        let path = bin_dir.join(name);
        if !path.exists() {
            stop(&mut broker, Duration::from_secs(5)).await;
            bail!(
                "{} not found: build first (make build) or pass --bin-dir",
                path.display()
            );
        }
        let mut cmd = Command::new(path);
        cmd.envs(access.service_env(name));
        services.push(spawn(name, &mut cmd, Output::Prefixed)?);
    }
    println!("[run-all] the box is up: user-service on 127.0.0.1:8081, transaction-service on 127.0.0.1:8082; Ctrl-C stops everything");

    let failed = {
        let [a, b] = &mut services[..] else {
            unreachable!("two services")
        };
        tokio::select! {
            _ = term.recv() => None,
            _ = int.recv() => None,
            s = a.child.wait() => Some((a.name, s)),
            s = b.child.wait() => Some((b.name, s)),
            s = broker.child.wait() => Some((broker.name, s)),
        }
    };
    if let Some((name, status)) = &failed {
        println!("[run-all] {name} exited on its own ({status:?}); stopping the rest");
    } else {
        println!("[run-all] stopping: services first, then the broker");
    }
    let timeout = Duration::from_secs(opts.stop_timeout_s);
    for s in &mut services {
        stop(s, timeout).await;
    }
    stop(&mut broker, timeout).await;
    match failed {
        Some((name, _)) => bail!("{name} exited unexpectedly; see its lines above"),
        None => Ok(()),
    }
}
