//! Settings of the outbox library: one struct, every field a clap flag and an
//! environment variable, checked by [`Config::validate`] before anything starts.
//!
//! Binaries `#[command(flatten)]` this struct, so `--help` lists every setting with its
//! default, and tests build it with [`Config::default`] and change what they need.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::protocol;
use crate::storage::{DbOptions, Synchronous};

/// Every setting of the outbox, the relay and the consumer. Units are in the names.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// MQTT broker to publish to and consume from: mqtt://HOST:PORT (plain TCP, port
    /// 1883 by default) or mqtts://HOST:PORT (TLS, 8883 by default; the server's
    /// certificate must be valid for HOST). For a clustered broker, a comma-separated
    /// list of its nodes (same scheme, at most 16): after a connection failure the
    /// service tries the next one (docs/scaling.md).
    #[arg(
        long = "broker",
        env = "MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub broker_url: String,

    /// MQTT username. With the box's broker config (mosquitto.conf, mosquitto.acl) it
    /// must be this service's --source: the topic ACL lets each user publish only on
    /// its own topics. Without it the services connect anonymously.
    #[arg(long, env = "MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// File holding the MQTT password (one line; a trailing newline is ignored). The
    /// environment variable MQTT_PASSWORD is read when no file is given; a password is
    /// never taken from a flag, where `ps` would show it.
    #[arg(long, env = "MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,

    /// The MQTT password, for programs that embed the library and hold it already;
    /// takes precedence over --mqtt-password-file and MQTT_PASSWORD. Never printed.
    #[arg(skip)]
    pub mqtt_password: Option<Secret>,

    /// With mqtts://: the CA certificate(s) (PEM) that the broker's certificate must
    /// chain to. Without it the system's root certificates are trusted.
    #[arg(long, env = "MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// With mqtts://: a client certificate chain (PEM) to present, for brokers that
    /// require mutual TLS; needs --mqtt-key-file.
    #[arg(long, env = "MQTT_CERT_FILE")]
    pub mqtt_cert_file: Option<PathBuf>,

    /// The private key (PEM) of --mqtt-cert-file.
    #[arg(long, env = "MQTT_KEY_FILE")]
    pub mqtt_key_file: Option<PathBuf>,

    /// MQTT client id prefix; the relay connects as "ID-relay" and the consumer as
    /// "ID-consumer" (stable, so that the broker keeps the consumer's session).
    #[arg(long, env = "MQTT_CLIENT_ID", default_value = "edge-outbox")]
    pub client_id: String,

    /// Name of this producer: the CloudEvents `source` of its events and a level of
    /// their topics. Must be unique on the broker.
    #[arg(long, env = "OUTBOX_SOURCE", default_value = "edge-outbox")]
    pub source: String,

    /// First topic level(s) of every topic this program uses.
    #[arg(long, env = "TOPIC_PREFIX", default_value = protocol::DEFAULT_TOPIC_PREFIX)]
    pub topic_prefix: String,

    /// Largest event envelope accepted at enqueue, in bytes; larger events are refused
    /// together with their business write. The MQTT packet limit is set to match.
    #[arg(long, env = "OUTBOX_PAYLOAD_MAX_BYTES", default_value_t = 256 * 1024)]
    pub payload_max_bytes: usize,

    /// Events waiting to be published at most (the broker unreachable for long): beyond
    /// it, new events and the business writes they come with are refused (HTTP 503).
    #[arg(long, env = "OUTBOX_BACKLOG_MAX_EVENTS", default_value_t = 1_000_000)]
    pub outbox_backlog_max_events: u64,

    /// Bytes of event envelopes waiting to be published at most; see
    /// --outbox-backlog-max-events.
    #[arg(long, env = "OUTBOX_BACKLOG_MAX_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub outbox_backlog_max_bytes: u64,

    /// QoS1 publishes the relay keeps in flight (waiting for PUBACK) at most.
    #[arg(long, env = "RELAY_INFLIGHT_MAX", default_value_t = 100)]
    pub relay_inflight_max: u16,

    /// Pending rows the relay reads from the outbox per query at most.
    #[arg(long, env = "RELAY_BATCH_MAX", default_value_t = 500)]
    pub relay_batch_max: usize,

    /// How often the relay announces each stream's head (last published sequence).
    #[arg(long, env = "RELAY_HEADS_INTERVAL_MS", default_value_t = 5_000)]
    pub relay_heads_interval_ms: u64,

    /// How often the idle relay checks PRAGMA data_version for commits made by other
    /// processes (commits made in this process wake it at once).
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = 1_000)]
    pub relay_poll_interval_ms: u64,

    /// Messages the consumer applies per database transaction at most. Smaller batches
    /// are acknowledged sooner, which measured cheaper for the broker (64: 38,000
    /// events/s end to end, 256: 31,500; docs/performance.md); on a disk with slow
    /// fsyncs (an SD card) a larger value drains a backlog faster.
    #[arg(long, env = "CONSUMER_BATCH_MAX", default_value_t = 64)]
    pub consumer_batch_max: usize,

    /// How long a consumer waits for a missing event (one that a later event or a head
    /// announcement revealed) before asking the producer to replay.
    #[arg(long, env = "CONSUMER_GAP_TIMEOUT_MS", default_value_t = 1_000)]
    pub consumer_gap_timeout_ms: u64,

    /// How often a consumer asks again while a replay has not filled its gap.
    #[arg(long, env = "CONSUMER_REPLAY_RETRY_MS", default_value_t = 5_000)]
    pub consumer_replay_retry_ms: u64,

    /// How often a consumer reports its positions to producers (for outbox retention).
    #[arg(long, env = "CONSUMER_REPORT_INTERVAL_MS", default_value_t = 30_000)]
    pub consumer_report_interval_ms: u64,

    /// Published outbox rows, inbox records and dead letters older than this are deleted
    /// (outbox rows only once every known consumer has applied them).
    #[arg(long, env = "RETENTION_MS", default_value_t = 7 * 24 * 3600 * 1000)]
    pub retention_ms: u64,

    /// A consumer that has not reported its position for this long no longer holds
    /// back outbox retention.
    #[arg(long, env = "CONSUMER_EXPIRY_MS", default_value_t = 30 * 24 * 3600 * 1000)]
    pub consumer_expiry_ms: u64,

    /// How often retention runs.
    #[arg(long, env = "RETENTION_INTERVAL_MS", default_value_t = 3600 * 1000)]
    pub retention_interval_ms: u64,

    /// Largest the database may grow with retained history, in bytes (its used pages;
    /// the file keeps its size and reuses the freed pages). Beyond it, retention deletes
    /// history before --retention-ms, oldest first: outbox rows that are published and
    /// that every consumer which reported within --consumer-expiry-ms has applied, and
    /// inbox records of applied events. Never anything unpublished, an event a known
    /// consumer still lacks, a dead letter or a domain row: those can hold the database
    /// above the cap (the backlog has its own limit, --outbox-backlog-max-bytes). 0: no
    /// cap. The default keeps both services of a box at 100 requests/s well inside a
    /// 32 GB card.
    #[arg(long, env = "RETENTION_MAX_BYTES", default_value_t = 4 << 30)]
    pub retention_max_bytes: u64,

    /// First wait before reconnecting to the broker after a failure.
    #[arg(long, env = "RECONNECT_BACKOFF_MIN_MS", default_value_t = 100)]
    pub reconnect_backoff_min_ms: u64,

    /// Longest wait between reconnection attempts (the backoff doubles up to this).
    /// Also how long a broker that comes back may wait for the services: an attempt
    /// on the box's loopback costs next to nothing.
    #[arg(long, env = "RECONNECT_BACKOFF_MAX_MS", default_value_t = 1_000)]
    pub reconnect_backoff_max_ms: u64,

    /// MQTT keep-alive; a dead connection (e.g. packets silently dropped) is noticed
    /// after about 1.5 times this.
    #[arg(long, env = "MQTT_KEEP_ALIVE_S", default_value_t = 10)]
    pub mqtt_keep_alive_s: u64,

    /// SQLite durability of the writer: full (survives power cuts), normal or off
    /// (benchmarks only).
    #[arg(long, env = "DB_SYNCHRONOUS", default_value = "full")]
    pub db_synchronous: Synchronous,

    /// How long a write waits for a lock held by another process.
    #[arg(long, env = "DB_BUSY_TIMEOUT_MS", default_value_t = 5_000)]
    pub db_busy_timeout_ms: u64,

    /// Write requests gathered into one transaction (one fsync) at most.
    #[arg(long, env = "DB_WRITE_BATCH_MAX", default_value_t = 512)]
    pub db_write_batch_max: usize,

    /// SQLite page size of a database created now, in bytes: 512 to 65536, a power
    /// of two. An existing database keeps its own. Every commit writes each page it
    /// changed whole, so smaller pages send fewer bytes to an SD card.
    #[arg(long, env = "DB_PAGE_SIZE", default_value_t = crate::storage::DEFAULT_PAGE_SIZE)]
    pub db_page_size: u32,

    /// Bytes the write-ahead log gathers before a commit copies them into the database
    /// (a page written again meanwhile is copied once), 65536 to 1073741824; after it
    /// the log file is cut back to this size. A long reader or a large transaction can
    /// hold the log above it for a while.
    #[arg(long, env = "DB_CHECKPOINT_BYTES", default_value_t = crate::storage::DEFAULT_CHECKPOINT_BYTES)]
    pub db_checkpoint_bytes: u64,

    /// How long the relay and consumer may take to finish in-flight work on shutdown.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_MS", default_value_t = 5_000)]
    pub shutdown_timeout_ms: u64,
}

impl Default for Config {
    /// The flags' defaults, as `--help` shows them; the environment is not read.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            config: Config,
        }
        let cmd = <Defaults as clap::CommandFactory>::command()
            .mut_args(|a| a.env(clap::builder::Resettable::Reset));
        let matches = cmd
            .try_get_matches_from(["edge-outbox"])
            .expect("every setting has a default");
        <Defaults as clap::FromArgMatches>::from_arg_matches(&matches)
            .expect("the defaults parse")
            .config
    }
}

/// A setting that does not make sense, named with its flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting --{flag}: {reason}")]
pub struct ConfigError {
    /// The flag, without its leading dashes.
    pub flag: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

fn bad(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.into(),
    }
}

/// A password: shown as `Secret(..)` by `Debug`, so that logging a [`Config`] never
/// prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Longest MQTT username or password accepted, in bytes.
pub const CREDENTIAL_MAX_BYTES: usize = 1024;

/// The environment variable read for the MQTT password when no file is given.
pub const PASSWORD_ENV: &str = "MQTT_PASSWORD";

/// A username and its password, as the relay and the consumer send them in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `--mqtt-username`.
    pub username: String,
    /// From [`Config::mqtt_password`], `--mqtt-password-file` or `MQTT_PASSWORD`.
    pub password: Secret,
}

/// Where the broker is, parsed from `broker_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// True for mqtts:// (TLS).
    pub tls: bool,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl BrokerAddr {
    /// True when the broker is on this machine (localhost or a loopback address), so
    /// that a password sent without TLS never crosses a network.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// The largest MQTT payload accepted by an MQTT 3.1.1 broker (the remaining-length
/// field tops out at 256 MiB) leaves room for the topic and headers.
const MQTT_PAYLOAD_MAX_BYTES: usize = 255 * 1024 * 1024;

/// Broker addresses that `--broker` may list at most.
pub const BROKERS_MAX: usize = 16;

/// The smallest `--retention-max-bytes` other than 0.
pub const RETENTION_MAX_BYTES_MIN: u64 = 1 << 20;

impl Config {
    /// Checks every setting; the error names the flag and what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker()?;
        self.tls()?;
        self.credentials()?;
        if self.client_id.is_empty() || self.client_id.len() > 200 {
            return Err(bad("client-id", "must be 1 to 200 characters"));
        }
        if !self
            .client_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                "client-id",
                "may hold only ASCII letters, digits, '-', '_' and '.'",
            ));
        }
        protocol::validate_name(&self.source).map_err(|r| bad("source", r))?;
        protocol::validate_prefix(&self.topic_prefix).map_err(|r| bad("topic-prefix", r))?;
        if !(1024..=MQTT_PAYLOAD_MAX_BYTES).contains(&self.payload_max_bytes) {
            return Err(bad(
                "payload-max-bytes",
                format!("must be between 1024 and {MQTT_PAYLOAD_MAX_BYTES}"),
            ));
        }
        if self.outbox_backlog_max_events == 0 {
            return Err(bad("outbox-backlog-max-events", "must be greater than 0"));
        }
        if self.outbox_backlog_max_bytes < self.payload_max_bytes as u64 {
            return Err(bad(
                "outbox-backlog-max-bytes",
                "must be at least --payload-max-bytes",
            ));
        }
        if self.relay_inflight_max == 0 || self.relay_inflight_max > 10_000 {
            return Err(bad("relay-inflight-max", "must be between 1 and 10000"));
        }
        // Every count and interval has a range. Zero stalls a loop or a batch; a huge
        // value sizes a buffer, a batch or a timer, and aborts the process later (an
        // allocation of that size) instead of being refused now.
        const DAY_MS: u64 = 24 * 3600 * 1000;
        let ranges: [(&'static str, u64, u64, u64); 16] = [
            ("relay-batch-max", self.relay_batch_max as u64, 1, 100_000),
            (
                "consumer-batch-max",
                self.consumer_batch_max as u64,
                1,
                10_000,
            ),
            (
                "db-write-batch-max",
                self.db_write_batch_max as u64,
                1,
                100_000,
            ),
            (
                "relay-heads-interval-ms",
                self.relay_heads_interval_ms,
                1,
                DAY_MS,
            ),
            (
                "relay-poll-interval-ms",
                self.relay_poll_interval_ms,
                1,
                DAY_MS,
            ),
            (
                "consumer-gap-timeout-ms",
                self.consumer_gap_timeout_ms,
                1,
                DAY_MS,
            ),
            (
                "consumer-replay-retry-ms",
                self.consumer_replay_retry_ms,
                1,
                DAY_MS,
            ),
            (
                "consumer-report-interval-ms",
                self.consumer_report_interval_ms,
                1,
                DAY_MS,
            ),
            (
                "retention-interval-ms",
                self.retention_interval_ms,
                1,
                DAY_MS,
            ),
            (
                "reconnect-backoff-min-ms",
                self.reconnect_backoff_min_ms,
                1,
                DAY_MS,
            ),
            (
                "reconnect-backoff-max-ms",
                self.reconnect_backoff_max_ms,
                0,
                DAY_MS,
            ),
            ("mqtt-keep-alive-s", self.mqtt_keep_alive_s, 1, 65_535),
            ("db-busy-timeout-ms", self.db_busy_timeout_ms, 0, DAY_MS),
            ("shutdown-timeout-ms", self.shutdown_timeout_ms, 1, DAY_MS),
            ("retention-ms", self.retention_ms, 0, 3650 * DAY_MS),
            (
                "consumer-expiry-ms",
                self.consumer_expiry_ms,
                0,
                3650 * DAY_MS,
            ),
        ];
        if let Some((flag, v, min, max)) = ranges.iter().find(|(_, v, min, max)| v < min || v > max)
        {
            let why = if v < min {
                "must be greater than 0".to_owned()
            } else {
                format!("must be at most {max}")
            };
            return Err(bad(flag, why));
        }
        if self.reconnect_backoff_max_ms < self.reconnect_backoff_min_ms {
            return Err(bad(
                "reconnect-backoff-max-ms",
                "must be at least --reconnect-backoff-min-ms",
            ));
        }
        if !crate::storage::valid_page_size(self.db_page_size) {
            return Err(bad(
                "db-page-size",
                "must be a power of two from 512 to 65536",
            ));
        }
        if !crate::storage::CHECKPOINT_BYTES_RANGE.contains(&self.db_checkpoint_bytes) {
            return Err(bad(
                "db-checkpoint-bytes",
                "must be from 65536 to 1073741824",
            ));
        }
        if self.retention_max_bytes != 0 && self.retention_max_bytes < RETENTION_MAX_BYTES_MIN {
            return Err(bad(
                "retention-max-bytes",
                format!("must be 0 (no cap) or at least {RETENTION_MAX_BYTES_MIN}"),
            ));
        }
        if self.retention_ms < 60_000 {
            return Err(bad("retention-ms", "must be at least 60000 (one minute)"));
        }
        Ok(())
    }

    /// The credentials to connect with: None without `--mqtt-username`. The password
    /// comes from [`Config::mqtt_password`], else `--mqtt-password-file`, else the
    /// environment variable `MQTT_PASSWORD`; a username without a password is refused.
    /// Errors name the file, never its content.
    pub fn credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        let Some(username) = &self.mqtt_username else {
            if self.mqtt_password_file.is_some() || self.mqtt_password.is_some() {
                return Err(bad(
                    "mqtt-username",
                    "a password is configured but no username",
                ));
            }
            return Ok(None);
        };
        if username.is_empty()
            || username.len() > CREDENTIAL_MAX_BYTES
            || username.chars().any(|c| c.is_control())
        {
            return Err(bad(
                "mqtt-username",
                format!("must be 1 to {CREDENTIAL_MAX_BYTES} bytes without control characters"),
            ));
        }
        let password = match (&self.mqtt_password, &self.mqtt_password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => read_password_file(path)?,
            (None, None) => match std::env::var(PASSWORD_ENV) {
                Ok(p) => Secret(p),
                Err(_) => {
                    return Err(bad(
                        "mqtt-password-file",
                        format!("--mqtt-username is set but no password: give --mqtt-password-file or set {PASSWORD_ENV}"),
                    ))
                }
            },
        };
        if password.0.is_empty() || password.0.len() > CREDENTIAL_MAX_BYTES {
            return Err(bad(
                "mqtt-password-file",
                format!("the password must be 1 to {CREDENTIAL_MAX_BYTES} bytes"),
            ));
        }
        Ok(Some(Credentials {
            username: username.clone(),
            password,
        }))
    }

    /// The first broker address of `broker_url`. See [`BrokerAddr::is_loopback`] for
    /// whether traffic to it leaves this machine.
    pub fn broker(&self) -> Result<BrokerAddr, ConfigError> {
        Ok(self.brokers()?.swap_remove(0))
    }

    /// Every broker address of `broker_url`, a comma-separated list of the nodes of
    /// one cluster, in the order they are tried. All use the same scheme (one TLS
    /// setting serves them all) and none is listed twice.
    pub fn brokers(&self) -> Result<Vec<BrokerAddr>, ConfigError> {
        let urls: Vec<&str> = self.broker_url.split(',').map(str::trim).collect();
        if urls.len() > BROKERS_MAX {
            return Err(bad(
                "broker",
                format!("{} addresses; at most {BROKERS_MAX}", urls.len()),
            ));
        }
        let mut out: Vec<BrokerAddr> = Vec::with_capacity(urls.len());
        for url in urls {
            if url.is_empty() {
                return Err(bad(
                    "broker",
                    "an empty address in the list (two commas, or one at an end)",
                ));
            }
            let addr = parse_broker(url)?;
            if out.first().is_some_and(|first| first.tls != addr.tls) {
                return Err(bad(
                    "broker",
                    "mixes mqtt:// and mqtts:// addresses: every node of one cluster must use the same scheme",
                ));
            }
            if out.contains(&addr) {
                return Err(bad("broker", format!("{url:?} is listed twice")));
            }
            out.push(addr);
        }
        Ok(out)
    }

    /// The TLS client config for an mqtts:// broker (None for mqtt://), built from
    /// --mqtt-ca-file, --mqtt-cert-file and --mqtt-key-file; the files are read now,
    /// and errors name the file.
    pub fn tls(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, ConfigError> {
        let broker = self.broker()?;
        let files = [
            ("mqtt-ca-file", &self.mqtt_ca_file),
            ("mqtt-cert-file", &self.mqtt_cert_file),
            ("mqtt-key-file", &self.mqtt_key_file),
        ];
        if !broker.tls {
            if let Some((flag, _)) = files.iter().find(|(_, f)| f.is_some()) {
                return Err(bad(
                    flag,
                    "is only used with TLS: give --broker as mqtts://HOST:PORT",
                ));
            }
            return Ok(None);
        }
        let client = match (&self.mqtt_cert_file, &self.mqtt_key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            (Some(_), None) => return Err(bad("mqtt-key-file", "--mqtt-cert-file needs its key")),
            (None, Some(_)) => {
                return Err(bad(
                    "mqtt-cert-file",
                    "--mqtt-key-file needs its certificate",
                ))
            }
        };
        crate::tls::client_config(self.mqtt_ca_file.as_deref(), client)
            .map(Some)
            .map_err(|e| bad(e.flag, e.reason))
    }

    /// Options for opening the database at `path` with these settings' durability,
    /// busy timeout and write batch size.
    pub fn db_options(&self, path: impl Into<PathBuf>) -> DbOptions {
        DbOptions {
            synchronous: self.db_synchronous,
            busy_timeout_ms: self.db_busy_timeout_ms,
            write_batch_max: self.db_write_batch_max,
            page_size: self.db_page_size,
            checkpoint_bytes: self.db_checkpoint_bytes,
            ..DbOptions::new(path)
        }
    }

    /// The MQTT packet limit: the largest envelope plus its topic and the headers.
    pub fn mqtt_packet_max_bytes(&self) -> usize {
        self.payload_max_bytes + protocol::TOPIC_MAX_BYTES + 64
    }

    /// Convenience for durations stored as milliseconds.
    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

/// One broker address, mqtt://HOST:PORT or mqtts://HOST:PORT.
fn parse_broker(url: &str) -> Result<BrokerAddr, ConfigError> {
    // Before anything echoes the URL: it may hold a password.
    if url.contains('@') {
        return Err(bad("broker", "credentials in the URL are not supported"));
    }
    let plain = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"));
    let tls = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"));
    let (rest, tls, default_port) = match (plain, tls) {
        (Some(rest), _) => (rest, false, 1883),
        (None, Some(rest)) => (rest, true, 8883),
        (None, None) => {
            return Err(bad(
                "broker",
                format!("{url:?}: must look like mqtt://HOST:PORT or mqtts://HOST:PORT"),
            ))
        }
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err(bad("broker", "credentials in the URL are not supported"));
    }
    // An IPv6 address is bracketed, [::1]:1883, so that its colons are not a port.
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| {
            bad(
                "broker",
                format!("{url:?}: an IPv6 address needs its closing ']'"),
            )
        })?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad(
                "broker",
                format!("{url:?}: {h:?} is not an IPv6 address"),
            ));
        }
        match after {
            "" => (h, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err(bad("broker", format!("{url:?}: malformed after ']'"))),
            },
        }
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
            bad(
                "broker",
                format!("{url:?}: port {p:?} is not 1-65535 (an IPv6 address goes in brackets: [::1]:1883)"),
            )
        })?,
        None => default_port,
    };
    let hostname_char = |c: char| c.is_ascii_alphanumeric() || "-._:".contains(c);
    if host.is_empty() || !host.chars().all(hostname_char) {
        return Err(bad("broker", format!("{url:?}: missing or malformed host")));
    }
    Ok(BrokerAddr {
        tls,
        host: host.to_owned(),
        port,
    })
}

/// Reads a password file: its first line, without the newline. Refuses a file that is
/// not a regular file or is larger than a password can be.
fn read_password_file(path: &Path) -> Result<Secret, ConfigError> {
    let err = |why: String| bad("mqtt-password-file", format!("{}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > CREDENTIAL_MAX_BYTES as u64 + 2 {
        return Err(err(format!(
            "{} bytes is larger than a password ({CREDENTIAL_MAX_BYTES} bytes at most)",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.contains('\n') {
        return Err(err("holds more than one line".into()));
    }
    Ok(Secret(line.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn clap_defaults_match_default_impl_and_ignore_the_environment() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: Config,
        }
        // Only the flags' defaults are compared: the test must not read the environment.
        let cmd = <Cli as clap::CommandFactory>::command();
        let d = Config::default();
        let expect = |id: &str, v: String| {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap();
            let default = arg.get_default_values()[0].to_string_lossy().to_string();
            assert_eq!(default, v, "default of {id}");
        };
        expect("broker_url", d.broker_url.clone());
        expect("relay_inflight_max", d.relay_inflight_max.to_string());
        expect(
            "outbox_backlog_max_events",
            d.outbox_backlog_max_events.to_string(),
        );
        expect(
            "outbox_backlog_max_bytes",
            d.outbox_backlog_max_bytes.to_string(),
        );
        expect("payload_max_bytes", d.payload_max_bytes.to_string());
        expect("retention_ms", d.retention_ms.to_string());
        expect(
            "consumer_gap_timeout_ms",
            d.consumer_gap_timeout_ms.to_string(),
        );
        expect("db_synchronous", d.db_synchronous.to_string());
        expect(
            "reconnect_backoff_max_ms",
            d.reconnect_backoff_max_ms.to_string(),
        );

        // Every field: parse no flags, with the environment switched off.
        let no_env = cmd.mut_args(|a| a.env(clap::builder::Resettable::Reset));
        let parsed =
            <Cli as clap::FromArgMatches>::from_arg_matches(&no_env.get_matches_from(["x"]))
                .unwrap();
        assert_eq!(format!("{:?}", parsed.config), format!("{d:?}"));

        // Config::default() takes the flags' defaults, never the environment (nextest
        // runs each test in its own process, so the variable stays here).
        std::env::set_var("MQTT_URL", "mqtt://elsewhere:1883");
        assert_eq!(Config::default().broker_url, "mqtt://127.0.0.1:1883");
    }

    #[test]
    fn a_password_comes_from_its_file_and_errors_name_the_file_never_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret-pw\n").unwrap();
        let c = Config {
            mqtt_username: Some("user-service".into()),
            mqtt_password_file: Some(file.clone()),
            ..Config::default()
        };
        let creds = c.credentials().unwrap().unwrap();
        assert_eq!(creds.username, "user-service");
        assert_eq!(creds.password.expose(), "s3cret-pw");
        assert!(
            !format!("{c:?} {creds:?}").contains("s3cret"),
            "Debug must not show it"
        );

        // An explicit password wins over the file.
        let explicit = Config {
            mqtt_password: Some(Secret::new("other")),
            ..c.clone()
        };
        assert_eq!(
            explicit.credentials().unwrap().unwrap().password.expose(),
            "other"
        );

        std::fs::write(&file, "line one s3cret\nline two\n").unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.flag, "mqtt-password-file");
        assert!(e.to_string().contains("more than one line"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");

        std::fs::write(&file, "\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("1 to 1024 bytes"));

        let missing = Config {
            mqtt_password_file: Some(dir.path().join("absent")),
            ..c.clone()
        };
        let e = missing.validate().unwrap_err().to_string();
        assert!(e.contains("absent"), "names the file: {e}");

        let no_user = Config {
            mqtt_username: None,
            ..c
        };
        assert_eq!(no_user.validate().unwrap_err().flag, "mqtt-username");
        assert!(Config::default().credentials().unwrap().is_none());
    }

    #[test]
    fn broker_url_is_parsed_and_bad_ones_are_named() {
        let mut c = Config {
            broker_url: "mqtt://localhost:1999".into(),
            ..Config::default()
        };
        assert_eq!(
            c.broker().unwrap(),
            BrokerAddr {
                tls: false,
                host: "localhost".into(),
                port: 1999
            }
        );
        c.broker_url = "mqtt://10.0.0.1".into();
        assert_eq!(c.broker().unwrap().port, 1883);
        c.broker_url = "mqtt://[::1]".into();
        let b = c.broker().unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 1883));
        c.broker_url = "mqtts://[fe80::1]:8884".into();
        let b = c.broker().unwrap();
        assert_eq!((b.host.as_str(), b.port), ("fe80::1", 8884));
        for bad_url in [
            "http://x:1",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtts://h:0",
            "mqtt://u:p@h:1",
            "mqtt://fe80::1",
            "mqtt://[::1",
            "mqtt://[nothost]:1",
            "mqtt://a b:1",
            "mqtt://[::1]x",
        ] {
            c.broker_url = bad_url.into();
            let e = c.validate().unwrap_err();
            assert_eq!(e.flag, "broker", "{bad_url}");
        }
    }

    #[test]
    fn a_list_of_broker_addresses_is_parsed_in_order_and_bad_lists_are_named() {
        let c = Config {
            broker_url: "mqtt://10.0.0.1:1883, mqtt://10.0.0.2,mqtt://[::1]:1999".into(),
            ..Config::default()
        };
        let hosts: Vec<(String, u16)> = c
            .brokers()
            .unwrap()
            .into_iter()
            .map(|a| (a.host, a.port))
            .collect();
        assert_eq!(
            hosts,
            [
                ("10.0.0.1".to_owned(), 1883),
                ("10.0.0.2".to_owned(), 1883),
                ("::1".to_owned(), 1999)
            ]
        );
        assert_eq!(c.broker().unwrap().host, "10.0.0.1");
        for (list, why) in [
            ("mqtt://a:1,,mqtt://b:1", "empty address"),
            ("mqtt://a:1,", "empty address"),
            ("mqtt://a:1,mqtts://b:1", "mixes"),
            ("mqtt://a:1,mqtt://a:1", "listed twice"),
            ("mqtt://a:1,http://b:1", "must look like"),
        ] {
            let e = Config {
                broker_url: list.into(),
                ..Config::default()
            }
            .validate()
            .unwrap_err();
            assert_eq!(e.flag, "broker", "{list}");
            assert!(e.to_string().contains(why), "{list}: {e}");
        }
        let many = vec!["mqtt://h:1"; BROKERS_MAX + 1]
            .iter()
            .enumerate()
            .map(|(i, u)| format!("{u}{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let e = Config {
            broker_url: many,
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("at most 16"), "{e}");
    }

    #[test]
    fn zero_and_out_of_range_settings_are_refused_with_their_flag() {
        let d = Config::default;
        let cases = [
            (
                Config {
                    relay_inflight_max: 0,
                    ..d()
                },
                "relay-inflight-max",
            ),
            (
                Config {
                    consumer_batch_max: 0,
                    ..d()
                },
                "consumer-batch-max",
            ),
            (
                Config {
                    topic_prefix: "a/+/b".into(),
                    ..d()
                },
                "topic-prefix",
            ),
            (
                Config {
                    reconnect_backoff_max_ms: 1,
                    ..d()
                },
                "reconnect-backoff-max-ms",
            ),
            (
                Config {
                    payload_max_bytes: 10,
                    ..d()
                },
                "payload-max-bytes",
            ),
            (
                Config {
                    source: "Bad/Name".into(),
                    ..d()
                },
                "source",
            ),
            // Regression: 100000000000 was accepted and aborted the service after ready.
            (
                Config {
                    consumer_batch_max: 100_000_000_000,
                    ..d()
                },
                "consumer-batch-max",
            ),
            (
                Config {
                    db_write_batch_max: 100_000_000_000,
                    ..d()
                },
                "db-write-batch-max",
            ),
            (
                Config {
                    mqtt_keep_alive_s: 1 << 40,
                    ..d()
                },
                "mqtt-keep-alive-s",
            ),
        ];
        for (config, flag) in cases {
            assert_eq!(config.validate().unwrap_err().flag, flag);
        }
    }
}
