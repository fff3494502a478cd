//! user-service: users and their balances. See box/src/user_service.rs and README.md.

use std::process::ExitCode;

use clap::Parser;
use edge_box::service::{self, ServiceArgs};

/// user-service: creates users (POST /users) and publishes user.created; applies
/// transaction-service's transaction.created events to the users' balances.
#[derive(Parser)]
#[command(name = "user-service", version)]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,

    /// Producer name of transaction-service, whose "transactions" stream this service consumes.
    #[arg(
        long,
        env = "TRANSACTIONS_SOURCE",
        default_value = "transaction-service"
    )]
    transactions_source: String,
}

fn main() -> ExitCode {
    let cli: Cli = service::parse_with_defaults(&[
        ("db_path", "data/user-service.db"),
        ("listen", "127.0.0.1:8081"),
        ("client_id", "user-service"),
        ("source", "user-service"),
    ]);
    let source = cli.transactions_source;
    service::main("user-service", cli.service, move || {
        edge_box::user_service::spec(&source)
    })
}
