//! What the two services share: their command line, their start-up and shutdown, the
//! HTTP error type and extractors, idempotency keys and the status endpoints.
//!
//! A service is a [`Spec`]: its schema, its routes, the streams it consumes and the
//! handlers that apply them. [`run`] opens the database, starts the relay, the
//! consumer and the HTTP server, and stops all three on SIGINT or SIGTERM.

pub mod admin_routes;
pub mod http;
pub mod idempotency;
pub mod metrics;
pub mod server;
pub mod status;

pub use http::AppState;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::Router;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;

use edge_outbox::storage::{Migration, Schema};
use edge_outbox::{Config, Consumer, Database, Handlers, Outbox, Relay, StreamKey};

/// Tables every HTTP service has (idempotency keys).
pub const SERVICE_SCHEMA: Schema = Schema {
    component: "service",
    migrations: &[Migration {
        version: 1,
        name: "0001_idempotency.sql",
        sql: include_str!("../../schema/service/0001_idempotency.sql"),
    }],
};

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For a person: one line per event, colours at a terminal.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
}

/// Flags every service has. The defaults of `--db`, `--listen`, `--client-id` and
/// `--source` differ per service; see [`parse_with_defaults`].
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// SQLite database file; created, with its folder, when missing.
    #[arg(long = "db", env = "DB_PATH")]
    pub db_path: PathBuf,

    /// HTTP address to listen on. Keep it on loopback unless a firewall or a reverse
    /// proxy guards the port: the API has no authentication.
    #[arg(long, env = "LISTEN_ADDR")]
    pub listen: SocketAddr,

    /// Time a client has to send a request's headers, and that an idle keep-alive
    /// connection may wait for its next request; then the connection is closed.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,

    /// Time a client has to send a request's body (at most 64 KiB); then 408.
    #[arg(long, env = "HTTP_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_body_timeout_ms: u64,

    /// HTTP connections served at once; more wait in the kernel's accept queue.
    #[arg(long, env = "HTTP_CONNECTIONS_MAX", default_value_t = 512)]
    pub http_connections_max: usize,

    /// Log lines as text for a person, or as one JSON object per line (for journald,
    /// Vector or Loki). Either way on standard error, and never with a secret.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub outbox: Config,
}

impl ServiceArgs {
    /// The HTTP limits, checked: each must be positive and sensible.
    pub fn http_limits(&self) -> anyhow::Result<server::HttpLimits> {
        for (flag, v, max) in [
            (
                "http-header-timeout-ms",
                self.http_header_timeout_ms,
                3_600_000,
            ),
            ("http-body-timeout-ms", self.http_body_timeout_ms, 3_600_000),
            (
                "http-connections-max",
                self.http_connections_max as u64,
                100_000,
            ),
        ] {
            if v == 0 || v > max {
                anyhow::bail!("invalid setting --{flag}: must be between 1 and {max}");
            }
        }
        Ok(server::HttpLimits {
            header_timeout: Duration::from_millis(self.http_header_timeout_ms),
            body_timeout: Duration::from_millis(self.http_body_timeout_ms),
            connections_max: self.http_connections_max,
        })
    }
}

/// Parses the command line of `C`, first giving the named arguments the defaults of
/// this binary (e.g. `("listen", "127.0.0.1:8081")`).
pub fn parse_with_defaults<C: CommandFactory + FromArgMatches>(
    defaults: &[(&str, &'static str)],
) -> C {
    let mut cmd = C::command();
    for (id, value) in defaults {
        cmd = cmd.mut_arg(*id, |a| a.required(false).default_value(*value));
    }
    let matches: ArgMatches = cmd.get_matches();
    C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// One service: what differs between user-service and transaction-service.
pub struct Spec {
    /// For logs.
    pub name: &'static str,
    /// Its domain tables.
    pub schema: Schema,
    /// Its HTTP routes (the status routes and GET /openapi.json are added to them).
    pub routes: Router<AppState>,
    /// The OpenAPI document of `routes` (see [`openapi`]).
    pub api: utoipa::openapi::OpenApi,
    /// The streams of other services it consumes, and how it applies their events.
    pub consumes: Vec<StreamKey>,
    pub handlers: Handlers,
    /// Run once at start, in one write, after the migrations: data fixes that SQL
    /// alone cannot make (e.g. keys computed in Rust for rows of an older version).
    pub prepare: Option<fn(&rusqlite::Transaction) -> rusqlite::Result<usize>>,
}

/// The OpenAPI 3.1 document of a service whose own operations are in `api`: made from
/// the handlers and types by utoipa, so it cannot drift from the code.
pub fn openapi(mut api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    api.merge(status::Api::openapi());
    api.merge(admin_routes::Api::openapi());
    api.info.version = env!("CARGO_PKG_VERSION").to_owned();
    api
}

/// The whole router of a service: its routes, the status routes, GET /openapi.json,
/// GET /metrics, the body limit, the request timing.
pub fn app(routes: Router<AppState>, api: utoipa::openapi::OpenApi, state: AppState) -> Router {
    let timing = axum::middleware::from_fn_with_state(state.metrics.clone(), metrics::track);
    let doc = axum::body::Bytes::from(
        serde_json::to_vec(&openapi(api)).expect("the document serialises"),
    );
    routes
        .merge(status::routes())
        .merge(admin_routes::routes())
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc,
                    )
                }
            }),
        )
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(DefaultBodyLimit::max(http::BODY_MAX_BYTES))
        .layer(timing)
        .with_state(state)
}

/// Opens the database of a service with every schema it needs.
pub fn open_database(args: &ServiceArgs, schema: Schema) -> anyhow::Result<Database> {
    let opts = args.outbox.db_options(&args.db_path);
    Database::open(&opts, &[SERVICE_SCHEMA, schema])
        .with_context(|| format!("opening database {}", args.db_path.display()))
}

/// Sets up logging, runs the service until SIGINT or SIGTERM, and turns an error into
/// a message and exit code 1.
pub fn main(name: &'static str, args: ServiceArgs, spec: impl FnOnce() -> Spec) -> ExitCode {
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown_on_signal(shutdown.clone()));
        run(spec(), args, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Through the log, so that it is a JSON line too with --log-format json.
            tracing::error!(service = name, "{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` sets the level (default `info`): a level, or
/// `target=level` directives separated by commas (`info,edge_outbox::relay=debug`).
/// A `RUST_LOG` that does not parse is ignored (info), with a warning.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, bad) = match log_filter(std::env::var("RUST_LOG").ok().as_deref()) {
        Ok(f) => (f, None),
        Err(e) => (log_filter(None).expect("the default parses"), Some(e)),
    };
    let logs = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => logs
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        // Colours only for a person at a terminal; not in files or run-all's prefixed lines.
        LogFormat::Text => logs
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if let Some(e) = bad {
        tracing::warn!(error = %e, "RUST_LOG does not parse; logging at info");
    }
}

/// The log filter that `RUST_LOG` (`value`) asks for: comma-separated directives, each
/// a level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or `target=level`, spaces
/// around them ignored; unset or empty is `info`. Anything else is refused, so that a
/// typo cannot silently switch logging off.
pub fn log_filter(value: Option<&str>) -> Result<tracing_subscriber::filter::Targets, String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let mut clean = Vec::new();
    for piece in value
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (target, level) = match piece.split_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, piece),
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{piece:?}: {level:?} is not one of {}",
                LEVELS.join(", ")
            ));
        }
        match target {
            None => clean.push(level.to_owned()),
            Some(t)
                if !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c)) =>
            {
                clean.push(format!("{t}={level}"))
            }
            Some(t) => {
                return Err(format!(
                    "{piece:?}: {t:?} is not a target (letters, digits, _, : and -)"
                ))
            }
        }
    }
    if clean.is_empty() {
        clean.push("info".into());
    }
    clean.join(",").parse().map_err(|e| format!("{e}"))
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the service with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: shutting down (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now; anything not committed is retried after restart");
    std::process::exit(130);
}

/// Runs a service until `shutdown` fires: the HTTP server stops accepting and
/// finishes its requests, then the relay and consumer finish their in-flight work.
pub async fn run(spec: Spec, args: ServiceArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = args.outbox.clone();
    cfg.validate()?;
    let http_limits = args.http_limits()?;
    if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "listening beyond loopback: the API has no authentication");
    }
    if cfg.db_synchronous != edge_outbox::Synchronous::Full {
        tracing::warn!(db_synchronous = %cfg.db_synchronous, "--db-synchronous is not full: commits acknowledged to clients can be lost in a power cut (for benchmarks only)");
    }
    let clear_text_beyond_loopback = cfg.brokers()?.iter().any(|b| !b.tls && !b.is_loopback());
    match &cfg.mqtt_username {
        Some(_) if clear_text_beyond_loopback => tracing::warn!(
            broker = %cfg.broker_url,
            "sending the MQTT password in clear text to a broker beyond this machine: use mqtts://"
        ),
        Some(user) => tracing::info!(username = %user, "connecting to the broker with a username and password"),
        None => tracing::warn!("no MQTT credentials (--mqtt-username): connecting anonymously, which only a broker that admits anyone accepts"),
    }
    let db = open_database(&args, spec.schema)?;
    if let Some(prepare) = spec.prepare {
        let n = db
            .writer()
            .write(move |tx| prepare(tx).map_err(edge_outbox::DbError::from))
            .await
            .context("preparing the database")?;
        if n > 0 {
            tracing::info!(rows = n, "database prepared for this version");
        }
    }
    let relay = Relay::new(db.clone(), cfg.clone())?;
    let consumer = Consumer::new(db.clone(), cfg.clone(), spec.consumes, spec.handlers)?;
    let state = AppState::new(
        db.clone(),
        Outbox::new(&cfg),
        relay.status(),
        consumer.status(),
    )
    .with_admin(consumer.admin());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    tracing::info!(
        service = spec.name,
        listen = %listener.local_addr()?,
        db = %args.db_path.display(),
        broker = %cfg.broker_url,
        source = %cfg.source,
        "ready"
    );
    // Under systemd (Type=notify): ready now that the database is open and the port
    // listens. Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not tell systemd that the service is ready");
    }

    let relay_task = tokio::spawn(stop_all_when_done(
        "relay",
        relay.run(shutdown.child_token()),
        shutdown.clone(),
    ));
    let consumer_task = tokio::spawn(stop_all_when_done(
        "consumer",
        consumer.run(shutdown.child_token()),
        shutdown.clone(),
    ));
    let maintenance = tokio::spawn(prune_idempotency_keys(
        db.clone(),
        cfg.clone(),
        shutdown.child_token(),
    ));
    server::serve(
        listener,
        app(spec.routes, spec.api, state),
        http_limits,
        shutdown.clone(),
        Config::ms(cfg.shutdown_timeout_ms),
    )
    .await;
    shutdown.cancel();
    let grace = Config::ms(cfg.shutdown_timeout_ms) + Duration::from_secs(1);
    let (relay_result, consumer_result, _) = tokio::join!(
        tokio::time::timeout(grace, relay_task),
        tokio::time::timeout(grace, consumer_task),
        maintenance
    );
    for (what, result) in [("relay", relay_result), ("consumer", consumer_result)] {
        match result {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e.context(what)),
            Ok(Err(join)) => anyhow::bail!("{what} task failed: {join}"),
            Err(_) => tracing::warn!("{what} did not stop within {grace:?}; exiting anyway (unfinished work is retried after restart)"),
        }
    }
    tracing::info!(service = spec.name, "stopped");
    Ok(())
}

/// Runs a background part of the service; if it ends before the service is asked to
/// stop (it failed), the whole service stops, so that it never serves writes that
/// nothing would publish.
async fn stop_all_when_done<E: Into<anyhow::Error>>(
    what: &'static str,
    part: impl std::future::Future<Output = Result<(), E>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let result = part.await.map_err(Into::into);
    if shutdown.is_cancelled() {
        return result;
    }
    tracing::error!("{what} ended before the service was asked to stop; stopping the service");
    shutdown.cancel();
    result.and_then(|()| Err(anyhow::anyhow!("{what} stopped unexpectedly")))
}

/// Deletes idempotency keys older than `--retention-ms`, every `--retention-interval-ms`.
async fn prune_idempotency_keys(db: Database, cfg: Config, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Config::ms(cfg.retention_interval_ms));
    let clock = idempotency::PruneClock::start();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let keep = cfg.retention_ms;
        let now = clock.now(edge_outbox::clock::now_ms());
        match db
            .writer()
            .write(move |tx| idempotency::prune(tx, keep, now))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "deleted expired idempotency keys"),
            Err(e) => {
                tracing::warn!(error = %e, "could not delete expired idempotency keys; will try again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    fn enabled(value: Option<&str>, target: &str, level: Level) -> bool {
        log_filter(value).unwrap().would_enable(target, &level)
    }

    #[test]
    fn rust_log_takes_levels_and_targets_and_refuses_what_would_silence_the_logs() {
        for empty in [None, Some(""), Some(" , ")] {
            assert!(
                enabled(empty, "edge_outbox::relay", Level::INFO),
                "{empty:?}"
            );
            assert!(
                !enabled(empty, "edge_outbox::relay", Level::DEBUG),
                "{empty:?}"
            );
        }
        assert!(enabled(Some("info,"), "x", Level::INFO));
        assert!(enabled(
            Some("warn, edge_outbox=debug"),
            "edge_outbox::relay",
            Level::DEBUG
        ));
        assert!(!enabled(
            Some("warn, edge_outbox=debug"),
            "edge_box",
            Level::INFO
        ));
        assert!(enabled(Some("DEBUG"), "anything", Level::DEBUG));
        for bad in [
            "dbug",
            "*",
            "edge_outbox[relay]=debug",
            "=debug",
            "edge_outbox=loud",
            "a=b=c",
        ] {
            assert!(log_filter(Some(bad)).is_err(), "{bad:?} must be refused");
        }
    }
}
