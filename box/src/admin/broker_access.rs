//! Who may talk to the box's broker: a username and password for each service and for
//! the read-only observer (`make watch`, `make demo`), and the topic ACL that lets each
//! service publish only on its own topics ([`edge_outbox::protocol::mosquitto_acl`]).
//!
//! Everything lives in one folder (`data/mqtt/` for `run-all`), created on first start:
//!
//! ```text
//! data/mqtt/                 0750 root:mosquitto (0700 when not root)
//!   user-service.password    0600  the service reads it (--mqtt-password-file)
//!   transaction-service.password
//!   edge-observer.password
//!   passwd                   0640 root:mosquitto  Mosquitto's password_file: salted hashes only
//!   acl                      0640 root:mosquitto  Mosquitto's acl_file
//! ```
//!
//! Passwords are 32 random hex digits from the OS. They never appear on a command line:
//! `passwd` is written as `user:password` lines to a temporary file, hashed there with
//! `mosquitto_passwd -U`, and only then renamed into place. When run as root, Mosquitto
//! drops to the `mosquitto` user, which may read `passwd` and `acl` through its group
//! but owns nothing here and can write nothing here: a compromised broker must not be
//! able to plant a link that root then follows. Password files are opened without
//! following links and must be regular files owned by the user who runs the box.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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
    edge_outbox::protocol::validate_prefix(topic_prefix)
        .map_err(|e| anyhow::anyhow!("invalid topic prefix: {e}"))?;
    let gid = broker_group();
    // The parents with the usual mode: the broker, which reads passwd and acl as its
    // own user, must be able to pass through them (a 0700 /etc/edge-outbox stopped
    // Mosquitto at start). Only the folder itself is closed.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    if gid.is_some() {
        // Every folder above must let the broker's user through.
        for ancestor in dir.ancestors().skip(1) {
            if let Ok(meta) = std::fs::metadata(ancestor) {
                if meta.permissions().mode() & 0o001 == 0 && meta.gid() != gid.unwrap_or(0) {
                    bail!(
                        "{} is not searchable by others (mode {:o}): the broker, which reads {} as its own user, could not reach it; make it 0755",
                        ancestor.display(),
                        meta.permissions().mode() & 0o7777,
                        dir.display()
                    );
                }
            }
        }
    }
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a folder (a link?): remove it", dir.display());
    }
    if let Some(gid) = gid {
        // Root, owner, and the broker's group to read (not write) what it needs.
        std::os::unix::fs::chown(dir, Some(0), Some(gid))
            .with_context(|| format!("giving {} to root:mosquitto", dir.display()))?;
    }
    let mode = if gid.is_some() { 0o750 } else { 0o700 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    let access = BrokerAccess {
        dir: dir.to_owned(),
    };
    let mut lines = String::new();
    for account in ACCOUNTS {
        let file = access.password_file(account);
        let password = match read_password(&file)? {
            Some(p) => p,
            None => {
                let p = random_password()?;
                write_private(&file, &format!("{p}\n"), None, |_| Ok(()))?;
                p
            }
        };
        lines.push_str(&format!("{account}:{password}\n"));
    }
    write_private(&access.passwd(), &lines, gid, |tmp| {
        let status = std::process::Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(tmp)
            .status()
            .context("running mosquitto_passwd (package mosquitto) to hash the password file")?;
        if !status.success() {
            bail!("mosquitto_passwd -U {} failed ({status})", tmp.display());
        }
        Ok(())
    })?;
    write_private(
        &access.acl(),
        &edge_outbox::protocol::mosquitto_acl(topic_prefix, &[OBSERVER]),
        gid,
        |_| Ok(()),
    )?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(access)
}

/// A password file's password: its one line without the newline, as the services read
/// it (`--mqtt-password-file`). None when the file does not exist. Refuses a link, a
/// file owned by someone else, an empty or multi-line one; makes it 0600.
fn read_password(path: &Path) -> anyhow::Result<Option<String>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "opening {} (it must be a regular file, not a link)",
                    path.display()
                )
            })
        }
    };
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != me || meta.len() > 1024 {
        bail!(
            "{} must be a regular file owned by uid {me}, at most 1024 bytes: remove it to get a new password",
            path.display()
        );
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() || line.contains(['\n', '\r', ':']) {
        bail!(
            "{} must hold one non-empty line without ':': remove it to get a new password",
            path.display()
        );
    }
    Ok(Some(line.to_owned()))
}

/// 32 hex digits (128 bits) from the OS's random source.
fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to a new temporary file next to `path` (mode 0600), lets `prepare`
/// change it (e.g. hash it), gives it to group `gid` with mode 0640 when there is one,
/// and renames it over `path`. The rename replaces a link at `path` rather than
/// following it. On failure the temporary file is removed.
fn write_private(
    path: &Path,
    text: &str,
    gid: Option<u32>,
    prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(f);
        prepare(&tmp)?;
        // prepare may have replaced the file: set owner and mode on what is there now,
        // through a descriptor that did not follow a link.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("opening {}", tmp.display()))?;
        if let Some(gid) = gid {
            std::os::unix::fs::fchown(&f, None, Some(gid))
                .with_context(|| format!("giving {} to the mosquitto group", tmp.display()))?;
        }
        let mode = if gid.is_some() { 0o640 } else { 0o600 };
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// As root, Mosquitto reads its files as the `mosquitto` user: the group of that user,
/// which may read the broker's files. None when not root or when there is no such user
/// (then Mosquitto runs as this user and reads them itself).
fn broker_group() -> Option<u32> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == "mosquitto")
            .then(|| fields[3].parse().ok())
            .flatten()
    })
}
