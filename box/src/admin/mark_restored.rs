//! `edge-outbox mark-restored`: after an operator restored a service's database from a
//! backup, before starting the service, begin a new producer epoch (docs/recovery.md,
//! "Producer identity"). The service would find the rewind by itself from its
//! consumers' reports; marking it says so at once and exactly: the new epoch shares
//! with the old one what the backup holds.

use std::path::Path;

use anyhow::Context;
use edge_outbox::outbox::{self, EpochChange, EpochReason};
use edge_outbox::{Config, Database, DbOptions};

/// Begins a new epoch in the database at `path`, which must exist.
pub fn mark_restored(path: &Path) -> anyhow::Result<EpochChange> {
    let mut header = [0u8; 16];
    let is_database = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header))
        .is_ok()
        && &header == b"SQLite format 3\0";
    anyhow::ensure!(
        path.is_file(),
        "{} does not exist: mark-restored marks a restored database, it does not create one",
        path.display()
    );
    anyhow::ensure!(
        is_database,
        "{} is not an SQLite database (empty, or another file): nothing done",
        path.display()
    );
    let db = Database::open(&DbOptions::new(path), &[])
        .with_context(|| format!("opening {}", path.display()))?;
    // Just opened: every stream's run base is its last sequence number, so the new
    // epoch shares all that the backup holds and nothing is published again.
    let retention_ms = Config::default().retention_ms;
    let change = db.writer().write_blocking(move |tx| {
        outbox::start_new_epoch(tx, EpochReason::Restored, retention_ms)
    })?;
    Ok(change)
}
