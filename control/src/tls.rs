//! The control's certificate authority and server certificates (rcgen), and the rustls server
//! configuration (ring provider only). The server presents `[leaf, CA]` so a node that knows
//! only the CA fingerprint can find and pin the CA.

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create the certificate authority: {0}")]
    CreateCa(rcgen::Error),
    #[error("cannot load the stored certificate authority: {0}")]
    LoadCa(String),
    #[error("cannot sign the server certificate for {names:?}: {source}")]
    SignServer {
        names: Vec<String>,
        source: rcgen::Error,
    },
    #[error("invalid subject alternative name {value:?}: {reason}")]
    InvalidName { value: String, reason: String },
    #[error("cannot build the tls server configuration: {0}")]
    Config(String),
}

/// The CA as persisted in the store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertificateAuthority {
    pub cert_pem: String,
    pub key_pem: String,
    /// sha256 of the CA certificate DER, lowercase hex.
    pub fingerprint: String,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Outpost control CA");
    name.push(DnType::OrganizationName, "Outpost");
    params.distinguished_name = name;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2074, 1, 1);
    params
}

/// Lowercase hex sha256 of DER bytes.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

impl CertificateAuthority {
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(TlsError::CreateCa)?;
        let cert = ca_params().self_signed(&key).map_err(TlsError::CreateCa)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            fingerprint: fingerprint(cert.der()),
        })
    }

    pub fn cert_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| TlsError::LoadCa(e.to_string()))
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, TlsError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| TlsError::LoadCa(e.to_string()))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(|e| TlsError::LoadCa(e.to_string()))
    }

    /// Signs a fresh server certificate for these DNS names and IP addresses.
    pub fn sign_server(&self, names: &[String]) -> Result<ServerIdentity, TlsError> {
        let issuer = self.issuer()?;
        let mut params = CertificateParams::default();
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(name.as_str().try_into().map_err(|e: rcgen::Error| {
                        TlsError::InvalidName {
                            value: name.clone(),
                            reason: e.to_string(),
                        }
                    })?)
                }
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params
            .distinguished_name
            .push(DnType::CommonName, "outpost-control");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2074, 1, 1);
        let key = KeyPair::generate().map_err(|source| TlsError::SignServer {
            names: names.to_vec(),
            source,
        })?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| TlsError::SignServer {
                names: names.to_vec(),
                source,
            })?;
        Ok(ServerIdentity {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            ca_der: self.cert_der()?.to_vec(),
        })
    }
}

/// A signed server certificate with its key and the CA that signed it.
pub struct ServerIdentity {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

/// Installs the ring provider as the process default (idempotent).
pub fn install_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// rustls server configuration presenting `[leaf, CA]`.
pub fn server_config(identity: &ServerIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![
        CertificateDer::from(identity.cert_der.clone()),
        CertificateDer::from(identity.ca_der.clone()),
    ];
    let key = PrivateKeyDer::try_from(identity.key_der.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The names a server certificate covers: loopback, the listen IP when specific, the public
/// URL's host and every extra name.
pub fn server_names(listen_ip: IpAddr, public_host: Option<&str>, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen_ip.is_unspecified() {
        names.push(listen_ip.to_string());
    }
    if let Some(host) = public_host {
        names.push(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        );
    }
    names.extend(extra.iter().cloned());
    let mut unique = Vec::new();
    for name in names {
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    #[test]
    fn a_reloaded_ca_signs_leaves_the_original_ca_verifies() {
        let ca = CertificateAuthority::generate().unwrap();
        let reloaded: CertificateAuthority =
            serde_json::from_str(&serde_json::to_string(&ca).unwrap()).unwrap();
        let leaf = reloaded
            .sign_server(&server_names(
                "10.0.0.5".parse().unwrap(),
                Some("control.lan"),
                &[],
            ))
            .unwrap();
        assert_eq!(fingerprint(&leaf.ca_der), ca.fingerprint);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().unwrap()).unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        for name in ["localhost", "127.0.0.1", "10.0.0.5", "control.lan"] {
            let checked = verifier.verify_server_cert(
                &CertificateDer::from(leaf.cert_der.clone()),
                &[],
                &ServerName::try_from(name).unwrap(),
                &[],
                UnixTime::now(),
            );
            assert!(checked.is_ok(), "{name}: {checked:?}");
        }
        assert!(server_config(&leaf).is_ok());
    }

    #[test]
    fn unspecified_listen_ip_is_not_a_name() {
        let names = server_names(
            "0.0.0.0".parse().unwrap(),
            None,
            &["edge.example".to_string()],
        );
        assert_eq!(names, vec!["localhost", "127.0.0.1", "::1", "edge.example"]);
    }
}
