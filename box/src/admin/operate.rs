//! The commands for the day something goes wrong: `status`, `dead-letters`, `replay`
//! and `outbox list`.
//!
//! What only reads (status, dead-letters list and show, outbox list) opens the
//! service's database read-only, safely beside the running service (WAL: readers never
//! block its writer). What changes something (requeue, drop, replay) asks the running
//! service over its loopback HTTP port (`--url`), so that its own handlers, settings
//! and single writer do the work.
//!
//! Exit codes, for scripts: 0 done (status: nothing needs attention); 1 not done, or
//! something needs attention (dead letters, a degraded or disconnected service); 2 the
//! command could not run (no such file, service unreachable, bad arguments).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};

use edge_outbox::clock::now_ms;
use edge_outbox::consumer::{dead_letters, inbox};
use edge_outbox::outbox::{self, RowFilter};

/// Exit code: done, nothing needs attention.
pub const OK: u8 = 0;
/// Exit code: not done, or something needs attention.
pub const ATTENTION: u8 = 1;
/// Exit code: the command could not run.
pub const FAILED: u8 = 2;

/// A service's loopback address, e.g. http://127.0.0.1:8081.
#[derive(Debug, Clone, clap::Args)]
pub struct Url {
    /// The running service's HTTP address (its --listen), e.g. http://127.0.0.1:8081.
    #[arg(long, env = "SERVICE_URL")]
    pub url: String,
}

/// What a command prints, and the exit code that goes with it.
pub struct Answer {
    pub code: u8,
    pub json: Value,
    pub text: String,
}

/// Opens `path` read-only; refuses a file that is not an SQLite database with an
/// outbox.
pub fn open_read_only(path: &Path) -> anyhow::Result<Connection> {
    anyhow::ensure!(path.is_file(), "{} does not exist", path.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(super::verify::read_only_uri(path), flags)
        .with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let has_outbox: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters')",
            [],
            |r| r.get(0),
        )
        .with_context(|| format!("{} is not an SQLite database", path.display()))?;
    anyhow::ensure!(
        has_outbox,
        "{} is not a database of an edge-outbox service (no dead_letters table)",
        path.display()
    );
    Ok(conn)
}

/// `text` with every control character escaped (`\u{1b}`): a message's bytes are
/// anyone's, and must not drive the operator's terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn age(ms: Option<i64>) -> String {
    ms.map_or("-".into(), |t| {
        humantime::format_duration(Duration::from_secs((now_ms() - t).max(0) as u64 / 1000))
            .to_string()
    })
}

/// `status`: the database's backlog, streams, positions and dead letters; with `url`,
/// what the running service says too (connected, lag, open gaps, health).
pub fn status(db: &Path, url: Option<&str>) -> anyhow::Result<Answer> {
    let c = open_read_only(db)?;
    let backlog = outbox::backlog(&c)?;
    let oldest = outbox::oldest_unpublished_ms(&c)?;
    let heads = outbox::heads(&c)?;
    let positions = inbox::positions(&c)?;
    let dead = dead_letters::count(&c)?;
    let live = url.map(|u| {
        let status = get(u, "/outbox");
        let health = get(u, "/healthz");
        (status, health)
    });
    let mut attention = Vec::new();
    if dead > 0 {
        attention.push(format!(
            "{dead} dead letter(s): edge-outbox dead-letters list --db {}",
            db.display()
        ));
    }
    let mut text = format!(
        "{}\noutbox: {} pending ({} bytes), oldest never published {}\n",
        db.display(),
        backlog.events,
        backlog.bytes,
        age(oldest)
    );
    let mut streams = serde_json::Map::new();
    for (name, h) in &heads {
        text += &format!(
            "  stream {name}: last {}, published through {}, first held {}\n",
            h.last, h.head, h.first
        );
        streams.insert(
            name.clone(),
            json!({ "last_seq": h.last, "published_through": h.head, "first_held_seq": h.first }),
        );
    }
    let live_streams = live
        .as_ref()
        .and_then(|(s, _)| s.as_ref().ok())
        .map(|s| s["consumer"]["streams"].clone())
        .unwrap_or(Value::Null);
    let mut consumed = serde_json::Map::new();
    let mut keys: Vec<_> = positions.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, (position, epoch)) in keys {
        let live = &live_streams[key.to_string()];
        let lag = live["lag"].as_u64();
        text += &format!(
            "  consumes {key}: position {position}{}\n",
            lag.map_or(String::new(), |l| format!(
                ", lag {l}{}",
                if l > 0 { " (a gap is open)" } else { "" }
            ))
        );
        consumed.insert(key.to_string(), json!({ "position": position, "epoch": epoch, "lag": lag, "known_head": live["known_head"] }));
    }
    text += &format!("dead letters: {dead}\n");
    let mut service = Value::Null;
    if let Some((st, health)) = live {
        match (st, health) {
            (Ok(st), Ok(health)) => {
                let connected = st["broker_connected"].as_bool().unwrap_or(false);
                text += &format!(
                    "service: {}, broker {}\n",
                    health["status"].as_str().unwrap_or("?"),
                    if connected {
                        "connected"
                    } else {
                        "NOT connected"
                    }
                );
                if health["status"] != "ok" {
                    attention.push(format!("service degraded: {}", health["reason"]));
                }
                if !connected {
                    attention.push(format!("broker not connected: {}", st["broker_error"]));
                }
                service = json!({ "health": health, "status": st });
            }
            (Err(e), _) | (_, Err(e)) => {
                return Err(e.context("asking the running service (--url)"))
            }
        }
    }
    for a in &attention {
        text += &format!("ATTENTION: {a}\n");
    }
    Ok(Answer {
        code: if attention.is_empty() { OK } else { ATTENTION },
        json: json!({
            "db": db.display().to_string(),
            "outbox": { "pending": backlog.events, "pending_bytes": backlog.bytes, "oldest_pending_at_ms": oldest, "streams": streams },
            "consumer": { "streams": consumed, "dead_letters": dead },
            "service": service,
            "attention": attention,
        }),
        text,
    })
}

/// `dead-letters list`.
pub fn dead_letters_list(db: &Path, after: i64, limit: u32) -> anyhow::Result<Answer> {
    let c = open_read_only(db)?;
    let rows = dead_letters::list(&c, after, limit)?;
    let mut text = String::new();
    for d in &rows {
        let stream = match (&d.source, &d.stream) {
            (Some(s), Some(t)) => format!("{s}/{t}"),
            _ => "-".into(),
        };
        let seq = d.seq.map_or("-".into(), |s| s.to_string());
        text += &format!(
            "{}\t{}\t{stream}\tseq {seq}\t{}\t{}\n",
            d.id,
            age(Some(d.received_at_ms)),
            printable(&d.topic),
            printable(&d.reason)
        );
    }
    if rows.is_empty() {
        text += "no dead letters\n";
    }
    Ok(Answer {
        code: OK,
        json: json!({ "dead_letters": rows }),
        text,
    })
}

/// `dead-letters show ID`.
pub fn dead_letters_show(db: &Path, id: i64) -> anyhow::Result<Answer> {
    let c = open_read_only(db)?;
    let Some(d) = dead_letters::get(&c, id)? else {
        return Ok(Answer {
            code: ATTENTION,
            json: json!({ "error": "not_found", "id": id }),
            text: format!("no dead letter {id}\n"),
        });
    };
    let text = format!(
        "id {}\nreceived {} ago\ntopic {}\nstream {}/{} seq {}\nreason {}\nbytes {}\n{}\n",
        d.id,
        age(Some(d.received_at_ms)),
        printable(&d.topic),
        d.source.as_deref().unwrap_or("-"),
        d.stream.as_deref().unwrap_or("-"),
        d.seq.map_or("-".into(), |s| s.to_string()),
        printable(&d.reason),
        d.payload_len,
        printable(d.payload.as_deref().unwrap_or(""))
    );
    Ok(Answer {
        code: OK,
        json: serde_json::to_value(&d)?,
        text,
    })
}

/// `outbox list`.
pub fn outbox_list(
    db: &Path,
    filter: RowFilter,
    stream: Option<&str>,
    after: i64,
    limit: u32,
) -> anyhow::Result<Answer> {
    let c = open_read_only(db)?;
    let rows = outbox::list(&c, filter, stream, after, limit, false)?;
    let mut text = String::new();
    for r in &rows {
        text += &format!(
            "{}\t{}\t{} #{}\t{}\t{}\n",
            r.id, r.status, r.stream, r.seq, r.event_type, r.event_id
        );
    }
    if rows.is_empty() {
        text += "no rows\n";
    }
    Ok(Answer {
        code: OK,
        json: json!({ "rows": rows }),
        text,
    })
}

/// A POST to the running service: its answer, with exit code 0 for 2xx, 1 for 4xx
/// (not done: the answer says why), 2 for anything else.
pub fn post(url: &str, path: &str, body: Option<Value>) -> anyhow::Result<Answer> {
    let req = ureq::post(&format!("{}{path}", url.trim_end_matches('/')))
        .timeout(Duration::from_secs(30));
    let res = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let (status, answer) = match res {
        Ok(r) => (r.status(), r.into_json::<Value>().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json::<Value>().unwrap_or(Value::Null)),
        Err(e) => anyhow::bail!("cannot reach the service at {url}: {e}"),
    };
    // A 404 for the route itself: --url names something else, or a service too old
    // to have the admin endpoints.
    let no_route = status == 404
        && answer["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("no such resource"));
    let code = match status {
        200..=299 => OK,
        _ if no_route => FAILED,
        400..=499 => ATTENTION,
        _ => FAILED,
    };
    let text = match answer["result"].as_str() {
        Some(result) if code == OK => format!("{result}\n"),
        _ => format!(
            "{status} {}: {}\n",
            answer["error"].as_str().unwrap_or("?"),
            answer["message"].as_str().unwrap_or("")
        ),
    };
    Ok(Answer {
        code,
        json: answer,
        text,
    })
}

fn get(url: &str, path: &str) -> anyhow::Result<Value> {
    let res = ureq::get(&format!("{}{path}", url.trim_end_matches('/')))
        .timeout(Duration::from_secs(10))
        .call();
    match res {
        Ok(r) => Ok(r.into_json()?),
        // /healthz answers 503 with a body that says why.
        Err(ureq::Error::Status(_, r)) => Ok(r.into_json()?),
        Err(e) => Err(anyhow::anyhow!("cannot reach the service at {url}: {e}")),
    }
}

/// A path in a percent-encoded query value.
pub fn query_value(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The database file a command reads.
#[derive(Debug, Clone, clap::Args)]
pub struct Db {
    /// The service's database (its --db), e.g. /var/lib/edge-outbox-user-service/user-service.db.
    #[arg(long, env = "DB_PATH")]
    pub db: PathBuf,
}

/// Which rows a listing shows.
#[derive(Debug, Clone, clap::Args)]
pub struct Page {
    /// Only rows with an id above this.
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// At most this many (1 to 10000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
}
