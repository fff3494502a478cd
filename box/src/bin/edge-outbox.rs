//! `edge-outbox`: the box's admin tool. `verify` checks the cross-service invariants;
//! `run-all` runs the broker and both services in one terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_box::admin::cluster_demo::{self, ClusterDemo};
use edge_box::admin::demo_offline::{self, DemoOffline};
use edge_box::admin::mark_restored;
use edge_box::admin::operate::{self, Answer, Db, Page, Url};
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
    /// Beyond one box, step by step: a 3-node NATS cluster (deploy/nats/), each service
    /// on a host of its own (a network namespace as root; loopback otherwise, said so),
    /// a steady load, the death of a node, a service host cut off from the cluster,
    /// then verify. Exits non-zero if any step fails.
    ClusterDemo(ClusterDemo),
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
    /// A service's state from its database (read-only, safe beside the running
    /// service): backlog, oldest pending event, streams with their last, published and
    /// first held sequence numbers, consumed streams with their positions, dead
    /// letters. With --url, also what the running service says: broker connected,
    /// health, lag per stream (a lag above 0 is an open gap). Exits 0 when nothing
    /// needs attention, 1 when something does (dead letters, degraded, disconnected),
    /// 2 when it cannot run.
    Status {
        #[command(flatten)]
        db: Db,
        /// The running service's HTTP address, e.g. http://127.0.0.1:8081.
        #[arg(long)]
        url: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Messages a consumer could not apply: list and show read the database; requeue
    /// and drop ask the running service (--url).
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCmd,
    },
    /// Ask a producer to publish a stream again from a sequence number, through the
    /// running service that consumes it (--url), as that service's consumer. Events it
    /// applied already come again as duplicates, without effect. The producer serves a
    /// stream at most every few seconds. Exits 0 when the request was queued, 1 when
    /// refused (a stream this service does not consume), 2 when it cannot run.
    Replay {
        #[command(flatten)]
        url: Url,
        /// The producer (its --source), e.g. user-service.
        #[arg(long)]
        producer: String,
        /// The stream, e.g. users.
        #[arg(long)]
        stream: String,
        /// The first sequence number to publish again (1 or more).
        #[arg(long = "from", value_parser = clap::value_parser!(u64).range(1..))]
        from_seq: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A service's outbox rows (read-only, safe beside the running service).
    Outbox {
        #[command(subcommand)]
        command: OutboxCmd,
    },
}

#[derive(Subcommand)]
enum DeadLettersCmd {
    /// List dead letters, oldest first: id, age, stream, sequence, topic, reason.
    List {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        page: Page,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, with the message as kept. Exits 1 when there is no such id.
    Show {
        /// Its id.
        id: i64,
        #[command(flatten)]
        db: Db,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply a dead letter again through the running service's handlers and inbox
    /// rules. A message whose handler failed was skipped so that its stream did not
    /// stall: it is applied now, AFTER the events of its stream that came since, not in
    /// its place; requeue it once that order no longer matters (the handler fixed,
    /// the missing data there). A message refused before its stream was read is taken
    /// as if it had just arrived (applied if it is next, a duplicate if the stream is
    /// past it). Applied, it leaves the dead letters (a copy stays in
    /// dead_letter_actions). Exits 0 when applied, 1 when not (the reason is printed;
    /// it stays), 2 when it cannot run.
    Requeue {
        /// Its id.
        id: i64,
        #[command(flatten)]
        url: Url,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a dead letter aside without applying it: it leaves the dead letters; a copy
    /// stays in dead_letter_actions with the note and the time. Exits 0 when dropped,
    /// 1 when there is no such id, 2 when it cannot run.
    Drop {
        /// Its id.
        id: i64,
        #[command(flatten)]
        url: Url,
        /// Why (kept with the copy; at most 500 characters).
        #[arg(long)]
        note: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OutboxCmd {
    /// List outbox rows in id order: id, status, stream and sequence, type, event id.
    List {
        #[command(flatten)]
        db: Db,
        /// pending, published or all.
        #[arg(long, default_value = "all", value_parser = ["pending", "published", "all"])]
        status: String,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        #[command(flatten)]
        page: Page,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Prints an answer as text or JSON and exits with its code; an error exits 2.
fn finish(name: &str, answer: anyhow::Result<Answer>, json: bool) -> ExitCode {
    match answer {
        Ok(a) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&a.json).expect("answers serialise")
                );
            } else {
                print!("{}", a.text);
            }
            ExitCode::from(a.code)
        }
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            if json {
                println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            }
            ExitCode::from(operate::FAILED)
        }
    }
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
        Cmd::Status { db, url, json } => {
            finish("status", operate::status(&db.db, url.as_deref()), json)
        }
        Cmd::DeadLetters { command } => match command {
            DeadLettersCmd::List { db, page, json } => finish(
                "dead-letters list",
                operate::dead_letters_list(&db.db, page.after, page.limit),
                json,
            ),
            DeadLettersCmd::Show { id, db, json } => finish(
                "dead-letters show",
                operate::dead_letters_show(&db.db, id),
                json,
            ),
            DeadLettersCmd::Requeue { id, url, json } => finish(
                "dead-letters requeue",
                operate::post(&url.url, &format!("/admin/dead-letters/{id}/requeue"), None),
                json,
            ),
            DeadLettersCmd::Drop {
                id,
                url,
                note,
                json,
            } => {
                let query = note.map_or(String::new(), |n| {
                    format!("?note={}", operate::query_value(&n))
                });
                finish(
                    "dead-letters drop",
                    operate::post(
                        &url.url,
                        &format!("/admin/dead-letters/{id}/drop{query}"),
                        None,
                    ),
                    json,
                )
            }
        },
        Cmd::Replay {
            url,
            producer,
            stream,
            from_seq,
            json,
        } => finish(
            "replay",
            operate::post(
                &url.url,
                "/admin/replay",
                Some(
                    serde_json::json!({ "producer": producer, "stream": stream, "from_seq": from_seq }),
                ),
            ),
            json,
        ),
        Cmd::Outbox {
            command:
                OutboxCmd::List {
                    db,
                    status,
                    stream,
                    page,
                    json,
                },
        } => {
            let filter = match status.as_str() {
                "pending" => edge_outbox::outbox::RowFilter::Pending,
                "published" => edge_outbox::outbox::RowFilter::Published,
                _ => edge_outbox::outbox::RowFilter::All,
            };
            finish(
                "outbox list",
                operate::outbox_list(&db.db, filter, stream.as_deref(), page.after, page.limit),
                json,
            )
        }
        Cmd::RunAll(opts) => block_on("run-all", run_all::run(opts)),
        Cmd::DemoOffline(opts) => block_on("demo-offline", demo_offline::run(opts)),
        Cmd::ClusterDemo(opts) => block_on("cluster-demo", cluster_demo::run(opts)),
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
