//! Environment-profile reconcilers (SPEC S1–S4, C1–C10): storage → broker → index behind three
//! ports, with default adapters that need nothing external and optional S3/MinIO, RabbitMQ and
//! Weaviate adapters behind the cargo features `s3`, `amqp` and `weaviate`.
//!
//! # How the agent uses this module
//! - After each plan/profile apply: [`AdapterConfig::from_environment`] → [`build_adapters`] →
//!   [`Engine::reconcile`] with [`UnchangedPolicy::Skip`]; at boot and periodically with
//!   [`UnchangedPolicy::VerifyActual`] (repairs drift such as a queue deleted by hand, or an
//!   AMQP binding removed by hand: bindings AMQP cannot list are re-bound on every verify). Start
//!   services only when [`ReconcileReport::services_may_start`] is true (C1: services come last).
//! - Bootstrap events go to a caller-provided [`BootstrapSink`] (the agent's bounded outbox sends
//!   them to `POST /v1/bootstrap/events`) and are published on the bus exchange
//!   [`BOOTSTRAP_EXCHANGE`] with routing key `overlay.bootstrap.{start|ok|error}`.
//! - The last apply per component is persisted at `DATA_DIR/profile-status.json`
//!   ([`ApplyStatus::read`]); `/internal/bootstrap/status` and `outpost-agent status` show it,
//!   and [`ApplyStatus::to_bootstrap_status`] gives the B1 shape.
//! - `outpost-agent reconcile [--dry-run] [--profile FILE] [--ack-destructive HASH]` is
//!   [`run_reconcile_command`]. Without `--profile` it reads `DATA_DIR/profile.json`, the cached
//!   EnvironmentProfile (JSON) the agent writes atomically whenever it fetches one. The node id
//!   comes from `--node-id`, `OUTPOST_NODE_ID` or `DATA_DIR/node_id`. With the default
//!   in-process bus the command applies to its own process's bus, so it is mostly useful for
//!   dry runs, storage, and external adapters.
//! - Lifecycle expiry of the default storage runs at every storage apply (the agent should run a
//!   [`UnchangedPolicy::VerifyActual`] reconcile periodically, e.g. hourly).
//!
//! # Adapter choice (C5), from the environment
//! - storage: `MINIO_ENDPOINT` (+ `MINIO_ACCESS_KEY`, `MINIO_SECRET_KEY`, optional
//!   `MINIO_REGION`, default `us-east-1`) → S3; otherwise directories under `DATA_DIR/storage`.
//! - broker: `AMQP_URL` (`amqp://user:pass@host:port/vhost`) → RabbitMQ; otherwise in-process.
//! - index: `WEAVIATE_URL` → Weaviate; otherwise in-memory.
//! - `OUTPOST_PROFILE_COMPONENTS=storage,broker,index` limits what this node applies (S2).
//!
//! # How services find their buckets (S4)
//! [`bucket_environment`] gives the variables the plan passes to allocations, per bucket NAME
//! (upper-cased, `-` and `.` become `_`): `OUTPOST_BUCKET_<NAME>_PATH` (the directory, default
//! storage) or `OUTPOST_BUCKET_<NAME>_ENDPOINT` + `OUTPOST_BUCKET_<NAME>_NAME` (S3), and
//! `OUTPOST_BUCKET_<NAME>_ADAPTER` (`filesystem` or `s3`).
//!
//! [`service_environment`] gives each service its own modules, migrations and parameters
//! (`OUTPOST_MODULES`, `OUTPOST_MIGRATIONS`, `OUTPOST_PARAM_<KEY>`): services bootstrap only
//! themselves and never create cluster-wide resources.
//!
//! # Logs
//! One log event per port call (the agent's `tracing` lines, logging.rs), with the fields
//! `component action target attempt idempotent generation duration_ms [idempotency_key]
//! status=ok|retry|error|withheld` and the error as its message, where `idempotent=true` means the call changed nothing (a
//! read), `generation` is the first 16 hex digits of the component generation, and
//! `idempotency_key` is the full key of a mutation. Every mutation carries the idempotency key
//! `sha256(node_id + component + generation + sha256(step))` on its log line, and on the wire
//! where the protocol has a place for it: S3 header and object metadata, Weaviate header, fs
//! metadata, AMQP publishes as `message_id`. AMQP declares and binds (`exchange.declare`,
//! `queue.declare`, `queue.bind`) carry none: their only free-form field is the argument table,
//! which is the exchange's, queue's or binding's own configuration (an extra entry would make
//! a redeclare fail with 406 PRECONDITION_FAILED, or make a different binding each
//! generation). They are idempotent by protocol instead, and their key is on the log line.
//!
//! # Safety (C7)
//! Nothing is deleted, renamed, purged or retyped on the default path: destructive steps are
//! withheld and reported (drift, needs migration). A destructive apply needs
//! `allow_destructive: true` in the profile AND `--ack-destructive` equal to the dry-run diff
//! hash, which changes whenever the diff does.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod command;
pub mod config;
pub mod diff;
pub mod engine;
pub mod fs_storage;
pub mod memory_bus;
pub mod memory_index;
pub mod ports;

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "weaviate")]
pub mod weaviate;
#[cfg(any(feature = "s3", test))]
pub mod xml;

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod engine_tests;
#[cfg(test)]
pub mod weaviate_fake;

use std::collections::BTreeMap;

use outpost_proto::profile::EnvironmentProfile;

pub use command::run_reconcile_command;
pub use config::{
    AdapterConfig, BusAdapterConfig, ConfigError, IndexAdapterConfig, StorageAdapterConfig,
};
pub use diff::{Component, DestructivePolicy, Safety, Step};
pub use engine::{
    Adapters, ApplyStatus, BOOTSTRAP_EXCHANGE, BootstrapSink, CollectingSink, ComponentApply,
    Engine, Outcome, ReconcileError, ReconcileReport, ReconcileRequest, RetryPolicy, RunMode,
    UnchangedPolicy,
};
pub use fs_storage::FsObjectStorage;
pub use memory_bus::InProcessBus;
pub use memory_index::InMemoryIndex;
pub use ports::{AdapterIdentity, AdapterKind, EventBus, ObjectStorage, PortError, VectorIndex};

/// The order the caller follows: these components, then services (C1).
pub const RECONCILE_ORDER: [Component; 3] = Component::ORDER;

/// Builds the adapters `config` names. External adapters connect lazily, on first use, so a
/// broker that is down fails the broker component (with retries), not the agent.
pub fn build_adapters(config: &AdapterConfig) -> Result<Adapters, PortError> {
    let local = FsObjectStorage::new(config.local_storage_root.clone());
    let (storage, fall_forward_from): (Box<dyn ObjectStorage>, Option<FsObjectStorage>) =
        match &config.storage {
            StorageAdapterConfig::Filesystem { root } => {
                (Box::new(FsObjectStorage::new(root.clone())), None)
            }
            #[cfg(feature = "s3")]
            StorageAdapterConfig::S3 {
                endpoint,
                access_key,
                secret_key,
                region,
            } => (
                Box::new(s3::S3ObjectStorage::new(
                    endpoint, access_key, secret_key, region,
                )?),
                Some(local),
            ),
            #[cfg(not(feature = "s3"))]
            StorageAdapterConfig::S3 { endpoint, .. } => {
                return Err(PortError::Unsupported {
                    operation: "build adapters",
                    target: endpoint.clone(),
                    adapter: "s3",
                    message: "built without the s3 feature".into(),
                });
            }
        };
    let bus: Box<dyn EventBus> = match &config.bus {
        BusAdapterConfig::InProcess => Box::new(InProcessBus::new()),
        #[cfg(feature = "amqp")]
        BusAdapterConfig::Amqp { url } => Box::new(amqp::RabbitMqBus::new(url)?),
        #[cfg(not(feature = "amqp"))]
        BusAdapterConfig::Amqp { url } => {
            return Err(PortError::Unsupported {
                operation: "build adapters",
                target: config::redact_url(url),
                adapter: "amqp",
                message: "built without the amqp feature".into(),
            });
        }
    };
    let index: Box<dyn VectorIndex> = match &config.index {
        IndexAdapterConfig::InMemory => Box::new(InMemoryIndex::new()),
        #[cfg(feature = "weaviate")]
        IndexAdapterConfig::Weaviate { url } => Box::new(weaviate::WeaviateIndex::new(url)),
        #[cfg(not(feature = "weaviate"))]
        IndexAdapterConfig::Weaviate { url } => {
            return Err(PortError::Unsupported {
                operation: "build adapters",
                target: url.clone(),
                adapter: "weaviate",
                message: "built without the weaviate feature".into(),
            });
        }
    };
    #[cfg(not(feature = "s3"))]
    let _ = local;
    Ok(Adapters {
        storage,
        bus,
        index,
        fall_forward_from,
    })
}

/// The environment variable stem for a bucket: `OUTPOST_BUCKET_<NAME>`.
pub fn bucket_variable_stem(bucket: &str) -> String {
    let name: String = bucket
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("OUTPOST_BUCKET_{name}")
}

/// The variables that tell a service where each profile bucket is (see the module docs).
pub fn bucket_environment(
    profile: &EnvironmentProfile,
    config: &AdapterConfig,
) -> BTreeMap<String, String> {
    let mut environment = BTreeMap::new();
    for bucket in &profile.spec.storage.buckets {
        let stem = bucket_variable_stem(&bucket.name);
        match &config.storage {
            StorageAdapterConfig::Filesystem { root } => {
                environment.insert(format!("{stem}_ADAPTER"), "filesystem".into());
                environment.insert(
                    format!("{stem}_PATH"),
                    root.join(bucket.name.as_str()).display().to_string(),
                );
            }
            StorageAdapterConfig::S3 { endpoint, .. } => {
                environment.insert(format!("{stem}_ADAPTER"), "s3".into());
                environment.insert(format!("{stem}_ENDPOINT"), endpoint.clone());
                environment.insert(format!("{stem}_NAME"), bucket.name.to_string());
            }
        }
    }
    environment
}

/// The self-scoped bootstrap a service gets from the profile (S4), as environment variables the
/// plan passes to its allocations: `OUTPOST_MODULES` and `OUTPOST_MIGRATIONS` (comma-separated,
/// in profile order) and `OUTPOST_PARAM_<KEY>` per parameter (key upper-cased, other characters
/// than letters and digits become `_`). Empty when the profile names nothing for the service.
pub fn service_environment(
    profile: &EnvironmentProfile,
    service: &str,
) -> BTreeMap<String, String> {
    let mut environment = BTreeMap::new();
    let Some(modules) = profile
        .spec
        .services
        .iter()
        .find(|entry| entry.service == service)
    else {
        return environment;
    };
    environment.insert("OUTPOST_MODULES".into(), modules.modules.join(","));
    environment.insert("OUTPOST_MIGRATIONS".into(), modules.migrations.join(","));
    for (key, value) in &modules.parameters {
        let key: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        environment.insert(format!("OUTPOST_PARAM_{key}"), value.clone());
    }
    environment
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_variables_name_the_directory() {
        let profile: EnvironmentProfile = serde_json::from_str(
            r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile","spec":{"storage":{"buckets":[{"name":"media-v2.raw"}]}}}"#,
        )
        .unwrap();
        let config =
            AdapterConfig::from_environment(&BTreeMap::new(), std::path::Path::new("/data"))
                .unwrap();
        let environment = bucket_environment(&profile, &config);
        assert_eq!(
            environment["OUTPOST_BUCKET_MEDIA_V2_RAW_PATH"],
            "/data/storage/media-v2.raw"
        );
        assert_eq!(
            environment["OUTPOST_BUCKET_MEDIA_V2_RAW_ADAPTER"],
            "filesystem"
        );
    }

    #[test]
    fn services_get_their_modules_migrations_and_parameters() {
        let profile: EnvironmentProfile = serde_json::from_str(
            r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile","spec":{"services":[
              {"service":"api","modules":["auth","search"],"migrations":["001_init","002_users"],
               "parameters":{"pool.size":"8"}}]}}"#,
        )
        .unwrap();
        let environment = service_environment(&profile, "api");
        assert_eq!(environment["OUTPOST_MODULES"], "auth,search");
        assert_eq!(environment["OUTPOST_MIGRATIONS"], "001_init,002_users");
        assert_eq!(environment["OUTPOST_PARAM_POOL_SIZE"], "8");
        assert!(service_environment(&profile, "web").is_empty());
    }
}
