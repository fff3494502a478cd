//! A real NATS cluster (JetStream with its MQTT listener) on free loopback ports, each
//! node a `nats-server` process with its own config and store, as deploy/nats/ runs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// The binary Debian 12 installs (`apt-get install nats-server`).
fn nats_server() -> &'static str {
    if Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// deploy/nats/ of this repository (the tests run its files as shipped).
pub fn deploy_dir() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("deploy/nats/node.conf").exists() {
        assert!(
            dir.pop(),
            "deploy/nats/node.conf not found above CARGO_MANIFEST_DIR"
        );
    }
    dir.join("deploy/nats")
}

/// True, after saying loudly that the calling test is skipped and why, when
/// nats-server is missing (CI installs it, so there it never is).
pub fn missing() -> bool {
    if available() {
        return false;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a NATS test")
        .to_owned();
    super::skip(&test, "nats-server (apt-get install nats-server)");
    true
}

/// True when nats-server is installed; tests skip loudly otherwise (CI installs it).
pub fn available() -> bool {
    Command::new(nats_server())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub struct Node {
    pub name: String,
    pub mqtt_port: u16,
    conf: PathBuf,
    /// The environment deploy/nats/node.conf reads.
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Username and password of the readiness check, for configs that require them.
    login: Option<(String, String)>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` nodes (1 or 3) with `extra` config lines in each (e.g. an `authorization`
    /// block), started and ready for MQTT. Three nodes run deploy/nats/node.conf, the
    /// file shipped for deployments; one node runs without a cluster block.
    pub fn start(n: usize, extra: &str) -> Cluster {
        Cluster::start_as(n, extra, None)
    }

    /// Three nodes running deploy/nats/node.conf and users.conf as shipped: only
    /// user-service and transaction-service may connect, each with `password`.
    pub fn start_box(password: &str) -> Cluster {
        let users = std::fs::read_to_string(deploy_dir().join("users.conf")).unwrap();
        // As users.conf says: the variable holds the password in double quotes.
        let quoted = format!("\"{password}\"");
        Cluster::start_with_env(
            3,
            &users,
            Some(("user-service", password)),
            &[
                ("USER_SERVICE_MQTT_PASSWORD", &quoted),
                ("TRANSACTION_SERVICE_MQTT_PASSWORD", &quoted),
            ],
        )
    }

    /// [`Cluster::start`] for a config whose `authorization` requires a login: the
    /// readiness check logs in as `login` (username, password).
    pub fn start_as(n: usize, extra: &str, login: Option<(&str, &str)>) -> Cluster {
        Cluster::start_with_env(n, extra, login, &[])
    }

    fn start_with_env(
        n: usize,
        extra: &str,
        login: Option<(&str, &str)>,
        env: &[(&str, &str)],
    ) -> Cluster {
        assert!(
            available(),
            "nats-server is not installed: run `apt-get install -y nats-server` (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route, _)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, route, mqtt)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(format!("store-{name}"));
            let conf = dir.path().join(format!("{name}.conf"));
            let mut vars: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let body = if n == 3 {
                let node = deploy_dir().join("node.conf");
                for (k, v) in [
                    ("NATS_NAME", name.clone()),
                    ("NATS_CLIENT_LISTEN", format!("127.0.0.1:{client}")),
                    ("NATS_MQTT_LISTEN", format!("127.0.0.1:{mqtt}")),
                    ("NATS_ROUTE_LISTEN", format!("127.0.0.1:{route}")),
                    ("NATS_ROUTE_A", routes[0].clone()),
                    ("NATS_ROUTE_B", routes[1].clone()),
                    ("NATS_ROUTE_C", routes[2].clone()),
                    ("NATS_STORE", store.display().to_string()),
                ] {
                    vars.push((k.to_owned(), v));
                }
                // nats-server resolves `include` relative to the including file
                // only: the shipped text is copied instead.
                std::fs::read_to_string(node).unwrap()
            } else {
                assert_eq!(n, 1, "1 or 3 nodes");
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client}\n\
                     jetstream {{ store_dir: \"{}\", max_memory_store: 64MB, max_file_store: 1GB }}\n\
                     mqtt {{ listen: 127.0.0.1:{mqtt} }}\n",
                    store.display()
                )
            };
            std::fs::write(&conf, format!("{body}#extra\n{extra}\n")).unwrap();
            nodes.push(Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                mqtt_port: *mqtt,
                conf,
                env: vars,
                child: None,
            });
        }
        let login = login.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let mut c = Cluster { nodes, login, dir };
        for i in 0..n {
            c.launch(i);
        }
        for i in 0..n {
            c.wait_ready(i, Duration::from_secs(60));
        }
        c
    }

    /// mqtt://127.0.0.1:PORT of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    /// Every node, `first` first, as `--broker` takes them.
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|k| self.url((first + k) % n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i` (again) with its config and store.
    pub fn launch(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} already running", node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&node.conf)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        node.child = Some(child);
    }

    /// Waits until node `i` answers a QoS1 publish with a PUBACK: a cold cluster
    /// refuses MQTT for seconds while it elects leaders (FIELD-NOTES.md), so tests wait
    /// for this, never a fixed time.
    pub fn wait_ready(&mut self, i: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        let port = self.nodes[i].mqtt_port.to_string();
        loop {
            let exited = self.nodes[i].child.as_mut().unwrap().try_wait().unwrap();
            if let Some(status) = exited {
                panic!(
                    "{} exited with {status}: {}",
                    self.nodes[i].name,
                    self.log(i)
                );
            }
            let mut check = Command::new("mosquitto_pub");
            check
                // A topic every config lets user-service publish on, and that no
                // consumer reads (`_ready` is not a stream name).
                .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-m", "x"])
                .args(["-t", "edge-outbox/events/user-service/_ready"])
                .args(["-i", &format!("ready-check-{i}")]);
            if let Some((user, password)) = &self.login {
                check.args(["-u", user, "-P", password]);
            }
            let ok = check
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not accept an MQTT publish within {limit:?}: {}",
                self.nodes[i].name,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGHUP: node `i` reloads its config.
    pub fn reload(&self, i: usize, conf_extra: &str) {
        let node = &self.nodes[i];
        let text = std::fs::read_to_string(&node.conf).unwrap();
        let base = text.split("#extra\n").next().unwrap().to_owned();
        std::fs::write(&node.conf, format!("{base}#extra\n{conf_extra}\n")).unwrap();
        let pid = node.child.as_ref().expect("node running").id();
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGHUP);
        }
    }

    /// The log of node `i` (its last 4 KiB).
    pub fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let start = text.len().saturating_sub(4096);
        let start = (start..text.len())
            .find(|k| text.is_char_boundary(*k))
            .unwrap_or(0);
        text[start..].to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
