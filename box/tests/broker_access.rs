//! Only the box's own services speak on its topics: the shipped mosquitto.conf (its
//! listener and data paths moved to a temp dir and a free port) with the passwords and
//! ACL that `run-all` creates, the real services, and attackers with mosquitto_pub.
//! Regression tests for issue 11: each attack below worked on the open broker.
#![allow(clippy::result_large_err)]

// The library's test support (real brokers, databases), shared rather than copied.
mod services;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_box::admin::broker_access::{self, BrokerAccess, OBSERVER};
use edge_box::contract::{TRANSACTION_SERVICE, USER_SERVICE};
use edge_outbox::protocol::DEFAULT_TOPIC_PREFIX as P;
use serde_json::json;
use services::{wait_until, Service};
use support::free_port;

/// Mosquitto with the repo's mosquitto.conf: every line kept except the listener, the
/// persistence folder, the password file and the ACL, which point into `dir`.
struct ShippedBroker {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl ShippedBroker {
    fn start(dir: &Path, access: &BrokerAccess) -> ShippedBroker {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../mosquitto.conf"),
        )
        .unwrap();
        let port = free_port();
        std::fs::create_dir_all(dir.join("mosquitto")).unwrap();
        let mut conf = String::new();
        for line in shipped.lines() {
            let key = line.split_whitespace().next().unwrap_or("");
            let line = match key {
                "listener" => format!("listener {port} 127.0.0.1"),
                "persistence_location" => {
                    format!("persistence_location {}/", dir.join("mosquitto").display())
                }
                "password_file" => format!("password_file {}", access.passwd().display()),
                "acl_file" => format!("acl_file {}", access.acl().display()),
                "log_dest" => "log_dest stderr".into(),
                _ => line.to_owned(),
            };
            conf.push_str(&line);
            conf.push('\n');
        }
        assert!(
            conf.contains("allow_anonymous false"),
            "the shipped config refuses anonymous clients"
        );
        // As root the broker drops to the mosquitto user, which cannot enter a test's
        // temp dir; the access files' ownership is what run-all sets up, not tested here.
        conf.push_str("user root\n");
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto (package mosquitto)");
        let b = ShippedBroker {
            port,
            dir: dir.to_owned(),
            child,
        };
        wait_until("the shipped broker listens", 10, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        b
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGHUP: Mosquitto reloads its password file and ACL.
    fn reload(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGHUP);
        }
    }

    /// mosquitto_pub as `user` (None: anonymous); true when it connected and sent.
    fn publish(
        &self,
        user: Option<(&str, &BrokerAccess)>,
        topic: &str,
        payload: &str,
        retain: bool,
    ) -> bool {
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
            "-m",
            payload,
        ]);
        if retain {
            cmd.arg("-r");
        }
        let cfg = tempfile::tempdir().unwrap();
        if let Some((user, access)) = user {
            // The password goes through mosquitto_pub's config file, as `make watch` does.
            let pw = std::fs::read_to_string(access.password_file(user)).unwrap();
            std::fs::write(
                cfg.path().join("mosquitto_pub"),
                format!("-u {user}\n-P {}\n", pw.trim()),
            )
            .unwrap();
        }
        cmd.env("XDG_CONFIG_HOME", cfg.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mosquitto_pub (package mosquitto-clients)")
            .success()
    }
}

impl Drop for ShippedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn service(
    name: &'static str,
    exe: &str,
    dir: &Path,
    broker: &ShippedBroker,
    access: &BrokerAccess,
) -> Service {
    Service::start_with(name, exe, dir, &broker.url(), |cmd| {
        cmd.envs(access.service_env(name))
            .env_remove("TOPIC_PREFIX");
    })
}

/// user-service and transaction-service, each with its own credentials.
fn both_services(dir: &Path, broker: &ShippedBroker, access: &BrokerAccess) -> (Service, Service) {
    let users = service(
        USER_SERVICE,
        env!("CARGO_BIN_EXE_user-service"),
        dir,
        broker,
        access,
    );
    let ledger = service(
        TRANSACTION_SERVICE,
        env!("CARGO_BIN_EXE_transaction-service"),
        dir,
        broker,
        access,
    );
    (users, ledger)
}

fn create_user(users: &Service, i: usize) -> String {
    let (status, body) = users.post(
        "/users",
        json!({"name": format!("User {i}"), "email": format!("u{i}@example.com")}),
        None,
    );
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Every user created so far has exactly its one welcome credit in the ledger.
fn welcome_credits(ledger: &Service, user_id: &str) -> usize {
    let (_, body) = ledger.get(&format!("/transactions?user_id={user_id}"));
    body["transactions"]
        .as_array()
        .map_or(0, |t| t.iter().filter(|e| e["welcome"] == true).count())
}

#[test]
fn strangers_and_other_services_cannot_forge_skip_or_delete_and_real_events_still_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let access = broker_access::ensure(&dir.path().join("mqtt"), P).unwrap();
    let broker = ShippedBroker::start(dir.path(), &access);
    let (users, ledger) = both_services(dir.path(), &broker, &access);
    let first = create_user(&users, 0);
    wait_until("the first user's welcome credit", 20, || {
        welcome_credits(&ledger, &first) == 1
    });

    // The attacks of issue 11, each by a client without credentials (refused at
    // CONNECT) and by one holding another service's credentials (the ACL drops it).
    let attacks = [
        // A head announcement that would move transaction-service past every future event.
        (format!("{P}/heads/{USER_SERVICE}"), r#"{"source":"user-service","streams":{"users":{"head":1,"first":1000000000000}}}"#.to_owned(), true),
        // A position report that would let user-service's retention delete what
        // transaction-service lacks.
        (format!("{P}/positions/{USER_SERVICE}/{TRANSACTION_SERVICE}"), r#"{"consumer":"transaction-service","positions":{"users":1000000}}"#.to_owned(), true),
        // A forged user.created with the next sequence number.
        (format!("{P}/events/{USER_SERVICE}/users"), json!({
            "specversion":"1.0","id":"forged-1","source":"user-service","type":"user.created",
            "time":"2026-12-01T00:00:00.000Z","datacontenttype":"application/json","stream":"users",
            "sequence":"00000000000000000002","data":{"id":"999","name":"Mallory","email":"m@evil.example","balance_cents":0,"created_at":"2026-12-01T00:00:00.000Z"}
        }).to_string(), false),
        // A retained replay request: the whole history again at every connect.
        (format!("{P}/replay/{USER_SERVICE}/{TRANSACTION_SERVICE}"), r#"{"consumer":"transaction-service","stream":"users","from_seq":1}"#.to_owned(), true),
    ];
    let observer = Subscriber::observer(&broker, &access);
    for (topic, payload, retain) in &attacks {
        assert!(
            !broker.publish(None, topic, payload, *retain),
            "an anonymous client connected and published on {topic}"
        );
    }
    // The heads, events and replay requests are user-service's or transaction-service's
    // own topics, so the other service tries them; the position report is
    // transaction-service's, so user-service tries it.
    for (topic, payload, retain) in &attacks {
        let impostor = if topic.contains("/positions/") {
            USER_SERVICE
        } else {
            TRANSACTION_SERVICE
        };
        let impostor = if topic.contains("/replay/") {
            USER_SERVICE
        } else {
            impostor
        };
        // mosquitto_pub succeeds: MQTT 3.1.1 gets a PUBACK even for a denied publish.
        assert!(broker.publish(Some((impostor, &access)), topic, payload, *retain));
    }
    // The observer reads events and heads, and may publish nothing: not even on the
    // topics the %u patterns would grant any user (a retained position report of its
    // own would hold back user-service's retention forever). user-service watches the
    // ones addressed to it.
    let observer_topics = [
        format!("{P}/events/{OBSERVER}/users"),
        format!("{P}/heads/{OBSERVER}"),
        format!("{P}/replay/{USER_SERVICE}/{OBSERVER}"),
        format!("{P}/positions/{USER_SERVICE}/{OBSERVER}"),
    ];
    let addressed = Subscriber::start(
        &broker,
        &access,
        USER_SERVICE,
        &[
            format!("{P}/events/{OBSERVER}/+"),
            format!("{P}/heads/{OBSERVER}"),
            format!("{P}/replay/{USER_SERVICE}/+"),
            format!("{P}/positions/{USER_SERVICE}/+"),
            format!("{P}/events/{USER_SERVICE}/_probe"),
        ],
    );
    broker.publish(
        Some((OBSERVER, &access)),
        &attacks[2].0,
        "observer-was-here",
        false,
    );
    for t in &observer_topics {
        broker.publish(Some((OBSERVER, &access)), t, "observer-was-here", true);
    }
    // A sentinel on user-service's own probe topic, published after every attack: once
    // the observer has it, the broker (one thread, in order) has delivered whatever it
    // let through before it.
    let sentinel = format!("{P}/events/{USER_SERVICE}/_probe");
    assert!(broker.publish(Some((USER_SERVICE, &access)), &sentinel, "sentinel", false));
    wait_until("the observer receives the sentinel", 10, || {
        observer.seen().contains("sentinel")
    });
    let seen = observer.seen();
    for (topic, payload, _) in &attacks {
        assert!(
            !seen.lines().any(|l| l == format!("{topic} {payload}")),
            "the broker delivered a forged message on {topic}:\n{seen}"
        );
    }
    assert!(
        !seen.contains("observer-was-here"),
        "the observer may not publish: {seen}"
    );
    wait_until("user-service receives the sentinel", 10, || {
        addressed.seen().contains("sentinel")
    });
    let addressed_seen = addressed.seen();
    assert!(
        !addressed_seen.contains("observer-was-here"),
        "the observer published where the %u patterns would let any user: {addressed_seen}"
    );

    // Real events still arrive, none skipped: each new user gets its credit, and
    // user-service's balances follow.
    let ids: Vec<String> = (1..=5).map(|i| create_user(&users, i)).collect();
    for id in &ids {
        wait_until(&format!("user {id}'s welcome credit"), 20, || {
            welcome_credits(&ledger, id) == 1
        });
    }
    wait_until("user-service applied every credit", 20, || {
        ids.iter()
            .all(|id| users.get(&format!("/users/{id}")).1["balance_cents"] == 1000)
    });
    let (_, st) = ledger.get("/outbox");
    let stream = &st["consumer"]["streams"]["user-service/users"];
    assert_eq!(
        stream["position"], 6,
        "six user.created applied, none skipped: {st}"
    );
    assert_eq!(st["consumer"]["dead_letters"], 0, "{st}");
    assert_eq!(
        ledger.get("/users/999/balance").0,
        404,
        "the forged user was never applied"
    );
    // user-service recorded only transaction-service's real position, never the forged
    // one that would have let retention delete rows it lacks.
    let recorded: i64 = support::count(
        &dir.path().join("user-service.db"),
        "SELECT COALESCE(MAX(position), 0) FROM consumer_positions",
    );
    assert!(
        recorded <= 6,
        "a forged position report was recorded: {recorded}"
    );
}

/// Everything one account receives on some topics, printed by mosquitto_sub -v.
struct Subscriber {
    child: Child,
    out: PathBuf,
    _cfg: tempfile::TempDir,
}

impl Subscriber {
    /// The observer on everything under the prefix.
    fn observer(broker: &ShippedBroker, access: &BrokerAccess) -> Subscriber {
        Subscriber::start(broker, access, OBSERVER, &[format!("{P}/#")])
    }

    /// `account` subscribed to `topics` and to user-service's retained head
    /// announcement, whose arrival shows that it is subscribed.
    fn start(
        broker: &ShippedBroker,
        access: &BrokerAccess,
        account: &str,
        topics: &[String],
    ) -> Subscriber {
        let cfg = tempfile::tempdir().unwrap();
        let pw = std::fs::read_to_string(access.password_file(account)).unwrap();
        std::fs::write(
            cfg.path().join("mosquitto_sub"),
            format!("-u {account}\n-P {}\n", pw.trim()),
        )
        .unwrap();
        let out = broker.dir.join(format!("{account}-{}.txt", free_port()));
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-v"]);
        for t in topics
            .iter()
            .cloned()
            .chain([format!("{P}/heads/{USER_SERVICE}")])
        {
            cmd.args(["-t", &t]);
        }
        let child = cmd
            .env("XDG_CONFIG_HOME", cfg.path())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (package mosquitto-clients)");
        let o = Subscriber {
            child,
            out,
            _cfg: cfg,
        };
        // The retained head announcement of user-service shows it is subscribed.
        wait_until("the observer receives", 10, || {
            o.seen().contains(&format!("{P}/heads/"))
        });
        o
    }

    fn seen(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_service_the_acl_silences_is_reported_unhealthy_and_delivers_everything_once_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let access = broker_access::ensure(&dir.path().join("mqtt"), P).unwrap();
    // A broken ACL: no service may publish events (the head announcements still pass).
    let good = std::fs::read_to_string(access.acl()).unwrap();
    let events_rule = format!("pattern write {P}/events/%u/+\n");
    assert!(good.contains(&events_rule));
    std::fs::write(access.acl(), good.replace(&events_rule, "")).unwrap();
    let broker = ShippedBroker::start(dir.path(), &access);
    let (users, ledger) = both_services(dir.path(), &broker, &access);
    let ids: Vec<String> = (0..3).map(|i| create_user(&users, i)).collect();

    // The probe times out after 2 s (twice the 300 ms heads interval, at least 2 s).
    let started = Instant::now();
    wait_until(
        "user-service reports that its publishes are refused",
        15,
        || users.get("/healthz").0 == 503,
    );
    let (_, health) = users.get("/healthz");
    assert_eq!(health["status"], "degraded");
    assert!(
        health["reason"].as_str().unwrap().contains("ACL"),
        "{health}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(users.get("/outbox").1["publish_refused"].is_string());
    assert!(
        users.log().contains("did not deliver it"),
        "an error log line says why"
    );
    assert_eq!(welcome_credits(&ledger, &ids[0]), 0, "nothing got through");

    // Fixed and reloaded: healthy again, and the events the broker dropped are
    // replayed (the head announcements revealed them), each applied once.
    std::fs::write(access.acl(), &good).unwrap();
    broker.reload();
    wait_until("user-service healthy again", 20, || {
        users.get("/healthz").0 == 200
    });
    for id in &ids {
        wait_until(&format!("user {id}'s welcome credit"), 30, || {
            welcome_credits(&ledger, id) == 1
        });
    }
    let (_, st) = ledger.get("/outbox");
    assert_eq!(
        st["consumer"]["streams"]["user-service/users"]["position"], 3,
        "{st}"
    );
}

#[test]
fn a_service_whose_password_the_broker_refuses_is_reported_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let access = broker_access::ensure(&dir.path().join("mqtt"), P).unwrap();
    let broker = ShippedBroker::start(dir.path(), &access);
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let users = Service::start_with(
        USER_SERVICE,
        env!("CARGO_BIN_EXE_user-service"),
        dir.path(),
        &broker.url(),
        |cmd| {
            cmd.env("MQTT_USERNAME", USER_SERVICE)
                .env("MQTT_PASSWORD_FILE", &wrong)
                .env_remove("TOPIC_PREFIX");
        },
    );
    wait_until("user-service reports the refused connection", 15, || {
        users.get("/healthz").0 == 503
    });
    let (_, health) = users.get("/healthz");
    assert!(
        health["reason"]
            .as_str()
            .unwrap()
            .contains("refuses this service's connection"),
        "{health}"
    );
    assert!(
        !users.log().contains("not-the-password"),
        "the password is never logged"
    );
}
