//! GET /metrics as a real Prometheus sees it: both services scraped by a Prometheus
//! process (Debian's `prometheus` package; `make test` installs it) with the box's
//! alert rules loaded, then read back through Prometheus' HTTP query API and compared
//! with what `/outbox` says.

#![allow(clippy::result_large_err)]

mod services;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use services::{drained, wait_until, Service};
use support::{free_port, Broker};

/// A Prometheus process on a free loopback port, killed when dropped.
struct Prometheus {
    child: Child,
    base: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[&Service]) -> Prometheus {
        let rules = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/prometheus/alerts.yml"
        );
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{rules:?}]\nscrape_configs:\n"
        );
        for s in targets {
            let target = s.base.trim_start_matches("http://");
            config += &format!(
                "  - job_name: {}\n    static_configs: [{{targets: [{target:?}]}}]\n",
                s.name
            );
        }
        let conf = dir.join("prometheus.yml");
        std::fs::write(&conf, config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        wait_until("prometheus ready", 30, || {
            ureq::get(&format!("{}/-/ready", p.base)).call().is_ok()
        });
        p
    }

    /// The API's `data` for `path`, e.g. `/api/v1/targets`.
    fn api(&self, path: &str) -> Value {
        let v: Value = ureq::get(&format!("{}{path}", self.base))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .unwrap();
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    /// The value of an instant query that yields one series, or None while it yields none.
    fn value(&self, query: &str) -> Option<f64> {
        let url = format!("{}/api/v1/query", self.base);
        let v: Value = ureq::get(&url)
            .query("query", query)
            .call()
            .unwrap_or_else(|e| panic!("query {query}: {e}"))
            .into_json()
            .unwrap();
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{query} yields several series: {v}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query` equals `want` (scrapes come every second).
    fn wait_for(&self, query: &str, want: f64) {
        wait_until(&format!("{query} == {want} in Prometheus"), 30, || {
            self.value(query) == Some(want)
        });
    }
}

fn prometheus_missing() -> Option<String> {
    let found = Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    (!found).then(|| "prometheus (Debian's `prometheus` package; `make test` installs it)".into())
}

#[test]
fn prometheus_scrapes_both_services_and_its_figures_match_the_status_page() {
    if let Some(missing) = prometheus_missing() {
        return support::skip("prometheus", &missing);
    }
    const USERS: u64 = 6;
    const OFFLINE: u64 = 4;
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &'static str, exe: &str| {
        Service::start_with(name, exe, dir.path(), &broker.url(), |cmd| {
            cmd.args(["--topic-prefix", &format!("prom-{}", std::process::id())]);
        })
    };
    let users = start("user-service", env!("CARGO_BIN_EXE_user-service"));
    let ledger = start(
        "transaction-service",
        env!("CARGO_BIN_EXE_transaction-service"),
    );
    let prometheus = Prometheus::start(dir.path(), &[&users, &ledger]);

    for i in 0..USERS {
        let body = json!({ "name": format!("P {i}"), "email": format!("p{i}@example.com") });
        assert_eq!(users.post("/users", body, None).0, 201);
    }
    wait_until("both services drained", 30, || {
        drained(&users) && drained(&ledger)
    });

    // Both targets are up and their alert rules loaded.
    prometheus.wait_for(r#"up{job="user-service"}"#, 1.0);
    prometheus.wait_for(r#"up{job="transaction-service"}"#, 1.0);
    let groups = prometheus.api("/api/v1/rules");
    let rules = groups["groups"][0]["rules"].as_array().unwrap();
    assert!(rules.len() >= 5, "alert rules loaded: {groups}");
    assert!(
        rules.iter().all(|r| r["health"] != "err"),
        "every rule evaluates: {groups}"
    );

    // Each user.created applied once by transaction-service, each welcome credit once
    // by user-service: Prometheus' figures are the status pages' figures.
    let (_, ledger_status) = ledger.get("/outbox");
    let applied = ledger_status["consumer"]["applied_since_start"]
        .as_u64()
        .unwrap();
    assert_eq!(applied, USERS);
    prometheus.wait_for(
        r#"edge_outbox_consumer_applied_total{job="transaction-service"}"#,
        applied as f64,
    );
    prometheus.wait_for(
        r#"edge_outbox_consumer_applied_total{job="user-service"}"#,
        USERS as f64,
    );
    prometheus.wait_for(
        r#"edge_outbox_relay_published_total{job="user-service"}"#,
        USERS as f64,
    );
    prometheus.wait_for(
        r#"edge_outbox_stream_last_sequence{job="user-service",stream="users"}"#,
        USERS as f64,
    );
    prometheus.wait_for(
        r#"edge_outbox_consumer_position{job="transaction-service",producer="user-service",stream="users"}"#,
        USERS as f64,
    );
    prometheus.wait_for(
        r#"sum(edge_outbox_http_request_duration_seconds_count{job="user-service",route="/users",method="POST",status="201"})"#,
        USERS as f64,
    );
    prometheus.wait_for(r#"edge_outbox_pending_events{job="user-service"}"#, 0.0);
    prometheus.wait_for(r#"edge_outbox_relay_connected{job="user-service"}"#, 1.0);

    // The broker goes away: writes go on and wait in the outbox, as Prometheus sees.
    broker.kill();
    for i in 0..OFFLINE {
        let body = json!({ "name": format!("Q {i}"), "email": format!("q{i}@example.com") });
        assert_eq!(users.post("/users", body, None).0, 201);
    }
    let (_, status) = users.get("/outbox");
    assert_eq!(status["outbox"]["pending"], OFFLINE, "{status}");
    prometheus.wait_for(
        r#"edge_outbox_pending_events{job="user-service"}"#,
        OFFLINE as f64,
    );
    prometheus.wait_for(r#"edge_outbox_relay_connected{job="user-service"}"#, 0.0);
    let bytes = prometheus
        .value(r#"edge_outbox_pending_bytes{job="user-service"}"#)
        .unwrap();
    assert_eq!(
        bytes,
        status["outbox"]["backlog"]["bytes"].as_u64().unwrap() as f64
    );
    assert!(
        prometheus
            .value(r#"edge_outbox_oldest_pending_age_seconds{job="user-service"}"#)
            .unwrap()
            >= 0.0
    );

    // Prometheus took every family with its type and help text.
    let metadata = prometheus.api("/api/v1/metadata");
    for (family, kind) in [
        ("edge_outbox_pending_events", "gauge"),
        ("edge_outbox_pending_bytes", "gauge"),
        ("edge_outbox_oldest_pending_age_seconds", "gauge"),
        ("edge_outbox_relay_published", "counter"),
        ("edge_outbox_relay_publish_retries", "counter"),
        ("edge_outbox_relay_replay_requests_served", "counter"),
        ("edge_outbox_consumer_applied", "counter"),
        ("edge_outbox_consumer_duplicates", "counter"),
        ("edge_outbox_consumer_dead_lettered", "counter"),
        ("edge_outbox_consumer_lag_events", "gauge"),
        ("edge_outbox_consumer_gap_open_seconds", "gauge"),
        ("edge_outbox_consumer_replay_requests", "counter"),
        ("edge_outbox_write_batch_requests", "histogram"),
        ("edge_outbox_write_commit_duration_seconds", "histogram"),
        ("edge_outbox_write_queue_depth", "gauge"),
        ("edge_outbox_storage_failed_batches", "counter"),
        ("edge_outbox_http_request_duration_seconds", "histogram"),
    ] {
        let m = &metadata[family][0];
        assert_eq!(m["type"], kind, "{family}: {}", metadata[family]);
        assert!(
            m["help"].as_str().is_some_and(|h| h.len() > 10),
            "{family} has help text: {m}"
        );
    }
    // No label value that a request chose: the 404 of an unknown path is "unmatched".
    let _ = users.get("/users/not-a-route/at/all");
    prometheus.wait_for(
        r#"sum(edge_outbox_http_request_duration_seconds_count{job="user-service",route="unmatched",status="404"})"#,
        1.0,
    );
    let routes = prometheus
        .api("/api/v1/label/route/values?match[]=edge_outbox_http_request_duration_seconds_count");
    assert!(
        routes.as_array().unwrap().iter().all(|r| r == "unmatched"
            || r.as_str().unwrap().starts_with('/')
                && !r.as_str().unwrap().contains("not-a-route")),
        "route labels are templates: {routes}"
    );
}
