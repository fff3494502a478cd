//! Who may talk to the box's broker: a username and password for each service and for
//! the read-only observer (`make watch`, `make demo`), and the topic ACL that lets each
//! service publish only on its own topics ([`edge_outbox::protocol::mosquitto_acl`]).
//!
//! Everything lives in one folder (`data/mqtt/` for `run-all`), created on first start:
//!
//! ```text
//! data/mqtt/                 0700
//!   user-service.password    0600  the service reads it (--mqtt-password-file)
//!   transaction-service.password
//!   edge-observer.password
//!   passwd                   0600  Mosquitto's password_file: salted hashes only
//!   acl                      0600  Mosquitto's acl_file
//! ```
//!
//! Passwords are 32 random hex digits from the OS. They never appear on a command line:
//! `passwd` is written as `user:password` lines and hashed in place with
//! `mosquitto_passwd -U`. When run as root, Mosquitto drops to the `mosquitto` user, so
//! the folder, `passwd` and `acl` are handed to that user; the services' own password
//! files stay with the user who runs the services.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::contract::{TRANSACTION_SERVICE, USER_SERVICE};

/// The read-only user for watching the broker (`mosquitto_sub`).
pub const OBSERVER: &str = "edge-observer";

/// The accounts of the box: its two services and the observer.
pub const ACCOUNTS: [&str; 3] = [USER_SERVICE, TRANSACTION_SERVICE, OBSERVER];

/// The credentials folder of a box, once [`ensure`] has prepared it.
#[derive(Debug, Clone)]
pub struct BrokerAccess {
    /// The folder.
    pub dir: PathBuf,
}

impl BrokerAccess {
    /// The password file of `account` (one of [`ACCOUNTS`]).
    pub fn password_file(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.password"))
    }

    /// Mosquitto's `password_file`.
    pub fn passwd(&self) -> PathBuf {
        self.dir.join("passwd")
    }

    /// Mosquitto's `acl_file`.
    pub fn acl(&self) -> PathBuf {
        self.dir.join("acl")
    }

    /// The environment that makes a service connect as `account`.
    pub fn service_env(&self, account: &str) -> [(&'static str, PathBuf); 2] {
        [
            ("MQTT_USERNAME", PathBuf::from(account)),
            ("MQTT_PASSWORD_FILE", self.password_file(account)),
        ]
    }

    /// Lines for a Mosquitto config that refuse anonymous clients and apply the
    /// password file and the ACL.
    pub fn mosquitto_conf_lines(&self) -> String {
        format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n",
            self.passwd().display(),
            self.acl().display()
        )
    }
}

/// Prepares `dir`: creates a password for each account that has none, and writes the
/// broker's password file and the ACL for `topic_prefix` (again at every start, so that
/// they always match the password files). `mosquitto_passwd` comes from the
/// `mosquitto` package.
pub fn ensure(dir: &Path, topic_prefix: &str) -> anyhow::Result<BrokerAccess> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))?;
    let access = BrokerAccess {
        dir: dir.to_owned(),
    };
    let mut lines = String::new();
    for account in ACCOUNTS {
        let file = access.password_file(account);
        let password = match std::fs::read_to_string(&file) {
            Ok(p) if !p.trim().is_empty() => p.trim().to_owned(),
            Ok(_) => bail!(
                "{} is empty: delete it to get a new password",
                file.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let p = random_password()?;
                write_private(&file, &format!("{p}\n"))?;
                p
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        lines.push_str(&format!("{account}:{password}\n"));
    }
    write_private(&access.passwd(), &lines)?;
    let status = std::process::Command::new("mosquitto_passwd")
        .arg("-U")
        .arg(access.passwd())
        .status()
        .context("running mosquitto_passwd (package mosquitto) to hash the password file")?;
    if !status.success() {
        bail!(
            "mosquitto_passwd -U {} failed ({status})",
            access.passwd().display()
        );
    }
    write_private(
        &access.acl(),
        &edge_outbox::protocol::mosquitto_acl(topic_prefix, &[OBSERVER]),
    )?;
    hand_to_broker_user(&access)?;
    Ok(access)
}

/// 32 hex digits (128 bits) from the OS's random source.
fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to `path` with mode 0600, replacing what was there.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// As root, Mosquitto reads its files as the `mosquitto` user: give it the folder, the
/// password hashes and the ACL (not the services' password files).
fn hand_to_broker_user(access: &BrokerAccess) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let Some(uid) = user_id("mosquitto") else {
        return Ok(()); // no such user: Mosquitto then runs as root and reads them itself
    };
    for path in [access.dir.clone(), access.passwd(), access.acl()] {
        std::os::unix::fs::chown(&path, Some(uid), None)
            .with_context(|| format!("handing {} to the mosquitto user", path.display()))?;
    }
    Ok(())
}

/// The uid of `name` from /etc/passwd.
fn user_id(name: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}
