//! The certificates of terminating routes (E2): each route's `tls_secret` arrives sealed for
//! this edge's X25519 key (as a secret reaches a node) and is opened here, in memory only — the
//! cache keeps the sealed form, never the plaintext key. A secret is opened again only when its
//! version or ciphertext changed; one that does not open or parse is reported by name and its
//! route's TLS connections are closed, while every other route serves on.

use std::collections::HashMap;
use std::sync::Arc;

use outpost_proto::route::{EdgeTlsSecret, EdgeTlsTable, RouteSpec, TlsMode};
use outpost_proto::secret::open_for_node;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// This edge's sealing identity: its id (bound into every seal) and X25519 private key.
#[derive(Clone)]
pub struct EdgeKey {
    pub edge_id: String,
    pub private_key: [u8; 32],
}

impl std::fmt::Debug for EdgeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeKey")
            .field("edge_id", &self.edge_id)
            .finish_non_exhaustive()
    }
}

/// One opened secret: what it was opened from, and the TLS server config it makes.
struct Opened {
    version: u32,
    ciphertext: String,
    config: Arc<ServerConfig>,
}

/// The opened certificates by secret name, and what could not be opened.
#[derive(Default)]
pub struct Certificates {
    by_secret: HashMap<String, Arc<Opened>>,
    pub problems: Vec<String>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("secrets", &self.by_secret.keys().collect::<Vec<_>>())
            .field("problems", &self.problems)
            .finish()
    }
}

impl Certificates {
    /// Opens what the terminating routes of `routes` need from `table`, reusing `previous`
    /// for secrets that did not change.
    pub fn open<'a>(
        routes: impl IntoIterator<Item = &'a RouteSpec>,
        table: &EdgeTlsTable,
        key: Option<&EdgeKey>,
        previous: &Certificates,
    ) -> Certificates {
        let mut opened = Certificates::default();
        for route in routes {
            let (TlsMode::Terminate, Some(name)) = (route.tls, &route.tls_secret) else {
                continue;
            };
            if opened.by_secret.contains_key(name.as_str()) {
                continue;
            }
            let Some(sealed) = table.get(name) else {
                opened.problems.push(format!(
                    "route {}: tls_secret {name} has not reached this edge (does the secret exist in the route's org?)",
                    route.name
                ));
                continue;
            };
            if let Some(earlier) = previous.by_secret.get(name.as_str())
                && earlier.version == sealed.version
                && earlier.ciphertext == sealed.sealed.ciphertext
            {
                opened
                    .by_secret
                    .insert(name.to_string(), Arc::clone(earlier));
                continue;
            }
            let Some(key) = key else {
                opened.problems.push(format!(
                    "route {}: tls_secret {name} cannot be opened: this edge has no sealing key yet",
                    route.name
                ));
                continue;
            };
            match open_secret(key, sealed) {
                Ok(config) => {
                    opened.by_secret.insert(
                        name.to_string(),
                        Arc::new(Opened {
                            version: sealed.version,
                            ciphertext: sealed.sealed.ciphertext.clone(),
                            config,
                        }),
                    );
                }
                Err(reason) => opened
                    .problems
                    .push(format!("route {}: tls_secret {name}: {reason}", route.name)),
            }
        }
        opened
    }

    /// The server config of a terminating route's secret.
    pub fn config(&self, secret: &str) -> Option<Arc<ServerConfig>> {
        self.by_secret.get(secret).map(|o| Arc::clone(&o.config))
    }
}

/// Opens one sealed secret and builds its server config. Errors name the secret's key and
/// version, never a value.
pub fn open_secret(key: &EdgeKey, sealed: &EdgeTlsSecret) -> Result<Arc<ServerConfig>, String> {
    let values = open_for_node(
        &key.private_key,
        &key.edge_id,
        &sealed.name,
        sealed.version,
        &sealed.sealed,
    )
    .map_err(|e| e.to_string())?;
    let version = sealed.version;
    let (Some(cert), Some(private)) = (values.get("cert"), values.get("key")) else {
        return Err(format!(
            "version {version} lacks key cert or key (it has: {})",
            values.keys().join(", ")
        ));
    };
    server_config(cert.as_bytes(), private.as_bytes())
        .map_err(|reason| format!("version {version}: {reason}"))
}

/// A TLS server config (HTTP/1.1 over ALPN) from PEM text.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &*cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("cert holds no PEM CERTIFICATE block".into());
    }
    let private: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &*key_pem)
        .map_err(|_| "key is not a PEM private key".to_string())?
        .ok_or_else(|| "key holds no PEM private key block".to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| format!("cert and key do not make a TLS identity: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::secret::{SecretValues, seal_for_node, sealing_public_key};
    use std::collections::BTreeMap;

    fn route(secret: &str) -> RouteSpec {
        serde_json::from_value(serde_json::json!({
            "name": "shop", "hosts": ["shop.test"], "service": "web", "port": "http",
            "tls": "terminate", "tls_secret": secret
        }))
        .unwrap()
    }

    fn sealed_table(key: &EdgeKey, values: &[(&str, String)]) -> EdgeTlsTable {
        let values = SecretValues(
            values
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        );
        let sealed = seal_for_node(
            &sealing_public_key(&key.private_key),
            &key.edge_id,
            "shop-tls",
            1,
            &values,
            [3; 32],
            [4; 24],
        );
        EdgeTlsTable {
            digest: "d".into(),
            secrets: vec![EdgeTlsSecret {
                name: "shop-tls".try_into().unwrap(),
                version: 1,
                sealed,
            }],
        }
    }

    #[test]
    fn a_sealed_secret_opens_for_its_edge_only_and_bad_ones_are_named() {
        let key = EdgeKey {
            edge_id: "e1".into(),
            private_key: [7; 32],
        };
        let certified = rcgen::generate_simple_self_signed(vec!["shop.test".into()]).unwrap();
        let table = sealed_table(
            &key,
            &[
                ("cert", certified.cert.pem()),
                ("key", certified.signing_key.serialize_pem()),
            ],
        );
        let routes = [route("shop-tls")];
        let opened = Certificates::open(&routes, &table, Some(&key), &Certificates::default());
        assert!(opened.problems.is_empty(), "{:?}", opened.problems);
        assert!(opened.config("shop-tls").is_some());
        // Unchanged: reused, not opened again (a wrong key would fail to open).
        let stranger = EdgeKey {
            edge_id: "e1".into(),
            private_key: [8; 32],
        };
        let reused = Certificates::open(&routes, &table, Some(&stranger), &opened);
        assert!(reused.config("shop-tls").is_some());
        // Another edge's key does not open it.
        let refused =
            Certificates::open(&routes, &table, Some(&stranger), &Certificates::default());
        assert!(refused.config("shop-tls").is_none());
        assert!(
            refused.problems[0].contains("shop-tls"),
            "{:?}",
            refused.problems
        );
        // Without cert: named, and the key's value is not in the message.
        let secret_text = certified.signing_key.serialize_pem();
        let no_cert = sealed_table(&key, &[("key", secret_text.clone())]);
        let opened = Certificates::open(&routes, &no_cert, Some(&key), &Certificates::default());
        assert!(
            opened.problems[0].contains("lacks key cert or key"),
            "{:?}",
            opened.problems
        );
        assert!(!opened.problems[0].contains(&secret_text));
        // Not delivered at all.
        let missing = Certificates::open(
            &[route("other")],
            &table,
            Some(&key),
            &Certificates::default(),
        );
        assert!(missing.problems[0].contains("tls_secret other has not reached"));
    }
}
