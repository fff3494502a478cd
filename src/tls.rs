//! TLS to the broker (`mqtts://`): rustls with the ring provider, the server's
//! certificate checked against a CA file (or the system's roots) and its name against
//! the broker URL's host, and an optional client certificate for mutual TLS.
//!
//! The provider is given to this client's config only; nothing process-wide is
//! installed, so an embedding program may use rustls with another provider.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Largest certificate or key file read, in bytes.
pub const PEM_FILE_MAX_BYTES: u64 = 1024 * 1024;

/// Why a TLS setting cannot be used; `flag` names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct TlsError {
    /// The flag at fault, without dashes.
    pub flag: &'static str,
    /// What is wrong, naming the file.
    pub reason: String,
}

fn err(flag: &'static str, path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError {
        flag,
        reason: format!("{}: {why}", path.display()),
    }
}

/// Builds the client config: trust `ca_file` (PEM, one or more certificates) or, when
/// None, the system's root certificates; present `client` = (certificate chain file,
/// private key file) when given.
pub fn client_config(
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = read_certs("mqtt-ca-file", path)?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(err("mqtt-ca-file", path, "holds no usable CA certificate"));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(TlsError {
                    flag: "mqtt-ca-file",
                    reason: "no --mqtt-ca-file given and no system root certificates found \
                             (package ca-certificates)"
                        .into(),
                });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            flag: "broker",
            reason: format!("TLS setup failed: {e}"),
        })?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let chain = read_certs("mqtt-cert-file", cert_file)?;
            let key = read_key(key_file)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                err(
                    "mqtt-key-file",
                    key_file,
                    format!("does not fit the certificate: {e}"),
                )
            })?
        }
    };
    Ok(Arc::new(config))
}

/// The PEM file's bytes, refusing a huge or unreadable one.
fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|e| err(flag, path, e))?;
    if !meta.is_file() || meta.len() > PEM_FILE_MAX_BYTES {
        return Err(err(
            flag,
            path,
            format!("must be a regular file of at most {PEM_FILE_MAX_BYTES} bytes"),
        ));
    }
    std::fs::read(path).map_err(|e| err(flag, path, e))
}

/// Every certificate in a PEM file; at least one.
fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(flag, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(flag, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            flag,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem("mqtt-key-file", path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| err("mqtt-key-file", path, format!("not a PEM key file: {e}")))?
        .ok_or_else(|| err("mqtt-key-file", path, "holds no PEM private key"))
}
