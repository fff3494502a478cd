//! Opening a service database: pragmas, schema migrations, the reader pool and the
//! single writer (see [`crate::writer`]).
//!
//! Every connection runs in WAL mode so that readers never block the writer. Durability
//! is `synchronous=FULL` unless the caller asks otherwise: with WAL and FULL, a commit
//! that returned has been fsynced and survives a power cut (see docs/sqlite.md).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use crate::clock::now_ms;
use crate::writer::{Writer, WriterOptions};

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database file could not be opened or prepared.
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// SQLite refused to switch to WAL mode (e.g. a network filesystem).
    #[error("database {path}: journal_mode is {mode:?} after asking for WAL; WAL is required")]
    NotWal { path: PathBuf, mode: String },
    /// The database was written by a newer version of this program.
    #[error(
        "database {path} has schema version {found} for {component:?}, but this program knows \
         only up to version {known}; it was written by a newer release: upgrade this program \
         or use another database file"
    )]
    NewerSchema {
        path: PathBuf,
        component: String,
        found: i64,
        known: i64,
    },
    /// A schema migration failed; nothing of it was applied.
    #[error("database {path}: applying schema {component:?} version {version} ({name}) failed: {source}")]
    Migration {
        path: PathBuf,
        component: String,
        version: i64,
        name: String,
        #[source]
        source: rusqlite::Error,
    },
    /// Any other SQLite error.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The write batch this request belonged to failed to commit; nothing of it was kept.
    #[error("commit failed: {message}")]
    Commit {
        code: Option<ErrorCode>,
        message: String,
    },
    /// The connection pool could not hand out a reader.
    #[error("no database connection available: {0}")]
    Pool(#[from] r2d2::Error),
    /// The writer thread has stopped (the database is shutting down).
    #[error("the database writer has stopped")]
    WriterStopped,
    /// A write request panicked; its savepoint was rolled back.
    #[error("a write request panicked: {0}")]
    Panicked(String),
    /// A blocking task could not be joined (the runtime is shutting down).
    #[error("database task failed: {0}")]
    Join(String),
}

impl DbError {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            DbError::Sqlite(e) => e.sqlite_error_code(),
            DbError::Commit { code, .. } => *code,
            _ => None,
        }
    }

    /// True when trying again later may succeed: the database was busy or locked by
    /// another process, the disk was full, or an I/O error left the outcome unknown.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.code(),
            Some(
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::DiskFull
                    | ErrorCode::SystemIoFailure
            )
        ) || matches!(self, DbError::Pool(_))
    }

    /// True for an I/O error: a failed commit may or may not have reached the disk.
    pub fn is_io_error(&self) -> bool {
        self.code() == Some(ErrorCode::SystemIoFailure)
    }

    /// True when the disk (or the database's size limit) is full.
    pub fn is_disk_full(&self) -> bool {
        self.code() == Some(ErrorCode::DiskFull)
    }
}

/// `PRAGMA synchronous` for the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync on every commit: what was acknowledged survives a power cut. The default.
    Full,
    /// Never corrupts, but loses recent commits on power loss. For benchmarks only.
    Normal,
    /// No fsync at all. For benchmarks only (the "what the disk costs" baseline).
    Off,
}

impl Synchronous {
    fn as_sql(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
            Synchronous::Off => "OFF",
        }
    }
}

impl FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Synchronous::Full),
            "normal" => Ok(Synchronous::Normal),
            "off" => Ok(Synchronous::Off),
            other => Err(format!("{other:?} is not one of full, normal, off")),
        }
    }
}

impl std::fmt::Display for Synchronous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_sql().to_ascii_lowercase())
    }
}

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
    pub component: &'static str,
    pub migrations: &'static [Migration],
}

/// The outbox, inbox and dead-letter tables every service database holds.
pub const CORE_SCHEMA: Schema = Schema {
    component: "edge_outbox",
    migrations: &[Migration {
        version: 1,
        name: "0001_outbox_inbox.sql",
        sql: include_str!("../schema/core/0001_outbox_inbox.sql"),
    }],
};

/// How to open a database.
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// The database file; created (with its parent folder) when missing.
    pub path: PathBuf,
    /// Writer durability; readers do not write.
    pub synchronous: Synchronous,
    /// How long a statement waits for a lock held by another connection or process.
    pub busy_timeout_ms: u64,
    /// Reader connections in the pool.
    pub readers_max: u32,
    /// Write requests gathered into one transaction at most.
    pub write_batch_max: usize,
    /// Write requests that may wait for the writer at once.
    pub write_queue_max: usize,
}

impl DbOptions {
    /// Defaults for `path`: FULL durability, 5 s busy timeout, 4 readers, batches of 512.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DbOptions {
            path: path.into(),
            synchronous: Synchronous::Full,
            busy_timeout_ms: 5_000,
            readers_max: 4,
            write_batch_max: 512,
            write_queue_max: 4_096,
        }
    }

    /// Database options from the outbox settings.
    pub fn from_config(path: impl Into<std::path::PathBuf>, config: &crate::Config) -> DbOptions {
        DbOptions {
            synchronous: config.db_synchronous,
            busy_timeout_ms: config.db_busy_timeout_ms,
            write_batch_max: config.db_write_batch_max,
            ..DbOptions::new(path)
        }
    }
}

/// A reader connection from the pool.
pub type ReadConn = r2d2::PooledConnection<SqliteConnectionManager>;

/// An open service database: a pool of readers and the one writer.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    readers: r2d2::Pool<SqliteConnectionManager>,
    writer: Writer,
}

impl Database {
    /// Opens (creating when missing) the database at `opts.path`, switches it to WAL,
    /// applies the core schema and then `schemas` in order, and starts the writer.
    pub fn open(opts: &DbOptions, schemas: &[Schema]) -> Result<Database, DbError> {
        let path = opts.path.clone();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| DbError::Open {
                path: path.clone(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let open_err = |source| DbError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        configure(&conn, opts.busy_timeout_ms).map_err(open_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::NotWal { path, mode });
        }
        conn.pragma_update(None, "synchronous", opts.synchronous.as_sql())
            .map_err(open_err)?;

        migrate(&mut conn, &path, &CORE_SCHEMA)?;
        for schema in schemas {
            migrate(&mut conn, &path, schema)?;
        }

        let busy_timeout_ms = opts.busy_timeout_ms;
        let manager = SqliteConnectionManager::file(&path)
            .with_flags(
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )
            .with_init(move |c| configure(c, busy_timeout_ms));
        let readers = r2d2::Pool::builder()
            .max_size(opts.readers_max.max(1))
            .min_idle(Some(1))
            .connection_timeout(Duration::from_millis(busy_timeout_ms.max(1_000)))
            .build(manager)?;

        let writer = Writer::start(
            conn,
            WriterOptions {
                batch_max: opts.write_batch_max.max(1),
                queue_max: opts.write_queue_max.max(1),
            },
        );
        Ok(Database {
            inner: Arc::new(Inner {
                path,
                readers,
                writer,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The single writer: every write goes through it.
    pub fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// A read-only connection from the pool, for blocking code.
    pub fn reader(&self) -> Result<ReadConn, DbError> {
        Ok(self.inner.readers.get()?)
    }

    /// Runs `f` with a reader on tokio's blocking pool, so that async code never
    /// blocks on SQLite.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = db.reader()?;
            f(&conn)
        })
        .await
        .map_err(|e| DbError::Join(e.to_string()))?
    }
}

/// Prepared statements kept per connection: more than any connection here uses.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Per-connection settings shared by the writer and the readers.
fn configure(conn: &Connection, busy_timeout_ms: u64) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_millis(busy_timeout_ms))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Every request and every consumed message runs in a savepoint, and SQLite copies
    // each page a savepoint first touches to a statement journal: in a temp file by
    // default, which cost a pwrite per page (69% of the consumer's time was in the
    // kernel, make bench + perf). In memory it is bounded by one write batch.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // rusqlite keeps 16 prepared statements per connection by default; the writer of
    // transaction-service cycles through about 20 (inbox, handlers, outbox, marks,
    // savepoints), so each one was evicted before its next use and prepared again.
    // POST /users at FULL: 94-97 instead of 103-106 us of user-service CPU per request.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(())
}

/// Applies the migrations of `schema` that this database lacks, each in its own
/// transaction, and refuses a database that a newer program has written.
fn migrate(conn: &mut Connection, path: &Path, schema: &Schema) -> Result<(), DbError> {
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
