//! transaction-service: a ledger per user. See box/src/transaction_service.rs and README.md.

use std::process::ExitCode;

use clap::Parser;
use edge_box::service::{self, ServiceArgs};
use edge_box::transaction_service::AMOUNT_MAX_CENTS;
use edge_outbox::Outbox;

/// transaction-service: records credits and debits (POST /transactions) and publishes
/// transaction.created; learns users from user-service's user.created events and
/// grants each one welcome credit, exactly once.
#[derive(Parser)]
#[command(name = "transaction-service", version)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,

    /// Producer name of user-service, whose "users" stream this service consumes.
    #[arg(long, env = "USERS_SOURCE", default_value = "user-service")]
    users_source: String,

    /// Credit granted to every new user, in cents (0 for none).
    #[arg(long, env = "WELCOME_CREDIT_CENTS", default_value_t = 1000,
          value_parser = clap::value_parser!(i64).range(0..=AMOUNT_MAX_CENTS))]
    welcome_credit_cents: i64,
}

fn main() -> ExitCode {
    let cli: Cli = service::parse_with_defaults(&[
        ("db_path", "data/transaction-service.db"),
        ("listen", "127.0.0.1:8082"),
        ("client_id", "transaction-service"),
        ("source", "transaction-service"),
    ]);
    let (source, welcome) = (cli.users_source, cli.welcome_credit_cents);
    let outbox = Outbox::new(&cli.service.outbox);
    service::main("transaction-service", cli.service, move || {
        edge_box::transaction_service::spec(&source, outbox, welcome)
    })
}
