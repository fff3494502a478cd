//! Schema migrations: each component (the library's outbox and inbox, each service's
//! domain tables) is a named, ordered list of SQL files, applied once each and recorded
//! in `schema_migrations`.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::error::DbError;
use crate::clock::now_ms;

/// One schema file, embedded at compile time.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// 1, 2, 3, ... with no gaps; applied in this order.
    pub version: i64,
    /// The file name, recorded with the version.
    pub name: &'static str,
    /// The SQL, run as one batch inside one transaction.
    pub sql: &'static str,
}

/// A named, ordered list of migrations. The core library has one; each service adds
/// its own for its domain tables, under its own component name.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// Names the schema in `schema_migrations`; unique per database.
    pub component: &'static str,
    /// Applied in order; versions 1, 2, 3, ... with no gaps.
    pub migrations: &'static [Migration],
}

/// The outbox, inbox and dead-letter tables every service database holds.
pub(crate) const CORE_SCHEMA: Schema = Schema {
    component: "edge_outbox",
    migrations: &[
        Migration {
            version: 1,
            name: "0001_outbox_inbox.sql",
            sql: include_str!("../../schema/core/0001_outbox_inbox.sql"),
        },
        Migration {
            version: 2,
            name: "0002_producer_epochs.sql",
            sql: include_str!("../../schema/core/0002_producer_epochs.sql"),
        },
        Migration {
            version: 3,
            name: "0003_dead_letter_actions.sql",
            sql: include_str!("../../schema/core/0003_dead_letter_actions.sql"),
        },
        Migration {
            version: 4,
            name: "0004_consumer_positions_by_stream.sql",
            sql: include_str!("../../schema/core/0004_consumer_positions_by_stream.sql"),
        },
    ],
};

/// Applies the migrations of `schema` that this database lacks, each in its own
/// transaction, and refuses a database that a newer program has written.
pub(crate) fn migrate(conn: &mut Connection, path: &Path, schema: &Schema) -> Result<(), DbError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             component     TEXT    NOT NULL,
             version       INTEGER NOT NULL,
             name          TEXT    NOT NULL,
             applied_at_ms INTEGER NOT NULL,
             PRIMARY KEY (component, version)
         ) STRICT;",
    )
    .map_err(|source| DbError::Open {
        path: path.to_owned(),
        source,
    })?;
    let known = schema.migrations.last().map_or(0, |m| m.version);
    debug_assert!(
        schema
            .migrations
            .iter()
            .enumerate()
            .all(|(i, m)| m.version == i as i64 + 1),
        "migrations of {} must be numbered 1, 2, 3, ...",
        schema.component
    );
    let found: i64 = conn
        .query_row(
            "SELECT MAX(version) FROM schema_migrations WHERE component = ?1",
            [schema.component],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()?
        .flatten()
        .unwrap_or(0);
    if found > known {
        return Err(DbError::NewerSchema {
            path: path.to_owned(),
            component: schema.component.to_owned(),
            found,
            known,
        });
    }
    for m in schema.migrations.iter().filter(|m| m.version > found) {
        let err = |source| DbError::Migration {
            path: path.to_owned(),
            component: schema.component.to_owned(),
            version: m.version,
            name: m.name.to_owned(),
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch(m.sql).map_err(err)?;
        tx.execute(
            "INSERT INTO schema_migrations (component, version, name, applied_at_ms)
             VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![schema.component, m.version, m.name, now_ms()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(
            component = schema.component,
            version = m.version,
            name = m.name,
            "applied schema migration"
        );
    }
    Ok(())
}
