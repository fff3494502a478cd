//! The storage layer's error type, shared by the database, the writer and the
//! migrations.

use std::path::PathBuf;

use rusqlite::ErrorCode;

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database file could not be opened or prepared.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        #[source]
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// SQLite refused to switch to WAL mode (e.g. a network filesystem).
    #[error("database {path}: journal_mode is {mode:?} after asking for WAL; WAL is required")]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// The database was written by a newer version of this program.
    #[error(
        "database {path} has schema version {found} for {component:?}, but this program knows \
         only up to version {known}; it was written by a newer release: upgrade this program \
         or use another database file"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The schema component (e.g. "edge_outbox").
        component: String,
        /// The newest version recorded in the database.
        found: i64,
        /// The newest version this program knows.
        known: i64,
    },
    /// A schema migration failed; nothing of it was applied.
    #[error("database {path}: applying schema {component:?} version {version} ({name}) failed: {source}")]
    Migration {
        /// The database file.
        path: PathBuf,
        /// The schema component.
        component: String,
        /// The migration's version.
        version: i64,
        /// The migration's file name.
        name: String,
        #[source]
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// Any other SQLite error.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The write batch this request belonged to failed to commit; nothing of it was kept.
    #[error("commit failed: {message}")]
    Commit {
        /// SQLite's error code, when there is one.
        code: Option<ErrorCode>,
        /// SQLite's message.
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
