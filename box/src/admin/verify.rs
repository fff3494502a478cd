//! `edge-outbox verify`: opens both service databases read-only and checks the
//! cross-service invariants of a drained box.
//!
//! The invariants hold once every event has been published and applied; run it after
//! the box has drained (no pending outbox rows, no consumer lag). Inbox records older
//! than `--retention-ms` are deleted; the event counts are then compared only through
//! the balances and positions, which are never deleted. A check that fails
//! names what violates it, with up to [`EXAMPLES_MAX`] examples.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use crate::contract::{TRANSACTION_CREATED, USER_CREATED};

/// Examples listed per failed check at most.
pub const EXAMPLES_MAX: usize = 10;

/// Where the two databases are and what their producers are called.
#[derive(Debug, Clone)]
pub struct Target {
    pub user_db: PathBuf,
    pub transaction_db: PathBuf,
    pub users_source: String,
    pub transactions_source: String,
    /// The welcome credit transaction-service grants (`--welcome-credit-cents`); 0 means
    /// none is expected.
    pub welcome_credit_cents: i64,
}

/// The last step of a demo: verify the box the demo ran in `dir` (both databases,
/// the services' default names, the default welcome credit), print the report, and
/// fail when an invariant does not hold.
pub(crate) async fn check_demo(dir: &std::path::Path) -> anyhow::Result<()> {
    let target = Target {
        user_db: dir.join("user-service.db"),
        transaction_db: dir.join("transaction-service.db"),
        users_source: crate::contract::USER_SERVICE.into(),
        transactions_source: crate::contract::TRANSACTION_SERVICE.into(),
        welcome_credit_cents: 1000,
    };
    let report = tokio::task::spawn_blocking(move || verify(&target)).await??;
    print!("{}", report.render());
    if !report.ok() {
        anyhow::bail!("verify found violations");
    }
    Ok(())
}

/// One invariant and whether it holds.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found: a count when it holds, the violations when it does not.
    pub detail: String,
}

/// Every check, in order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// A line per check, then a summary line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:4}  {:<44} {}\n",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        let failed = self.checks.iter().filter(|c| !c.ok).count();
        out.push_str(&if failed == 0 {
            format!("verify: all {} checks passed\n", self.checks.len())
        } else {
            format!("verify: {failed} of {} checks FAILED\n", self.checks.len())
        });
        out
    }
}

/// Why verification could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot open {path} read-only: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path} is not a {service} database (table {table} is missing)")]
    WrongDatabase {
        path: PathBuf,
        service: &'static str,
        table: &'static str,
    },
    #[error("query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// `file:` URI for a read-only attach, with the characters URIs reserve escaped.
pub(crate) fn read_only_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?mode=ro");
    uri
}

/// Opens the user database read-only with the transaction database attached as `ledger`.
fn open(target: &Target) -> Result<Connection, VerifyError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    for path in [&target.user_db, &target.transaction_db] {
        if !path.exists() {
            let source = rusqlite::Error::InvalidPath(path.clone());
            return Err(VerifyError::Open {
                path: path.clone(),
                source,
            });
        }
    }
    let conn =
        Connection::open_with_flags(read_only_uri(&target.user_db), flags).map_err(|source| {
            VerifyError::Open {
                path: target.user_db.clone(),
                source,
            }
        })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute(
        "ATTACH DATABASE ?1 AS ledger",
        [read_only_uri(&target.transaction_db)],
    )
    .map_err(|source| VerifyError::Open {
        path: target.transaction_db.clone(),
        source,
    })?;
    for (schema, path, service, table) in [
        ("main", &target.user_db, "user-service", "users"),
        (
            "ledger",
            &target.transaction_db,
            "transaction-service",
            "transactions",
        ),
    ] {
        let found: bool = conn
            .query_row(&format!("SELECT EXISTS (SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?1)"), [table], |r| r.get(0))
            .map_err(|source| VerifyError::Open { path: path.clone(), source })?;
        if !found {
            return Err(VerifyError::WrongDatabase {
                path: path.clone(),
                service,
                table,
            });
        }
    }
    Ok(conn)
}

/// Runs `sql`, whose rows are violations (one text column each), as a check.
fn check(
    conn: &Connection,
    name: &'static str,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
    ok_detail: String,
) -> Result<Check, VerifyError> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(params)?;
    let mut examples = Vec::new();
    let mut total = 0usize;
    while let Some(row) = rows.next()? {
        total += 1;
        if examples.len() < EXAMPLES_MAX {
            examples.push(row.get::<_, String>(0)?);
        }
    }
    Ok(if total == 0 {
        Check {
            name,
            ok: true,
            detail: ok_detail,
        }
    } else {
        let more = if total > examples.len() {
            format!(" (and {} more)", total - examples.len())
        } else {
            String::new()
        };
        Check {
            name,
            ok: false,
            detail: format!("{total} violation(s): {}{more}", examples.join("; ")),
        }
    })
}

fn count(conn: &Connection, sql: &str) -> Result<i64, VerifyError> {
    Ok(conn.query_row(sql, [], |r| r.get(0))?)
}

/// Checks every invariant. Errors only when the databases cannot be read at all.
pub fn verify(target: &Target) -> Result<Report, VerifyError> {
    let conn = open(target)?;
    let users = count(&conn, "SELECT COUNT(*) FROM main.users")?;
    let ledger = count(&conn, "SELECT COUNT(*) FROM ledger.transactions")?;
    let (us, ts) = (&target.users_source, &target.transactions_source);
    let mut checks = Vec::new();

    for (schema, label) in [("main", "user-service"), ("ledger", "transaction-service")] {
        let result: String =
            conn.query_row(&format!("PRAGMA {schema}.integrity_check(1)"), [], |r| {
                r.get(0)
            })?;
        checks.push(Check {
            name: if schema == "main" {
                "integrity: user-service"
            } else {
                "integrity: transaction-service"
            },
            ok: result == "ok",
            detail: format!("{label}: {result}"),
        });
    }
    checks.push(check(
        &conn,
        "drained: no pending outbox rows",
        "SELECT 'user-service has ' || COUNT(*) || ' pending' FROM main.outbox WHERE published_at_ms IS NULL HAVING COUNT(*) > 0
         UNION ALL
         SELECT 'transaction-service has ' || COUNT(*) || ' pending' FROM ledger.outbox WHERE published_at_ms IS NULL HAVING COUNT(*) > 0",
        &[],
        "0 pending".into(),
    )?);
    checks.push(check(
        &conn,
        "one welcome credit per user",
        "SELECT 'user ' || u.uid || ' has ' || (SELECT COUNT(*) FROM ledger.transactions t WHERE t.user_id = u.uid AND t.welcome = 1) || ' welcome credits'
           FROM main.users u
          WHERE (SELECT COUNT(*) FROM ledger.transactions t WHERE t.user_id = u.uid AND t.welcome = 1) != (?1 > 0)
         UNION ALL
         SELECT 'welcome credit ' || t.id || ' is ' || t.amount_cents || ' cents, not ' || ?1
           FROM ledger.transactions t WHERE t.welcome = 1 AND t.amount_cents != ?1",
        &[&target.welcome_credit_cents],
        format!("{users} users, {} cents each", target.welcome_credit_cents),
    )?);
    checks.push(check(
        &conn,
        "balances equal ledger sums",
        "SELECT 'user ' || u.uid || ': balance ' || u.balance_cents || ' != ledger sum ' || COALESCE(s.total, 0)
           FROM main.users u
           LEFT JOIN (SELECT user_id, SUM(CASE kind WHEN 'credit' THEN amount_cents ELSE -amount_cents END) AS total
                        FROM ledger.transactions GROUP BY user_id) s ON s.user_id = u.uid
          WHERE u.balance_cents != COALESCE(s.total, 0)
         UNION ALL
         SELECT 'transaction-service balance of user ' || k.user_id || ' is ' || k.balance_cents || ' != its ledger sum'
           FROM ledger.known_users k
          WHERE k.balance_cents != (SELECT COALESCE(SUM(CASE kind WHEN 'credit' THEN amount_cents ELSE -amount_cents END), 0)
                                      FROM ledger.transactions t WHERE t.user_id = k.user_id)",
        &[],
        format!("{users} users, {ledger} ledger entries"),
    )?);
    checks.push(check(
        &conn,
        "every stream consumed to its end",
        "SELECT 'transaction-service is at ' || COALESCE((SELECT position FROM ledger.inbox_positions WHERE source = ?1 AND stream = 'users'), 0)
                || ' of ' || COALESCE((SELECT last_seq FROM main.outbox_streams WHERE stream = 'users'), 0) || ' in ' || ?1 || '/users'
          WHERE COALESCE((SELECT position FROM ledger.inbox_positions WHERE source = ?1 AND stream = 'users'), 0)
             != COALESCE((SELECT last_seq FROM main.outbox_streams WHERE stream = 'users'), 0)
         UNION ALL
         SELECT 'transaction-service follows epoch ' || COALESCE(p.epoch, 'none') || ' of ' || ?1 || '/users, which is in epoch ' || e.epoch
           FROM ledger.inbox_positions p, main.outbox_epoch e
          WHERE p.source = ?1 AND p.stream = 'users' AND p.epoch IS NOT e.epoch
         UNION ALL
         SELECT 'user-service follows epoch ' || COALESCE(p.epoch, 'none') || ' of ' || ?2 || '/transactions, which is in epoch ' || e.epoch
           FROM main.inbox_positions p, ledger.outbox_epoch e
          WHERE p.source = ?2 AND p.stream = 'transactions' AND p.epoch IS NOT e.epoch
         UNION ALL
         SELECT 'user-service is at ' || COALESCE((SELECT position FROM main.inbox_positions WHERE source = ?2 AND stream = 'transactions'), 0)
                || ' of ' || COALESCE((SELECT last_seq FROM ledger.outbox_streams WHERE stream = 'transactions'), 0) || ' in ' || ?2 || '/transactions'
          WHERE COALESCE((SELECT position FROM main.inbox_positions WHERE source = ?2 AND stream = 'transactions'), 0)
             != COALESCE((SELECT last_seq FROM ledger.outbox_streams WHERE stream = 'transactions'), 0)",
        &[us, ts],
        "positions equal the producers' last sequence numbers".into(),
    )?);
    checks.push(check(
        &conn,
        "no gaps in applied sequences",
        "SELECT side || ' ' || source || '/' || stream || ': ' || n || ' records for sequences ' || lo || '..' || hi || ', position ' || pos
           FROM (SELECT 'user-service' AS side, i.source, i.stream, COUNT(*) AS n, MIN(i.seq) AS lo, MAX(i.seq) AS hi, p.position AS pos
                   FROM main.inbox i JOIN main.inbox_positions p ON p.source = i.source AND p.stream = i.stream
                  WHERE i.epoch = COALESCE(p.epoch, '')
                    AND NOT EXISTS (SELECT 1 FROM main.inbox_epoch_changes c WHERE c.source = i.source AND c.stream = i.stream)
                  GROUP BY i.source, i.stream
                 UNION ALL
                 SELECT 'transaction-service', i.source, i.stream, COUNT(*), MIN(i.seq), MAX(i.seq), p.position
                   FROM ledger.inbox i JOIN ledger.inbox_positions p ON p.source = i.source AND p.stream = i.stream
                  WHERE i.epoch = COALESCE(p.epoch, '')
                    AND NOT EXISTS (SELECT 1 FROM ledger.inbox_epoch_changes c WHERE c.source = i.source AND c.stream = i.stream)
                  GROUP BY i.source, i.stream)
          WHERE n != hi - lo + 1 OR hi != pos
         UNION ALL
         SELECT 'user-service skipped ' || source || '/' || stream || ' ' || first_seq || '..' || last_seq FROM main.inbox_skipped
         UNION ALL
         SELECT 'transaction-service skipped ' || source || '/' || stream || ' ' || first_seq || '..' || last_seq FROM ledger.inbox_skipped",
        &[],
        "contiguous, ending at each position".into(),
    )?);
    checks.push(check(
        &conn,
        "every event applied exactly once",
        "SELECT 'user-service consumed ' || (SELECT COUNT(*) FROM main.inbox WHERE event_type = ?1)
                || ' transaction.created events for ' || (SELECT COUNT(*) FROM ledger.transactions) || ' ledger entries'
          WHERE (SELECT COUNT(*) FROM main.inbox WHERE event_type = ?1) != (SELECT COUNT(*) FROM ledger.transactions)
            AND (SELECT COALESCE(MIN(seq), 1) FROM main.inbox) = 1
            AND NOT EXISTS (SELECT 1 FROM main.inbox_epoch_changes WHERE orphaned_first IS NOT NULL)
         UNION ALL
         SELECT 'transaction-service consumed ' || (SELECT COUNT(*) FROM ledger.inbox WHERE event_type = ?2)
                || ' user.created events for ' || (SELECT COUNT(*) FROM main.users) || ' users'
          WHERE (SELECT COUNT(*) FROM ledger.inbox WHERE event_type = ?2) != (SELECT COUNT(*) FROM main.users)
            AND (SELECT COALESCE(MIN(seq), 1) FROM ledger.inbox) = 1
            AND NOT EXISTS (SELECT 1 FROM ledger.inbox_epoch_changes WHERE orphaned_first IS NOT NULL)
         UNION ALL
         SELECT 'user ' || u.uid || ' of user-service is unknown to transaction-service'
           FROM main.users u WHERE NOT EXISTS (SELECT 1 FROM ledger.known_users k WHERE k.user_id = u.uid)",
        &[&TRANSACTION_CREATED, &USER_CREATED],
        format!("{users} user.created, {ledger} transaction.created"),
    )?);
    checks.push(check(
        &conn,
        "no producer database replaced or restored",
        "SELECT side || ' applied ' || source || '/' || stream || ' ' || orphaned_first || '..' || orphaned_last
                || ' in epoch ' || COALESCE(from_epoch, 'none') || ', which its producer no longer has (now in epoch ' || to_epoch || ')'
           FROM (SELECT 'user-service' AS side, * FROM main.inbox_epoch_changes
                 UNION ALL SELECT 'transaction-service', * FROM ledger.inbox_epoch_changes)
          WHERE orphaned_first IS NOT NULL
         UNION ALL
         SELECT 'transaction-service knows user ' || k.user_id || ', which user-service no longer has'
           FROM ledger.known_users k WHERE NOT EXISTS (SELECT 1 FROM main.users u WHERE u.uid = k.user_id)",
        &[],
        "no events or users that a producer no longer has".into(),
    )?);
    checks.push(check(
        &conn,
        "no dead letters",
        "SELECT 'user-service: ' || reason FROM main.dead_letters UNION ALL SELECT 'transaction-service: ' || reason FROM ledger.dead_letters",
        &[],
        "0".into(),
    )?);
    Ok(Report { checks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_escape_reserved_characters() {
        assert_eq!(
            read_only_uri(Path::new("/a/b?c#d%e.db")),
            "file:/a/b%3fc%23d%25e.db?mode=ro"
        );
    }
}
