//! Pinning the control CA at enrollment (D3, P9): a raw rustls handshake over a std TcpStream
//! with a verifier that captures the presented chain `[leaf, CA]` and accepts it only if one
//! certificate's sha256 equals the token's `ca_fingerprint`. That certificate becomes the only
//! root of the ureq agent, so every later call verifies normally against the pinned CA.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom, WebPkiSupportedAlgorithms,
    verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::SigningKey;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("control url {url:?} has no usable host and port")]
    BadUrl { url: String },
    #[error("cannot connect to control at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tls handshake with {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
    #[error(
        "control at {addr} did not present the CA the enrollment token pins (ca_fingerprint {expected}); presented {presented:?}"
    )]
    NotPresented {
        addr: String,
        expected: String,
        presented: Vec<String>,
    },
}

/// `(host, port)` of an `https://` URL; IPv6 hosts keep no brackets.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => 443,
            None => return None,
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), port.parse().ok()?),
            None => (authority.to_string(), 443),
        }
    };
    if host.is_empty() {
        None
    } else {
        Some((host, port))
    }
}

/// The TLS the agent speaks with control (and with a standby's control, which is the same
/// code): control always presents certificates it made itself with rcgen's default key, ECDSA
/// P-256 (control/src/tls.rs), and serves rustls with ring, which offers TLS 1.3 with
/// AES-128-GCM and X25519. So the agent's provider holds only that: one TLS 1.3 suite, X25519
/// (P-256 as a fallback group) and ECDSA P-256 / SHA-256 signatures (plus Ed25519, whose code
/// is linked for release signatures anyway). RSA, P-384 and ChaCha20-Poly1305 stay out of the
/// static binary (docs/footprint.md). The external adapters (features `s3`, `weaviate`) talk
/// to arbitrary servers and use ring's full default provider instead.
pub fn ring_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, kx_group};
    Arc::new(CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
        signature_verification_algorithms: CONTROL_SIGNATURES,
        secure_random: &SystemRandomness,
        key_provider: &NoPrivateKeys,
    })
}

/// The signature algorithms of control's certificates and handshakes.
static CONTROL_SIGNATURES: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[webpki::ring::ECDSA_P256_SHA256, webpki::ring::ED25519],
    mapping: &[
        (
            SignatureScheme::ECDSA_NISTP256_SHA256,
            &[webpki::ring::ECDSA_P256_SHA256],
        ),
        (SignatureScheme::ED25519, &[webpki::ring::ED25519]),
    ],
};

/// Randomness for the handshakes: ring's system source (getrandom).
#[derive(Debug)]
struct SystemRandomness;

impl SecureRandom for SystemRandomness {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        use ring::rand::SecureRandom as _;
        ring::rand::SystemRandom::new()
            .fill(buf)
            .map_err(|_| GetRandomFailed)
    }
}

/// The agent presents no client certificate to control (it authenticates with its node
/// credential), so it loads no private keys.
#[derive(Debug)]
struct NoPrivateKeys;

impl KeyProvider for NoPrivateKeys {
    fn load_private_key(
        &self,
        _key_der: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        Err(rustls::Error::General(
            "the agent's control link uses no client certificate".into(),
        ))
    }
}

/// Accepts the handshake only if the pinned certificate is in the presented chain, and keeps
/// the chain for the caller.
#[derive(Debug)]
struct CapturingVerifier {
    pin: Vec<u8>,
    provider: Arc<CryptoProvider>,
    presented: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for CapturingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain: Vec<CertificateDer<'static>> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        let hit = chain
            .iter()
            .any(|c| Sha256::digest(c.as_ref()).as_slice() == self.pin.as_slice());
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        if hit {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects to `control_url`, and returns the DER of the presented certificate whose sha256
/// is `fingerprint_hex`.
pub fn fetch_pinned_ca(
    control_url: &str,
    fingerprint_hex: &str,
    timeout: Duration,
) -> Result<Vec<u8>, PinError> {
    let (host, port) = host_port(control_url).ok_or_else(|| PinError::BadUrl {
        url: control_url.to_string(),
    })?;
    let addr_text = format!("{host}:{port}");
    let pin = outpost_proto::hash::from_hex(fingerprint_hex).unwrap_or_default();
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|source| PinError::Connect {
            addr: addr_text.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| PinError::BadUrl {
            url: control_url.to_string(),
        })?;
    let mut tcp =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| PinError::Connect {
            addr: addr_text.clone(),
            source,
        })?;
    tcp.set_read_timeout(Some(timeout)).ok();
    tcp.set_write_timeout(Some(timeout)).ok();

    let provider = ring_provider();
    let presented = Arc::new(Mutex::new(Vec::new()));
    let verifier = CapturingVerifier {
        pin: pin.clone(),
        provider: provider.clone(),
        presented: presented.clone(),
    };
    let handshake_error = |reason: String| PinError::Handshake {
        addr: addr_text.clone(),
        reason,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| handshake_error(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let server_name =
        ServerName::try_from(host.clone()).map_err(|e| handshake_error(e.to_string()))?;
    let mut connection = ClientConnection::new(Arc::new(config), server_name)
        .map_err(|e| handshake_error(e.to_string()))?;
    let mut outcome = Ok(());
    while connection.is_handshaking() {
        if let Err(error) = connection.complete_io(&mut tcp) {
            outcome = Err(error);
            break;
        }
    }
    let chain = presented.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(ca) = chain
        .iter()
        .find(|c| Sha256::digest(c.as_ref()).as_slice() == pin.as_slice())
    {
        connection.send_close_notify();
        let _ = connection.complete_io(&mut tcp);
        return Ok(ca.as_ref().to_vec());
    }
    if chain.is_empty() {
        let reason = outcome
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no certificate presented".into());
        return Err(handshake_error(reason));
    }
    Err(PinError::NotPresented {
        addr: addr_text,
        expected: fingerprint_hex.to_string(),
        presented: chain
            .iter()
            .map(|c| crate::os::hex(&Sha256::digest(c.as_ref())))
            .collect(),
    })
}

/// PEM text of a DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                encoded.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or(""));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// DER of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.as_ref().to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_from_urls() {
        assert_eq!(
            host_port("https://127.0.0.1:7443"),
            Some(("127.0.0.1".into(), 7443))
        );
        assert_eq!(
            host_port("https://control.lan/api"),
            Some(("control.lan".into(), 443))
        );
        assert_eq!(
            host_port("https://[::1]:8443/x"),
            Some(("::1".into(), 8443))
        );
        assert_eq!(host_port("http://x:1"), None);
        assert_eq!(host_port("https://:1"), None);
        assert_eq!(host_port("https://x:notaport"), None);
    }

    #[test]
    fn pem_round_trips_any_length() {
        for len in [1usize, 2, 3, 4, 100, 1000] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            assert_eq!(pem_to_der(&der_to_pem(&der)), Some(der));
        }
    }

    #[test]
    fn closed_port_is_a_connect_error_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let error = fetch_pinned_ca(
            &format!("https://127.0.0.1:{port}"),
            &"ab".repeat(32),
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}")),
            "{error}"
        );
    }
}
