//! `edge-outbox cluster-demo`: the box beyond one machine, step by step. Starts a
//! 3-node NATS cluster (deploy/nats/ as shipped: JetStream, MQTT, each service its own
//! account), runs each service on a "host" of its own (a network namespace with its
//! own address when root, `ip` and `iptables` are at hand; plain loopback ports
//! otherwise, said so), user-service on node A and transaction-service on node B,
//! each given all three nodes. Under a steady load of new users it kills node A and
//! brings it back, cuts transaction-service's host off from the cluster for a while
//! (iptables DROP in its namespace) and reconnects it, then runs `verify`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use tokio::process::Command;

use crate::admin::broker_access;
use crate::admin::run_all::{
    bin_dir, free_port, has_tool, http, run_cmd, spawn, stop, wait_healthy, Output, Proc,
};
use crate::admin::verify;
use crate::contract::{TRANSACTION_SERVICE, USER_SERVICE};
use edge_outbox::protocol::DEFAULT_TOPIC_PREFIX;

/// deploy/nats/, built in: the demo runs the files that deployments run.
const NODE_CONF: &str = include_str!("../../../deploy/nats/node.conf");
const USERS_CONF: &str = include_str!("../../../deploy/nats/users.conf");
const BOX_CONF: &str = include_str!("../../../deploy/nats/box.conf");

/// Settings of the walk-through.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterDemo {
    /// The nats-server executable (Debian: apt-get install nats-server).
    #[arg(long, env = "NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// Folder holding user-service and transaction-service (default: this program's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where the demo keeps its databases, configs and logs (wiped at start).
    #[arg(long, default_value = "data/cluster-demo")]
    pub dir: PathBuf,
    /// How long transaction-service's host is cut off from the cluster, in seconds
    /// (longer than its 5 s keep-alive, so that it notices).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub partition_s: u64,
    /// Run everything on loopback even as root (no namespaces, no partition step).
    #[arg(long)]
    pub loopback: bool,
}

fn say(step: &str) {
    println!("\n== {step}");
}

/// Runs `ip ARGS`, failing with its error output.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_cmd("ip", args)
}

/// A service's "host": a network namespace joined to this machine by a veth pair.
struct Host {
    ns: String,
    /// This machine's end of the veth pair, once made.
    outer: Option<String>,
    /// This machine's end (where the NATS nodes listen for it).
    gateway: String,
    /// The namespace's own address (where its service listens).
    addr: String,
}

impl Host {
    fn create(tag: &str, subnet: u32) -> anyhow::Result<Host> {
        let id = std::process::id();
        let ns = format!("eo-{tag}-{id}");
        let (outer, inner) = (format!("eo{tag}{id}h"), format!("eo{tag}{id}n"));
        // A /30 of its own per run: 10.SUBNET.X.Y, X.Y from the pid.
        let block = (id % 16_000) * 4;
        let octets = |k: u32| format!("10.{subnet}.{}.{}", block / 256, block % 256 + k);
        // Another run's namespace is never touched: this pid's names are its own, and
        // the guard that deletes it exists only once it was made here.
        ip(&["netns", "add", &ns]).with_context(|| {
            format!("network namespace {ns} (is another cluster-demo running?)")
        })?;
        let mut host = Host {
            ns: ns.clone(),
            outer: None,
            gateway: octets(1),
            addr: octets(2),
        };
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        host.outer = Some(outer.clone());
        ip(&["link", "set", &inner, "netns", &ns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", host.gateway),
            "dev",
            &outer,
        ])?;
        ip(&["link", "set", &outer, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/30", host.addr), "dev", &inner])?;
        inside(&["link", "set", &inner, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&["route", "add", "default", "via", &host.gateway])?;
        // iptables must run inside it (step 6): find out now, not half-way.
        run_cmd("ip", &["netns", "exec", &ns, "iptables", "-S"])
            .context("iptables does not run in the namespace")?;
        Ok(host)
    }

    /// Drops (`on`) or stops dropping every TCP packet between the namespace and
    /// `ports` (the cluster's MQTT ports): nothing is refused, nothing answers.
    fn cut(&self, ports: &[u16], on: bool) -> anyhow::Result<()> {
        let action = if on { "-I" } else { "-D" };
        for port in ports {
            let port = port.to_string();
            for (chain, flag) in [("OUTPUT", "--dport"), ("INPUT", "--sport")] {
                run_cmd(
                    "ip",
                    &[
                        "netns", "exec", &self.ns, "iptables", action, chain, "-p", "tcp", flag,
                        &port, "-j", "DROP",
                    ],
                )?;
            }
        }
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]); // takes its veth pair with it
        if let Some(outer) = &self.outer {
            let _ = ip(&["link", "del", outer]); // if it never moved in
        }
    }
}

/// One NATS node: its process, its MQTT address, and how to start it again.
struct Node {
    name: &'static str,
    mqtt: (String, u16),
    env: Vec<(String, String)>,
    conf: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

struct Demo {
    opts: ClusterDemo,
    nodes: Vec<Node>,
    services: Vec<Proc>,
    users: String,
    ledger: String,
    hosts: Option<(Host, Host)>,
    login: (String, String),
}

/// One QoS1 publish as `login` answered by a PUBACK within 3 s: the node takes MQTT.
/// The password goes in the CONNECT, never on a command line.
async fn mqtt_ready(host: &str, port: u16, login: &(String, String)) -> bool {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(
        format!("cluster-demo-ready-{}", std::process::id()),
        host,
        port,
    );
    opts.set_credentials(login.0.clone(), login.1.clone());
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    let attempt = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // A topic user-service may publish on, and that no consumer reads.
                    let topic = format!("{DEFAULT_TOPIC_PREFIX}/events/{USER_SERVICE}/_ready");
                    if client
                        .try_publish(topic, QoS::AtLeastOnce, false, "x")
                        .is_err()
                    {
                        return false;
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    };
    let ok = tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .unwrap_or(false);
    let _ = client.try_disconnect();
    ok
}

/// Why root-only steps cannot run here, if they cannot.
fn namespaces_missing() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables"] {
        if !has_tool(tool) {
            return Some(format!(
                "{tool} is missing (apt-get install iproute2 iptables)"
            ));
        }
    }
    None
}

/// Runs the walk-through.
pub async fn run(opts: ClusterDemo) -> anyhow::Result<()> {
    let bin_dir = bin_dir(&opts.bin_dir)?;
    let dir = opts.dir.clone();
    // Wiped only when it is an earlier run's (it holds the marker), or empty.
    let marker = dir.join(".cluster-demo");
    if dir.exists() {
        let empty = std::fs::read_dir(&dir)?.next().is_none();
        if !marker.exists() && !empty {
            bail!(
                "{} holds files that cluster-demo did not write: give another --dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        &marker,
        "written by edge-outbox cluster-demo; wiped at its next start\n",
    )?;
    let access = broker_access::ensure(&dir.join("mqtt"), DEFAULT_TOPIC_PREFIX)?;
    let password = |account: &str| -> anyhow::Result<String> {
        let p = std::fs::read_to_string(access.password_file(account))?;
        Ok(p.trim_end().to_owned())
    };
    let secrets = [
        ("USER_SERVICE_MQTT_PASSWORD", password(USER_SERVICE)?),
        (
            "TRANSACTION_SERVICE_MQTT_PASSWORD",
            password(TRANSACTION_SERVICE)?,
        ),
    ];

    let why_not = if opts.loopback {
        Some("--loopback".to_owned())
    } else {
        namespaces_missing()
    };
    let hosts = match &why_not {
        None => Some((Host::create("u", 201)?, Host::create("t", 202)?)),
        Some(why) => {
            println!(
                "\n!! NO NETWORK NAMESPACES ({why}): every \"host\" is a loopback port of this machine, \
                 and the partition step is skipped. Run as root with iproute2 and iptables for the whole demo."
            );
            None
        }
    };
    // Where each node's MQTT listener is: on this machine's end of a service host's
    // link (reachable from both hosts through their default routes), or on loopback.
    let (a_ip, b_ip) = match &hosts {
        Some((u, t)) => (u.gateway.clone(), t.gateway.clone()),
        None => ("127.0.0.1".to_owned(), "127.0.0.1".to_owned()),
    };
    let names = ["nats-a", "nats-b", "nats-c"];
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let mut nodes = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let node_dir = dir.join(name);
        std::fs::create_dir_all(&node_dir)?;
        for (file, text) in [
            ("node.conf", NODE_CONF),
            ("users.conf", USERS_CONF),
            ("box.conf", BOX_CONF),
        ] {
            std::fs::write(node_dir.join(file), text)?;
        }
        let mqtt = (
            if i == 1 { b_ip.clone() } else { a_ip.clone() },
            free_port()?,
        );
        let mut env: Vec<(String, String)> = vec![
            ("NATS_NAME".into(), name.into()),
            (
                "NATS_CLIENT_LISTEN".into(),
                format!("127.0.0.1:{}", free_port()?),
            ),
            ("NATS_MQTT_LISTEN".into(), format!("{}:{}", mqtt.0, mqtt.1)),
            (
                "NATS_ROUTE_LISTEN".into(),
                format!("127.0.0.1:{}", routes[i]),
            ),
            (
                "NATS_STORE".into(),
                node_dir.join("store").display().to_string(),
            ),
        ];
        for (var, port) in ["NATS_ROUTE_A", "NATS_ROUTE_B", "NATS_ROUTE_C"]
            .iter()
            .zip(&routes)
        {
            env.push((var.to_string(), format!("nats-route://127.0.0.1:{port}")));
        }
        // nats-server parses a variable's value as config: quoted, it is a string
        // whatever it holds (a password such as 4e1... would be read as a number).
        env.extend(
            secrets
                .iter()
                .map(|(k, v)| (k.to_string(), format!("\"{v}\""))),
        );
        nodes.push(Node {
            name,
            mqtt,
            env,
            conf: node_dir.join("box.conf"),
            log: dir.join(format!("{name}.log")),
            proc: None,
        });
    }
    let mut demo = Demo {
        opts,
        nodes,
        services: Vec::new(),
        users: String::new(),
        ledger: String::new(),
        hosts,
        login: (USER_SERVICE.to_owned(), secrets[0].1.clone()),
    };
    // Ctrl-C or SIGTERM: the children run in their own process groups and would
    // outlive this process, so stop them (and remove the namespaces) first.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = demo.walk(&bin_dir, &access) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    say("Stopping everything");
    for s in &mut demo.services {
        stop(s, Duration::from_secs(10)).await;
    }
    for node in &mut demo.nodes {
        if let Some(p) = node.proc.as_mut() {
            stop(p, Duration::from_secs(5)).await;
        }
    }
    drop(demo.hosts.take());
    result
}

impl Demo {
    fn url(&self, i: usize) -> String {
        let (host, port) = &self.nodes[i].mqtt;
        format!("mqtt://{host}:{port}")
    }

    /// Every node, `first` first, as `--broker` takes them.
    fn broker_list(&self, first: usize) -> String {
        (0..3)
            .map(|k| self.url((first + k) % 3))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn launch(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let mut cmd = Command::new(&self.opts.nats_server);
        cmd.arg("-c")
            .arg(&node.conf)
            .envs(node.env.iter().map(|(k, v)| (k, v)));
        node.proc = Some(
            spawn(node.name, &mut cmd, Output::File(node.log.clone())).with_context(|| {
                format!(
                    "starting {} (apt-get install nats-server)",
                    self.opts.nats_server.display()
                )
            })?,
        );
        Ok(())
    }

    /// Waits until node `i` answers a QoS1 publish (a cold cluster refuses MQTT for
    /// seconds while it elects leaders).
    async fn wait_ready(&mut self, i: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let (host, port) = self.nodes[i].mqtt.clone();
        loop {
            let ok = mqtt_ready(&host, port, &self.login).await;
            if ok {
                return Ok(started.elapsed());
            }
            let node = &mut self.nodes[i];
            if let Some(status) = node
                .proc
                .as_mut()
                .and_then(|p| p.child.try_wait().ok().flatten())
            {
                bail!(
                    "{} exited ({status}); see {}",
                    node.name,
                    node.log.display()
                );
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{} did not accept MQTT within 60 s; see {}",
                    node.name,
                    node.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn status(&self, base: &str) -> anyhow::Result<serde_json::Value> {
        Ok(http("GET", format!("{base}/outbox"), None).await?.1)
    }

    async fn walk(
        &mut self,
        bin_dir: &Path,
        access: &broker_access::BrokerAccess,
    ) -> anyhow::Result<()> {
        say("1. Starting a 3-node NATS cluster (deploy/nats/: JetStream, MQTT, stream_replicas 3, one account per service)");
        for i in 0..3 {
            self.launch(i)?;
        }
        for i in 0..3 {
            let took = self.wait_ready(i).await?;
            println!(
                "   {} accepts MQTT on {} ({:.1} s)",
                self.nodes[i].name,
                self.url(i),
                took.as_secs_f64()
            );
        }

        say("2. Starting user-service on its host, connected to nats-a, and transaction-service on its own, connected to nats-b (each is given all three nodes)");
        for (n, (name, first)) in [(USER_SERVICE, 0), (TRANSACTION_SERVICE, 1)]
            .into_iter()
            .enumerate()
        {
            let port = free_port()?;
            let (listen, mut cmd) = match &self.hosts {
                Some((u, t)) => {
                    let host = if n == 0 { u } else { t };
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", &host.ns]).arg(bin_dir.join(name));
                    (format!("{}:{port}", host.addr), c)
                }
                None => (
                    format!("127.0.0.1:{port}"),
                    Command::new(bin_dir.join(name)),
                ),
            };
            cmd.envs(access.service_env(name))
                .env_remove("TOPIC_PREFIX")
                .arg("--db")
                .arg(self.opts.dir.join(format!("{name}.db")))
                .args(["--listen", &listen, "--broker", &self.broker_list(first)])
                .args([
                    "--mqtt-keep-alive-s",
                    "5",
                    "--reconnect-backoff-max-ms",
                    "2000",
                ])
                .args(["--relay-heads-interval-ms", "1000"]);
            self.services.push(spawn(
                name,
                &mut cmd,
                Output::File(self.opts.dir.join(format!("{name}.log"))),
            )?);
            let base = format!("http://{listen}");
            wait_healthy(&base)
                .await
                .with_context(|| format!("see the logs in {}", self.opts.dir.display()))?;
            println!("   {name} answers on {base}");
            if n == 0 {
                self.users = base
            } else {
                self.ledger = base
            }
        }

        say("3. A steady load: a new user every 100 ms (each gets a welcome credit from transaction-service)");
        let load = Load::start(self.users.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!("   {} users created so far", load.created());

        say("4. SIGKILL of nats-a, the node user-service is connected to");
        let killed = Instant::now();
        if let Some(p) = self.nodes[0].proc.as_mut() {
            let _ = p.child.kill().await;
        }
        self.nodes[0].proc = None;
        let dead = self.url(0);
        loop {
            let s = self.status(&self.users).await?;
            let broker = s["broker"].as_str().unwrap_or("");
            if s["broker_connected"] == true
                && !broker.is_empty()
                && !dead.ends_with(&format!("//{broker}"))
            {
                if load.task.is_finished() {
                    return load.stop().await.map(|_| ());
                }
                println!("   user-service moved to {broker} after {:.1} s; {} users created so far, every one answered 201", killed.elapsed().as_secs_f64(), load.created());
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("user-service did not fail over within 60 s: {s}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        say("5. Bringing nats-a back");
        self.launch(0)?;
        let took = self.wait_ready(0).await?;
        println!("   nats-a accepts MQTT again ({:.1} s)", took.as_secs_f64());

        match &self.hosts {
            Some((_, t)) => {
                let secs = self.opts.partition_s;
                say(&format!("6. Cutting transaction-service's host off from every node for {secs} s (iptables DROP in its namespace)"));
                let ports: Vec<u16> = self.nodes.iter().map(|n| n.mqtt.1).collect();
                t.cut(&ports, true)?;
                let cut_at = Instant::now();
                let mut noticed = false;
                // Held until noticed: rumqttc notices after 1 to 2 keep-alives (5-10 s).
                while cut_at.elapsed() < Duration::from_secs(secs)
                    || (!noticed && cut_at.elapsed() < Duration::from_secs(secs + 15))
                {
                    let s = self.status(&self.ledger).await?;
                    if !noticed && s["consumer"]["connected"] == false {
                        noticed = true;
                        println!("   transaction-service noticed after {:.1} s (its keep-alive is 5 s); it still answers HTTP", cut_at.elapsed().as_secs_f64());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                if !noticed {
                    bail!(
                        "transaction-service did not notice the cut within {} s (keep-alive 5 s)",
                        secs + 15
                    );
                }
                let pending = self.status(&self.users).await?;
                println!("   {} users created; user-service kept publishing to the cluster ({} pending), which queues transaction-service's events in its session", load.created(), pending["outbox"]["pending"]);
                t.cut(&ports, false)?;
                say("7. Reconnected");
                let healed = Instant::now();
                loop {
                    let s = self.status(&self.ledger).await?;
                    if s["consumer"]["connected"] == true && s["broker_connected"] == true {
                        println!(
                            "   transaction-service is back after {:.1} s",
                            healed.elapsed().as_secs_f64()
                        );
                        break;
                    }
                    if healed.elapsed() > Duration::from_secs(60) {
                        bail!("transaction-service did not reconnect within 60 s: {s}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            None => say("6-7. Partition skipped: no network namespaces (see above)"),
        }

        say("8. Stopping the load; every user gets exactly one welcome credit");
        let ids = load.stop().await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        for id in &ids {
            loop {
                let (_, user) = http("GET", format!("{}/users/{id}", self.users), None).await?;
                if user["balance_cents"].as_i64() == Some(1000) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "user {id}: balance {} instead of 1000; see the logs in {}",
                        user["balance_cents"],
                        self.opts.dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        println!("   {} users, each credited", ids.len());

        say("9. verify: the cross-service invariants hold");
        verify::check_demo(&self.opts.dir).await
    }
}

/// New users, one every 100 ms, until stopped. Every POST must answer 201.
struct Load {
    stop: Arc<AtomicBool>,
    ids: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Load {
    fn start(base: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let (s, list) = (stop.clone(), ids.clone());
        let task = tokio::spawn(async move {
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let body = json!({"name": format!("Cluster {i}"), "email": format!("cluster{i}@example.com")});
                let (status, user) = http("POST", format!("{base}/users"), Some(body)).await?;
                if status != 201 {
                    bail!("POST /users answered {status}: {user}");
                }
                let id = user["id"]
                    .as_str()
                    .context("no id in the answer")?
                    .to_owned();
                list.lock().unwrap_or_else(|e| e.into_inner()).push(id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        });
        Load { stop, ids, task }
    }

    fn created(&self) -> usize {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn stop(self) -> anyhow::Result<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await??;
        Ok(std::mem::take(
            &mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}
