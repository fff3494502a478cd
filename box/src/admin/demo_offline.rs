//! `edge-outbox demo-offline`: offline first, shown step by step. Starts a box of its
//! own (free ports, data in `data/demo-offline/`), stops its broker, keeps creating
//! users and transactions (every request still succeeds), shows the backlog growing,
//! starts the broker again, shows the backlog draining, and runs `verify`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use tokio::process::Command;

use crate::admin::run_all::{
    bin_dir, free_port, http, spawn, stop, wait_healthy, wait_listening, Output, Proc,
};
use edge_outbox::protocol::DEFAULT_TOPIC_PREFIX;

use crate::admin::broker_access;
use crate::admin::verify;

/// Settings of the walk-through.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOffline {
    /// The mosquitto executable.
    #[arg(long, env = "MOSQUITTO", default_value = "mosquitto")]
    pub mosquitto: PathBuf,
    /// Folder holding user-service and transaction-service (default: this program's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where the demo keeps its databases and logs (wiped at start).
    #[arg(long, default_value = "data/demo-offline")]
    pub dir: PathBuf,
}

fn say(step: &str) {
    println!("\n== {step}");
}

struct Box_ {
    broker: Proc,
    services: Vec<Proc>,
    broker_port: u16,
    users: String,
    ledger: String,
}

async fn pending(base: &str) -> anyhow::Result<(u64, Option<i64>)> {
    let (_, s) = http("GET", format!("{base}/outbox"), None).await?;
    Ok((
        s["outbox"]["pending"].as_u64().unwrap_or(0),
        s["outbox"]["oldest_pending_age_ms"].as_i64(),
    ))
}

async fn start_broker(
    opts: &DemoOffline,
    conf: &std::path::Path,
    port: u16,
    log: PathBuf,
) -> anyhow::Result<Proc> {
    let mut broker = spawn(
        "mosquitto",
        Command::new(&opts.mosquitto).arg("-c").arg(conf),
        Output::File(log),
    )?;
    wait_listening(&format!("127.0.0.1:{port}"), &mut broker).await?;
    Ok(broker)
}

/// Runs the walk-through.
pub async fn run(opts: DemoOffline) -> anyhow::Result<()> {
    let bin_dir = bin_dir(&opts.bin_dir)?;
    let dir = &opts.dir;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (broker_port, users_port, ledger_port) = (free_port()?, free_port()?, free_port()?);
    let conf = dir.join("mosquitto.conf");
    let access = broker_access::ensure(&dir.join("mqtt"), DEFAULT_TOPIC_PREFIX)?;
    std::fs::write(
        &conf,
        format!(
            "listener {broker_port} 127.0.0.1\n{}set_tcp_nodelay true\npersistence false\n",
            access.mosquitto_conf_lines()
        ),
    )?;

    say(&format!(
        "Starting a box of its own: Mosquitto on 127.0.0.1:{broker_port}, user-service on :{users_port}, transaction-service on :{ledger_port} (logs and databases in {})",
        dir.display()
    ));
    let broker = start_broker(&opts, &conf, broker_port, dir.join("mosquitto.log")).await?;
    let mut services = Vec::new();
    for (name, port) in [
        ("user-service", users_port),
        ("transaction-service", ledger_port),
    ] {
        let mut cmd = Command::new(bin_dir.join(name));
        cmd.envs(access.service_env(name))
            .env_remove("TOPIC_PREFIX")
            .arg("--db")
            .arg(dir.join(format!("{name}.db")))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--broker",
                &format!("mqtt://127.0.0.1:{broker_port}"),
            ])
            .args([
                "--relay-heads-interval-ms",
                "1000",
                "--reconnect-backoff-max-ms",
                "1000",
            ]);
        services.push(spawn(
            name,
            &mut cmd,
            Output::File(dir.join(format!("{name}.log"))),
        )?);
    }
    let mut b = Box_ {
        broker,
        services,
        broker_port,
        users: format!("http://127.0.0.1:{users_port}"),
        ledger: format!("http://127.0.0.1:{ledger_port}"),
    };
    let result = walk(&opts, &conf, &mut b).await;
    say("Stopping the box");
    for s in &mut b.services {
        stop(s, Duration::from_secs(10)).await;
    }
    stop(&mut b.broker, Duration::from_secs(5)).await;
    result
}

async fn walk(opts: &DemoOffline, conf: &std::path::Path, b: &mut Box_) -> anyhow::Result<()> {
    for base in [&b.users, &b.ledger] {
        wait_healthy(base)
            .await
            .with_context(|| format!("see the logs in {}", opts.dir.display()))?;
    }

    say("1. With the broker up: creating 3 users");
    let mut ids = Vec::new();
    for i in 1..=3 {
        let (status, user) = http(
            "POST",
            format!("{}/users", b.users),
            Some(json!({"name": format!("Online {i}"), "email": format!("online{i}@example.com")})),
        )
        .await?;
        println!("   POST /users -> {status}, user {}", user["id"]);
        ids.push(
            user["id"]
                .as_str()
                .context("no id in the answer")?
                .to_owned(),
        );
    }
    for id in &ids {
        wait_balance(&b.users, id, 1000).await?;
    }
    println!("   each got its welcome credit: balance 1000 in user-service");

    say("2. Stopping the broker (SIGTERM): the box is offline");
    stop(&mut b.broker, Duration::from_secs(5)).await;

    say("3. Writes keep succeeding while the broker is down; the backlog grows");
    for i in 1..=5 {
        let (status, user) = http(
            "POST",
            format!("{}/users", b.users),
            Some(
                json!({"name": format!("Offline {i}"), "email": format!("offline{i}@example.com")}),
            ),
        )
        .await?;
        let (pending, oldest) = pending(&b.users).await?;
        println!("   POST /users -> {status}, user {}; user-service outbox: {pending} pending, oldest {} ms", user["id"], oldest.unwrap_or(0));
        if status != 201 {
            bail!("expected 201 while offline, got {status}: {user}");
        }
    }
    for (n, id) in ids.iter().enumerate() {
        let (status, t) = http(
            "POST",
            format!("{}/transactions", b.ledger),
            Some(json!({"user_id": id, "amount_cents": 100 * (n + 1), "kind": "debit"})),
        )
        .await?;
        let (pending, _) = pending(&b.ledger).await?;
        println!("   POST /transactions (debit {} cents from user {id}) -> {status}; transaction-service outbox: {pending} pending", t["amount_cents"]);
    }

    say("4. Starting the broker again");
    b.broker = start_broker(opts, conf, b.broker_port, opts.dir.join("mosquitto.log")).await?;

    say("5. The backlog drains, in order");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (u, _) = pending(&b.users).await?;
        let (t, _) = pending(&b.ledger).await?;
        println!("   pending: user-service {u}, transaction-service {t}");
        if u == 0 && t == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the backlog did not drain within 60 s; see the logs in {}",
                opts.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (n, id) in ids.iter().enumerate() {
        wait_balance(&b.users, id, 1000 - 100 * (n as i64 + 1)).await?;
    }
    let (_, users) = http("GET", format!("{}/users?limit=20", b.users), None).await?;
    let offline = users["users"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["name"].as_str().is_some_and(|n| n.starts_with("Offline")));
    for u in offline {
        wait_balance(&b.users, u["id"].as_str().unwrap_or("?"), 1000).await?;
    }
    println!(
        "   every offline user got its welcome credit; every offline debit reached user-service"
    );

    say("6. verify: the cross-service invariants hold");
    verify::check_demo(&opts.dir).await
}

async fn wait_balance(base: &str, id: &str, want: i64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, user) = http("GET", format!("{base}/users/{id}"), None).await?;
        if user["balance_cents"].as_i64() == Some(want) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "user {id}: balance {} instead of {want} after 30 s",
                user["balance_cents"]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
