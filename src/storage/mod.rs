//! Storage, the first step of an event: the SQLite database that holds the domain
//! tables, the outbox and the inbox side by side, so that one transaction covers a
//! business change and its event.
//!
//! [`Database::open`] sets the pragmas, applies the schema migrations ([`migrate`]) and
//! starts the single writer ([`writer`]); readers come from a pool.
//!
//! Every connection runs in WAL mode so that readers never block the writer. Durability
//! is `synchronous=FULL` unless the caller asks otherwise: with WAL and FULL, a commit
//! that returned has been fsynced and survives a power cut (docs/ARCHITECTURE.md).

mod error;
pub mod migrate;
pub mod writer;

pub use error::DbError;
use migrate::CORE_SCHEMA;
pub use migrate::{Migration, Schema};
pub use writer::Writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;

use writer::WriterOptions;

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

/// [`DbOptions::page_size`] by default. See docs/performance.md, "Scale": every
/// commit writes each page it changed to the WAL whole, and the page of a random-key
/// index that every request touches is the largest part of what goes to the disk.
pub const DEFAULT_PAGE_SIZE: u32 = 2_048;
/// [`DbOptions::checkpoint_bytes`] by default.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 10 << 20;
/// Whether SQLite takes `size` as a page size: a power of two from 512 to 65536.
pub fn valid_page_size(size: u32) -> bool {
    size.is_power_of_two() && (512..=65_536).contains(&size)
}

/// The range of [`DbOptions::checkpoint_bytes`].
pub const CHECKPOINT_BYTES_RANGE: std::ops::RangeInclusive<u64> = (64 << 10)..=(1 << 30);

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
    /// Page size of a database this creates (SQLite keeps an existing database's).
    pub page_size: u32,
    /// WAL bytes after which a commit checkpoints them into the database
    /// (`wal_autocheckpoint`, in pages of the database's own size; a page written
    /// again before then is copied once), and the size the WAL file is cut back to
    /// after a checkpoint (`journal_size_limit`).
    pub checkpoint_bytes: u64,
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
            page_size: DEFAULT_PAGE_SIZE,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
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
    synchronous: Synchronous,
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
        // Only a database without pages takes a page size (before WAL mode is set).
        let pages: i64 = conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .map_err(open_err)?;
        if pages == 0 {
            let size = opts.page_size;
            let size = if valid_page_size(size) {
                size
            } else {
                DEFAULT_PAGE_SIZE
            };
            conn.pragma_update(None, "page_size", size)
                .map_err(open_err)?;
        }
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::NotWal { path, mode });
        }
        conn.pragma_update(None, "synchronous", opts.synchronous.as_sql())
            .map_err(open_err)?;
        let checkpoint_bytes = opts.checkpoint_bytes.clamp(
            *CHECKPOINT_BYTES_RANGE.start(),
            *CHECKPOINT_BYTES_RANGE.end(),
        );
        let page_size: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(open_err)?;
        let checkpoint_pages = (checkpoint_bytes / page_size.max(512) as u64).max(1);
        conn.pragma_update(None, "wal_autocheckpoint", checkpoint_pages as i64)
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_size_limit", checkpoint_bytes as i64)
            .map_err(open_err)?;

        migrate::migrate(&mut conn, &path, &CORE_SCHEMA)?;
        for schema in schemas {
            migrate::migrate(&mut conn, &path, schema)?;
        }
        // A run of the producer begins: what the database holds now is what it shares
        // with whatever consumers saw, should it turn out to have been rewound
        // (outbox::start_new_epoch).
        conn.execute(
            "UPDATE outbox_streams SET run_base = last_seq WHERE run_base != last_seq",
            [],
        )?;

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
                synchronous: opts.synchronous,
                readers,
                writer,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The writer's durability: anything but [`Synchronous::Full`] can lose
    /// acknowledged commits in a power cut.
    pub fn synchronous(&self) -> Synchronous {
        self.inner.synchronous
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

/// Bytes of the database's pages in use (its size less its free pages), as
/// `--retention-max-bytes` counts them.
pub fn used_bytes(conn: &Connection) -> Result<u64, DbError> {
    let pragma = |name: &str| -> Result<i64, DbError> {
        Ok(conn.pragma_query_value(None, name, |r| r.get(0))?)
    };
    let pages = pragma("page_count")? - pragma("freelist_count")?;
    Ok((pages.max(0) as u64) * pragma("page_size")? as u64)
}

/// Retention at `--retention-max-bytes`: while the database's used bytes exceed
/// `max_bytes`, runs `delete_oldest(tx, limit)` (looks at up to `limit` rows of the
/// oldest history it has not looked at yet and deletes what it may: how many, or None
/// when nothing is left to look at) in a write of its own, at most `batch_max` rows at
/// a time and about as many as the excess takes, so that it stops near the cap.
/// Returns the rows deleted, and the used bytes when they are still above the cap with
/// nothing left that may be deleted.
pub(crate) async fn prune_to_fit<F>(
    writer: &Writer,
    max_bytes: u64,
    batch_max: usize,
    delete_oldest: F,
) -> Result<(usize, Option<u64>), DbError>
where
    F: Fn(&rusqlite::Transaction, usize) -> Result<Option<usize>, DbError> + Clone + Send + 'static,
{
    let mut total = 0;
    if max_bytes == 0 {
        return Ok((0, None));
    }
    let mut limit = 64.min(batch_max);
    loop {
        let delete = delete_oldest.clone();
        let batch = writer
            .write(move |t| {
                let used = used_bytes(t)?;
                if used <= max_bytes {
                    return Ok::<_, DbError>(None);
                }
                let n = delete(t, limit)?;
                Ok(Some((n, used, used_bytes(t)?)))
            })
            .await?;
        let Some((n, before, after)) = batch else {
            return Ok((total, None));
        };
        let Some(n) = n else {
            return Ok((total, Some(before)));
        };
        total += n;
        // Pages come free only once empty: a batch may free none, the next many.
        let freed_per_row = before.saturating_sub(after) / n.max(1) as u64;
        limit = match freed_per_row {
            0 => limit.saturating_mul(2),
            per_row => (after.saturating_sub(max_bytes) / per_row + 1) as usize,
        }
        .clamp(1, batch_max);
        // Writes waiting for the writer go first.
        tokio::task::yield_now().await;
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
