//! `edge-outbox`: the box's admin tool. `verify` checks the cross-service invariants;
//! `run-all` runs the broker and both services in one terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_box::admin::demo_offline::{self, DemoOffline};
use edge_box::admin::mark_restored;
use edge_box::admin::power_cut::{self, PowerCut};
use edge_box::admin::run_all::{self, RunAll};
use edge_box::admin::verify::{self, Target};

#[derive(Parser)]
#[command(
    name = "edge-outbox",
    version,
    about = "Admin tool for an edge-outbox box"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open both service databases read-only and check the cross-service invariants of a
    /// drained box: one welcome credit per user, balances equal ledger sums, no stream
    /// with a gap, no event applied twice, nothing pending, no dead letters.
    /// Exits 0 when every check holds, 1 on any violation, 2 when it cannot run.
    Verify {
        /// user-service's database.
        #[arg(long, env = "USER_DB_PATH", default_value = "data/user-service.db")]
        user_db: PathBuf,
        /// transaction-service's database.
        #[arg(
            long,
            env = "TRANSACTION_DB_PATH",
            default_value = "data/transaction-service.db"
        )]
        transaction_db: PathBuf,
        /// user-service's producer name (--source).
        #[arg(long, default_value = "user-service")]
        users_source: String,
        /// transaction-service's producer name (--source).
        #[arg(long, default_value = "transaction-service")]
        transactions_source: String,
        /// The welcome credit transaction-service grants (its --welcome-credit-cents); 0
        /// when it grants none.
        #[arg(long, env = "WELCOME_CREDIT_CENTS", default_value_t = 1000)]
        welcome_credit_cents: i64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run Mosquitto (with ./mosquitto.conf) and both services, their output prefixed
    /// with their names; Ctrl-C stops them all cleanly.
    RunAll(RunAll),
    /// Offline first, step by step: a box of its own keeps accepting writes while its
    /// broker is stopped, then drains the backlog in order when it returns; ends with
    /// verify. Exits non-zero if any step fails.
    DemoOffline(DemoOffline),
    /// Run the box under concurrent load through repeated power cuts (a loop-mounted
    /// ext4 image shut down with FS_IOC_SHUTDOWN; needs root and loop devices) or
    /// SIGKILLs of one component at a time (--mode kill), then check that every
    /// acknowledged request survived exactly once and verify passes. Prints one summary
    /// line; exits 1 on any violation. Without root or loop devices it says SKIPPED.
    PowerCut(PowerCut),
    /// Create the broker's accounts and ACL in DIR (e.g. /etc/edge-outbox/mqtt): a
    /// password file per service and for the read-only observer (made once, 0600),
    /// Mosquitto's password file (hashes only) and ACL (rewritten every time, so that
    /// they match). Prints the lines to put in Mosquitto's config. Needs
    /// `mosquitto_passwd` (package mosquitto). run-all does the same in data/mqtt.
    BrokerAccess {
        /// Where the files go.
        #[arg(long)]
        dir: PathBuf,
        /// The services' --topic-prefix.
        #[arg(long, default_value = edge_outbox::protocol::DEFAULT_TOPIC_PREFIX)]
        topic_prefix: String,
    },
    /// After restoring a service's database from a backup, and before starting the
    /// service: begin a new producer epoch, so that consumers that applied more than the
    /// backup holds record what is gone and never take the new events for it (see
    /// docs/recovery.md). The service also finds a rewind by itself from its consumers'
    /// reports; this says it at once. Exits 1 on error.
    MarkRestored {
        /// The restored database.
        #[arg(long)]
        db: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Verify {
            user_db,
            transaction_db,
            users_source,
            transactions_source,
            welcome_credit_cents,
            json,
        } => {
            let target = Target {
                user_db,
                transaction_db,
                users_source,
                transactions_source,
                welcome_credit_cents,
            };
            match verify::verify(&target) {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report).expect("reports serialise")
                        );
                    } else {
                        print!("{}", report.render());
                    }
                    if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("verify: error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::BrokerAccess { dir, topic_prefix } => {
            match edge_box::admin::broker_access::ensure(&dir, &topic_prefix) {
                Ok(access) => {
                    println!(
                        "# {}: accounts and ACL ready. Mosquitto's config needs:\n{}",
                        dir.display(),
                        access.mosquitto_conf_lines()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("broker-access: error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::MarkRestored { db } => match mark_restored::mark_restored(&db) {
            Ok(change) => {
                println!(
                    "{}: epoch {} ended; epoch {} begins, sharing what the database holds",
                    db.display(),
                    change.from,
                    change.to
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mark-restored: error: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::RunAll(opts) => block_on("run-all", run_all::run(opts)),
        Cmd::DemoOffline(opts) => block_on("demo-offline", demo_offline::run(opts)),
        Cmd::PowerCut(opts) => block_on("power-cut", async {
            println!("{}", power_cut::run(opts).await?);
            Ok(())
        }),
    }
}

/// Runs an async command; an error is printed with its causes and exits 1.
fn block_on(name: &str, f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    edge_box::service::init_tracing(edge_box::service::LogFormat::Text);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
