//! TLS secrets for edges (E2, P11): the `tls_secret` of every terminating route of an org,
//! opened with the master key and sealed for the edge's own X25519 key, exactly as a secret is
//! sealed for a node. Only secrets a route references go out, and only their `cert` and `key`;
//! a secret no route references any more leaves the edge's table at its next answer. Sealing
//! happens on demand: the edge sends the digest it holds, and control seals again only when
//! the digest of (edge key, names, versions) differs.

use std::collections::BTreeMap;
use std::sync::Arc;

use outpost_proto::route::{EdgeTlsSecret, EdgeTlsTable, TLS_SECRET_KEYS, TlsMode};
use outpost_proto::secret::{SecretValues, key_from_hex, seal_for_node};

use crate::api::error::ApiError;
use crate::app::{Control, blocking};
use crate::secret::at_rest::{WrappedDataKey, data_key_record, open_version};
use crate::secret::delivery::random;
use crate::secret::views::SecretRecord;

/// The edge's TLS table, or `None` when the edge already holds `held` (its digest).
pub async fn edge_tls_table(
    control: &Control,
    org: &str,
    edge_id: &str,
    held: Option<&str>,
) -> Result<Option<EdgeTlsTable>, ApiError> {
    let (public_key, wanted) = {
        let views = control.projector.views();
        let public_key = views
            .routes
            .edges
            .get(edge_id)
            .and_then(|edge| edge.sealing_public_key.clone());
        let mut wanted: BTreeMap<String, SecretRecord> = BTreeMap::new();
        for route in views.routes.of_org(org) {
            if route.spec.tls != TlsMode::Terminate {
                continue;
            }
            if let Some(name) = &route.spec.tls_secret
                && let Some(record) = views.secrets.get(org, name)
            {
                wanted.insert(name.to_string(), record.clone());
            }
        }
        (public_key, wanted)
    };
    let digest = EdgeTlsTable::digest_of(
        public_key.as_deref().unwrap_or("no-key"),
        wanted
            .iter()
            .map(|(name, record)| (name.as_str(), record.version)),
    );
    if held == Some(digest.as_str()) {
        return Ok(None);
    }
    let Some(public_key) = public_key else {
        if !wanted.is_empty() {
            tracing::warn!(
                "edge {edge_id} registered without a sealing key (an older outpost-edge); its terminating routes get no certificate"
            );
        }
        return Ok(Some(EdgeTlsTable {
            digest,
            secrets: Vec::new(),
        }));
    };
    let Ok(edge_key) = key_from_hex("edge sealing key", &public_key) else {
        tracing::error!("edge {edge_id} has a malformed sealing key; no TLS secret sealed for it");
        return Ok(Some(EdgeTlsTable {
            digest,
            secrets: Vec::new(),
        }));
    };
    let store = Arc::clone(&control.store);
    let keys: Vec<(String, String, u32)> = wanted
        .values()
        .map(|record| (record.org.clone(), record.name.clone(), record.version))
        .collect();
    let wrapped: BTreeMap<String, Option<WrappedDataKey>> = blocking(move || {
        keys.into_iter()
            .map(|(org, name, version)| {
                let bytes = store.get_config(&data_key_record(&org, &name, version))?;
                Ok((name, bytes.and_then(|b| serde_json::from_slice(&b).ok())))
            })
            .collect()
    })
    .await?;
    let mut secrets = Vec::new();
    for (name, record) in &wanted {
        let Some(Some(data_key)) = wrapped.get(name) else {
            tracing::error!(
                "secret {org}/{name} version {} has no data key in the store; not sealed for edge {edge_id}",
                record.version
            );
            continue;
        };
        let values = match open_version(
            &control.settings.master_keys,
            org,
            name,
            record.version,
            &record.sealed,
            data_key,
        ) {
            Ok(values) => values,
            Err(error) => {
                tracing::error!("{error}; not sealed for edge {edge_id}");
                continue;
            }
        };
        // Only what terminating TLS needs leaves control.
        let tls_only = SecretValues(
            values
                .0
                .into_iter()
                .filter(|(key, _)| TLS_SECRET_KEYS.contains(&key.as_str()))
                .collect(),
        );
        let Ok(secret_name) = outpost_proto::Name::try_from(name.as_str()) else {
            continue;
        };
        let sealed = seal_for_node(
            &edge_key,
            edge_id,
            name,
            record.version,
            &tls_only,
            random::<32>(),
            random::<24>(),
        );
        secrets.push(EdgeTlsSecret {
            name: secret_name,
            version: record.version,
            sealed,
        });
    }
    Ok(Some(EdgeTlsTable { digest, secrets }))
}
