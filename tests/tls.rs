//! TLS to the broker: a Mosquitto TLS listener with certificates made by the test
//! (rcgen), the relay and the consumer over mqtts://, and each way the server's
//! certificate can be wrong, refused with an error that says which.

#![allow(clippy::result_large_err)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edge_outbox::{Config, Relay, RelayStatus};
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use support::*;
use tokio_util::sync::CancellationToken;

/// A certificate authority that signs certificates for the test.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A certificate for `names`, valid from `not_before` to `not_after` (years), as
    /// PEM files `{stem}.pem` and `{stem}.key` in `dir`.
    fn issue(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        years: (i32, i32),
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, stem);
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (pem, key_pem) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, key.serialize_pem()).unwrap();
        (pem, key_pem)
    }

    fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.pem"));
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }
}

const VALID: (i32, i32) = (2020, 4000);

/// A Mosquitto whose only listener speaks TLS with `server` (certificate, key), trusting
/// `ca` for client certificates, which it requires when `mutual`.
fn tls_broker(ca: &Path, server: &(PathBuf, PathBuf), mutual: bool) -> Broker {
    Broker::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {mutual}\n",
        ca.display(),
        server.0.display(),
        server.1.display()
    ))
}

fn tls_config(broker: &Broker, host: &str, ca: &Path) -> Config {
    Config {
        broker_url: format!("mqtts://{host}:{}", broker.port),
        mqtt_ca_file: Some(ca.to_owned()),
        ..config("unused", "producer")
    }
}

/// Runs a relay with `cfg` until it reports a connection error, and returns it.
async fn connection_error(db_dir: &Path, cfg: Config) -> String {
    let db = open_db(db_dir, "producer", &cfg);
    let relay = Relay::new(db, cfg).unwrap();
    let status: Arc<RelayStatus> = relay.status();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    let mut error = None;
    for _ in 0..200 {
        if let Some(e) = status.connection_error() {
            error = Some(e);
            break;
        }
        assert!(
            !status.connected(),
            "connected although the certificate is wrong"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    let error = error.expect("the relay reported no connection error within 5 s");
    eprintln!("refused as expected: {error}");
    error
}

#[tokio::test(flavor = "multi_thread")]
async fn events_flow_over_tls_and_mutual_tls_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("edge-outbox test CA");
    let ca_pem = ca.write(dir.path(), "ca");
    let server = ca.issue(dir.path(), "server", &["localhost"], VALID);

    for mutual in [false, true] {
        let broker = tls_broker(&ca_pem, &server, mutual);
        let client = ca.issue(dir.path(), "client", &["producer"], VALID);
        let tweak = |c: Config| Config {
            broker_url: format!("mqtts://localhost:{}", broker.port),
            mqtt_ca_file: Some(ca_pem.clone()),
            mqtt_cert_file: mutual.then(|| client.0.clone()),
            mqtt_key_file: mutual.then(|| client.1.clone()),
            ..c
        };
        let pair = Pair::new(&broker.url(), tweak);
        create_items(&pair.producer, &pair.outbox, "tls", 20).await;
        let relay = spawn_relay(&pair.producer, &pair.cfg);
        let (consumer, _) = spawn_consumer(&pair.consumer_db, &pair.consumer_cfg, "producer");
        let path = pair.consumer_path();
        wait_for(
            &format!("20 events over TLS (mutual: {mutual})"),
            20,
            || effects(&path).len() >= 20,
        )
        .await;
        relay.stop().await;
        consumer.stop().await;
        assert_exactly_once_in_order(&path, 20);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_certificate_from_another_ca_expired_or_for_another_name_is_refused_saying_which()
{
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("edge-outbox test CA");
    let ca_pem = ca.write(dir.path(), "ca");
    let stranger_pem = Ca::new("some other CA").write(dir.path(), "stranger");

    // Trusting another CA.
    let server = ca.issue(dir.path(), "server", &["localhost"], VALID);
    let broker = tls_broker(&ca_pem, &server, false);
    let e = connection_error(dir.path(), tls_config(&broker, "localhost", &stranger_pem)).await;
    assert!(
        e.contains("UnknownIssuer"),
        "names the untrusted issuer: {e}"
    );

    // The right CA, but a host name the certificate does not hold.
    let e = connection_error(dir.path(), tls_config(&broker, "127.0.0.1", &ca_pem)).await;
    assert!(
        e.contains("not valid for name"),
        "names the host name mismatch: {e}"
    );
    drop(broker);

    // Expired.
    let expired = ca.issue(dir.path(), "expired", &["localhost"], (2020, 2021));
    let broker = tls_broker(&ca_pem, &expired, false);
    let e = connection_error(dir.path(), tls_config(&broker, "localhost", &ca_pem)).await;
    assert!(e.to_lowercase().contains("expired"), "says it expired: {e}");

    // A broker that requires a client certificate refuses a client without one.
    drop(broker);
    let broker = tls_broker(&ca_pem, &server, true);
    let e = connection_error(dir.path(), tls_config(&broker, "localhost", &ca_pem)).await;
    assert!(
        e.contains("CertificateRequired"),
        "says a client certificate is required: {e}"
    );
}

#[test]
fn tls_settings_are_checked_at_start_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let base = Config {
        broker_url: "mqtts://localhost:8883".into(),
        ..Config::default()
    };
    let e = Config {
        mqtt_ca_file: Some(not_pem.clone()),
        ..base.clone()
    }
    .validate()
    .unwrap_err();
    assert_eq!(e.flag, "mqtt-ca-file");
    assert!(e.to_string().contains("not.pem"), "{e}");

    let e = Config {
        mqtt_ca_file: Some(dir.path().join("absent.pem")),
        ..base.clone()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("absent.pem"), "{e}");

    let ca = Ca::new("ca");
    let ca_pem = ca.write(dir.path(), "ca");
    let (cert, _) = ca.issue(dir.path(), "client", &["c"], VALID);
    let e = Config {
        mqtt_ca_file: Some(ca_pem.clone()),
        mqtt_cert_file: Some(cert),
        ..base.clone()
    }
    .validate()
    .unwrap_err();
    assert_eq!(e.flag, "mqtt-key-file", "a certificate needs its key: {e}");

    let e = Config {
        broker_url: "mqtt://localhost:1883".into(),
        mqtt_ca_file: Some(ca_pem.clone()),
        ..Config::default()
    }
    .validate()
    .unwrap_err();
    assert_eq!(
        e.flag, "mqtt-ca-file",
        "TLS files without mqtts:// are a mistake: {e}"
    );

    Config {
        mqtt_ca_file: Some(ca_pem),
        ..base
    }
    .validate()
    .unwrap();
}
