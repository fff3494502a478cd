//! The single writer: group commit with per-request savepoints.
//!
//! With `synchronous=FULL` every commit costs an fsync, so one transaction per request
//! caps a service at the disk's fsync rate. Instead, every write in the process goes
//! to one thread that owns the only writing connection. It takes the first waiting
//! request, gathers whatever else is already queued (up to `batch_max`), and runs them
//! all in one `BEGIN IMMEDIATE` transaction, each inside its own savepoint:
//!
//! ```text
//! BEGIN IMMEDIATE
//!   SAVEPOINT w  request 1  RELEASE w              -> Ok
//!   SAVEPOINT w  request 2  ROLLBACK TO w; RELEASE  -> Err: its writes are undone,
//!   SAVEPOINT w  request 3  RELEASE w              -> Ok    its neighbours keep theirs
//! COMMIT  (one fsync)
//! ```
//!
//! A request learns its result only after the COMMIT returned, so nothing is reported
//! as done before it is durable. If the COMMIT fails, every request of the batch fails.
//! Requests are closures that receive `&rusqlite::Transaction`, so that functions such
//! as [`crate::outbox::Outbox::enqueue`] can demand, by type, to run inside a transaction.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use rusqlite::hooks::Action;
use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Notify};

use super::error::DbError;

/// Limits of the writer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriterOptions {
    /// Requests gathered into one transaction at most.
    pub batch_max: usize,
    /// Requests that may wait in the queue; senders wait when it is full.
    pub queue_max: usize,
}

/// Called once the batch's fate is known: `None` when it committed.
type Finish = Box<dyn FnOnce(Option<&DbError>) + Send>;
/// Runs a request in the open transaction (or learns that none could be opened) and
/// says whether it succeeded.
type Job = Box<dyn FnOnce(Result<&Transaction, &DbError>) -> (bool, Finish) + Send>;

/// What the writer has done, for metrics ([`crate::metrics`]). Recorded once per
/// batch, not per request.
#[derive(Debug)]
pub struct WriterStats {
    /// Requests per group-commit transaction.
    pub batch_requests: Histogram,
    /// Time from `BEGIN IMMEDIATE` to the end of `COMMIT` (the fsync included).
    pub commit_seconds: Histogram,
    /// Batches that failed as a whole (BEGIN, a savepoint or COMMIT failed).
    pub failed_batches: Counter,
}

impl WriterStats {
    fn new(batch_max: usize) -> WriterStats {
        // 1, 2, 4, ... up to the batch limit (512 by default: 10 buckets).
        let steps = (batch_max.max(2) as f64).log2().ceil() as u16 + 1;
        WriterStats {
            batch_requests: Histogram::new(exponential_buckets(1.0, 2.0, steps)),
            // 0.1 ms .. ~3.3 s: an fsync on an SD card takes 2 to 50 ms.
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            failed_batches: Counter::default(),
        }
    }
}

/// Handle to the writer thread. The thread stops when the last handle is dropped,
/// after it has run every request already queued.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    outbox_inserted: Arc<Notify>,
    stats: Arc<WriterStats>,
}

impl Writer {
    pub(crate) fn start(conn: Connection, opts: WriterOptions) -> Writer {
        let (jobs, rx) = mpsc::channel(opts.queue_max);
        let outbox_inserted = Arc::new(Notify::new());
        let inserted = Arc::new(AtomicBool::new(false));
        let flag = inserted.clone();
        // The hook fires for inserts that are later rolled back too; a spurious wake-up
        // of the relay costs one indexed query, a missed one would cost latency.
        conn.update_hook(Some(
            move |action: Action, _db: &str, table: &str, _row: i64| {
                if action == Action::SQLITE_INSERT && table == "outbox" {
                    flag.store(true, Ordering::Relaxed);
                }
            },
        ))
        .expect("the writer connection is owned here");
        let notify = outbox_inserted.clone();
        let stats = Arc::new(WriterStats::new(opts.batch_max));
        let recorder = stats.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, rx, opts.batch_max, &inserted, &notify, &recorder))
            .expect("spawning the writer thread");
        Writer {
            jobs,
            outbox_inserted,
            stats,
        }
    }

    /// What the writer has done (group-commit sizes, commit durations, failures).
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Requests waiting for the writer (not counting the batch it is running).
    pub fn queue_depth(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Signalled after a commit that inserted outbox rows (the relay waits on it).
    /// It holds one permit, so a commit that happens while nobody waits is not missed.
    pub(crate) fn outbox_inserted(&self) -> Arc<Notify> {
        self.outbox_inserted.clone()
    }

    /// Runs `f` inside the next group-commit transaction and returns its result once
    /// that transaction is durable. If `f` returns `Err`, its writes are rolled back
    /// and the other requests of the batch are unaffected.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Transaction) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let (job, reply) = job(f);
        self.jobs
            .send(job)
            .await
            .map_err(|_| E::from(DbError::WriterStopped))?;
        reply.await.map_err(|_| E::from(DbError::WriterStopped))?
    }

    /// [`Writer::write`] for code that is not async. Must not be called from inside
    /// the tokio runtime.
    pub fn write_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Transaction) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let (job, reply) = job(f);
        self.jobs
            .blocking_send(job)
            .map_err(|_| E::from(DbError::WriterStopped))?;
        reply
            .blocking_recv()
            .map_err(|_| E::from(DbError::WriterStopped))?
    }
}

fn job<T, E, F>(f: F) -> (Job, oneshot::Receiver<Result<T, E>>)
where
    F: FnOnce(&Transaction) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<DbError> + Send + 'static,
{
    let (reply, rx) = oneshot::channel();
    let job: Job = Box::new(move |tx: Result<&Transaction, &DbError>| {
        let result = match tx {
            Ok(tx) => catch_unwind(AssertUnwindSafe(|| f(tx)))
                .unwrap_or_else(|panic| Err(E::from(DbError::Panicked(panic_message(&panic))))),
            Err(e) => Err(E::from(batch_error(e))),
        };
        let ok = result.is_ok();
        let finish: Finish = Box::new(move |commit_error: Option<&DbError>| {
            let result = match commit_error {
                Some(e) if ok => Err(E::from(batch_error(e))),
                _ => result,
            };
            // The caller may have gone away (cancelled); its write stands regardless.
            let _ = reply.send(result);
        });
        (ok, finish)
    });
    (job, rx)
}

/// A copy of a batch-wide error for each request of the batch.
fn batch_error(e: &DbError) -> DbError {
    let code = match e {
        DbError::Sqlite(s) => s.sqlite_error_code(),
        DbError::Commit { code, .. } => *code,
        _ => None,
    };
    DbError::Commit {
        code,
        message: e.to_string(),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    inserted: &AtomicBool,
    notify: &Notify,
    stats: &WriterStats,
) {
    let mut batch = Vec::with_capacity(batch_max);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let requests = batch.len();
        let started = Instant::now();
        let committed = run_batch(&mut conn, &mut batch);
        stats.batch_requests.observe(requests as f64);
        if committed {
            stats
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
        } else {
            stats.failed_batches.inc();
        }
        if inserted.swap(false, Ordering::Relaxed) && committed {
            notify.notify_one();
        }
    }
    tracing::debug!("database writer stopped: every handle was dropped");
}

/// Runs one batch; returns true when it committed.
fn run_batch(conn: &mut Connection, batch: &mut Vec<Job>) -> bool {
    let mut finishes = Vec::with_capacity(batch.len());
    let mut failed: Option<DbError> = None;
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => Some(tx),
        Err(e) => {
            failed = Some(e.into());
            None
        }
    };
    for job in batch.drain(..) {
        let (Some(tx), None) = (&tx, &failed) else {
            let e = failed.as_ref().expect("no transaction means an error");
            finishes.push(job(Err(e)).1);
            continue;
        };
        if let Err(e) = tx
            .prepare_cached("SAVEPOINT w")
            .and_then(|mut s| s.execute([]))
        {
            let e = DbError::from(e);
            finishes.push(job(Err(&e)).1);
            failed = Some(e);
            continue;
        }
        let (ok, finish) = job(Ok(tx));
        finishes.push(finish);
        let end = (|| {
            if !ok {
                tx.prepare_cached("ROLLBACK TO w")?.execute([])?;
            }
            tx.prepare_cached("RELEASE w")?.execute([])
        })();
        if let Err(e) = end {
            failed = Some(e.into());
        } else if tx.is_autocommit() {
            // SQLite rolls back the whole transaction on some errors (disk full, I/O
            // error): the work of earlier requests is gone too.
            failed = Some(DbError::Commit {
                code: None,
                message: "SQLite rolled back the whole transaction after an error".into(),
            });
        }
    }
    let outcome = match (tx, failed) {
        (Some(tx), None) => tx.commit().map_err(DbError::from),
        (tx, Some(e)) => {
            drop(tx); // rolls back
            Err(e)
        }
        (None, None) => unreachable!("a batch without a transaction has an error"),
    };
    if let Err(e) = &outcome {
        tracing::warn!(error = %e, requests = finishes.len(), "write batch failed; every request in it is reported as failed");
    }
    let committed = outcome.is_ok();
    let error = outcome.err();
    for finish in finishes {
        finish(error.as_ref());
    }
    committed
}
