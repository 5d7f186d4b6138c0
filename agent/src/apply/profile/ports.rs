//! The three ports the reconcilers drive (C5): object storage, event bus and vector index, plus
//! the observations they return and the error every adapter speaks.

use std::collections::BTreeMap;

use outpost_proto::profile::{
    BindingSpec, ExchangeSpec, IndexClassSpec, LifecycleRule, PropertySpec, QueueSpec,
};
use serde::{Deserialize, Serialize};

/// The idempotency key carried by one mutation or publish (C8):
/// `sha256(node_id + component + generation + desired_hash)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyKey(pub String);

impl IdempotencyKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which adapter stands behind a port, and where it points; part of every component generation,
/// so a new external adapter (fall forward) makes the component apply again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterIdentity {
    pub kind: AdapterKind,
    /// Directory, endpoint URL or "in-process"; never a secret.
    pub location: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    Filesystem,
    S3,
    InProcess,
    RabbitMq,
    InMemory,
    Weaviate,
}

impl AdapterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterKind::Filesystem => "filesystem",
            AdapterKind::S3 => "s3",
            AdapterKind::InProcess => "in-process",
            AdapterKind::RabbitMq => "rabbitmq",
            AdapterKind::InMemory => "in-memory",
            AdapterKind::Weaviate => "weaviate",
        }
    }

    /// True for adapters that need nothing outside the agent.
    pub fn is_default(self) -> bool {
        matches!(
            self,
            AdapterKind::Filesystem | AdapterKind::InProcess | AdapterKind::InMemory
        )
    }
}

/// Why a port call failed. `Transient` errors are retried with backoff; the others are not.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("{operation} on {target} failed, may succeed later: {message}")]
    Transient {
        operation: &'static str,
        target: String,
        message: String,
    },
    #[error("{operation} on {target} was refused: {message}")]
    Refused {
        operation: &'static str,
        target: String,
        message: String,
    },
    #[error("{operation} on {target} is not supported by the {adapter} adapter: {message}")]
    Unsupported {
        operation: &'static str,
        target: String,
        adapter: &'static str,
        message: String,
    },
    #[error("{operation} on {target} got an answer it cannot read: {message}")]
    BadAnswer {
        operation: &'static str,
        target: String,
        message: String,
    },
}

impl PortError {
    pub fn is_transient(&self) -> bool {
        matches!(self, PortError::Transient { .. })
    }

    pub fn transient(
        operation: &'static str,
        target: impl Into<String>,
        message: impl ToString,
    ) -> Self {
        PortError::Transient {
            operation,
            target: target.into(),
            message: message.to_string(),
        }
    }

    pub fn refused(
        operation: &'static str,
        target: impl Into<String>,
        message: impl ToString,
    ) -> Self {
        PortError::Refused {
            operation,
            target: target.into(),
            message: message.to_string(),
        }
    }

    pub fn bad_answer(
        operation: &'static str,
        target: impl Into<String>,
        message: impl ToString,
    ) -> Self {
        PortError::BadAnswer {
            operation,
            target: target.into(),
            message: message.to_string(),
        }
    }
}

/// Maps local file-system errors: missing space or permissions will not fix themselves quickly,
/// but an interrupted write may; both are reported with the path.
pub fn io_error(
    operation: &'static str,
    target: &std::path::Path,
    error: std::io::Error,
) -> PortError {
    match error.kind() {
        std::io::ErrorKind::Interrupted
        | std::io::ErrorKind::WouldBlock
        | std::io::ErrorKind::TimedOut => {
            PortError::transient(operation, target.display().to_string(), error)
        }
        _ => PortError::refused(operation, target.display().to_string(), error),
    }
}

// ---------------------------------------------------------------------------------------------
// Object storage (C2)

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersioningState {
    #[default]
    Unversioned,
    Enabled,
    Suspended,
}

/// A lifecycle rule as found on a bucket. Rules Outpost did not write may have shapes it does not
/// model (transitions, tag filters): then `expire_days` is `None` and the rule is kept untouched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedLifecycleRule {
    pub id: String,
    pub prefix: Option<String>,
    pub expire_days: Option<u32>,
}

impl From<&LifecycleRule> for ObservedLifecycleRule {
    fn from(rule: &LifecycleRule) -> Self {
        Self {
            id: rule.id.clone(),
            prefix: Some(rule.prefix.clone()),
            expire_days: Some(rule.expire_days),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BucketState {
    pub versioning: VersioningState,
    pub lifecycle: Vec<ObservedLifecycleRule>,
    pub tags: BTreeMap<String, String>,
}

/// Whether a versioning change may leave the bucket unversioned-like (suspend) or only enable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersioningChange {
    Enable,
    Suspend,
}

pub trait ObjectStorage: Send {
    fn identity(&self) -> AdapterIdentity;
    /// `None` when the bucket does not exist.
    fn read_bucket(&mut self, bucket: &str) -> Result<Option<BucketState>, PortError>;
    /// Creates the bucket; an existing bucket this node owns is success.
    fn create_bucket(&mut self, bucket: &str, key: &IdempotencyKey) -> Result<(), PortError>;
    fn set_versioning(
        &mut self,
        bucket: &str,
        change: VersioningChange,
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    /// Merges by rule id: rules with these ids are written, every other rule is kept.
    fn merge_lifecycle_rules(
        &mut self,
        bucket: &str,
        rules: &[LifecycleRule],
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    /// Merges by key: these tags are written, every other tag is kept.
    fn merge_tags(
        &mut self,
        bucket: &str,
        tags: &BTreeMap<String, String>,
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    fn put_object(
        &mut self,
        bucket: &str,
        object: &str,
        bytes: &[u8],
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    /// The current version of an object; `None` when absent.
    fn get_object(&mut self, bucket: &str, object: &str) -> Result<Option<Vec<u8>>, PortError>;
    /// Keys of the current objects, sorted.
    fn list_objects(&mut self, bucket: &str) -> Result<Vec<String>, PortError>;
    /// Applies lifecycle expiry at `now`, for stores that do not do it themselves; returns how
    /// many objects expired. S3 servers expire on their own, so the default does nothing.
    fn expire_objects(&mut self, _now: std::time::SystemTime) -> Result<usize, PortError> {
        Ok(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Event bus (C3)

/// What declaring an exchange or queue with the desired shape would find.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum DeclareCheck {
    Missing,
    Matches,
    /// Exists with another shape; redeclaring would fail (AMQP 406 PRECONDITION_FAILED).
    Differs(String),
}

/// Whether a binding exists. AMQP 0-9-1 cannot list bindings (and the RabbitMQ management API
/// is an optional plugin the agent does not rely on), so its adapter answers `Unknown`; the diff
/// then re-issues the idempotent `queue.bind` ([`super::diff::Step::EnsureBinding`]) every time
/// the broker component is reconciled, so a binding removed by hand comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingCheck {
    Missing,
    Present,
    Unknown,
}

/// A message taken from a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusMessage {
    pub routing_key: String,
    pub payload: Vec<u8>,
    /// The publisher's idempotency key (AMQP `message_id`).
    pub idempotency_key: Option<String>,
}

pub trait EventBus: Send {
    fn identity(&self) -> AdapterIdentity;
    fn check_exchange(&mut self, exchange: &ExchangeSpec) -> Result<DeclareCheck, PortError>;
    fn check_queue(&mut self, queue: &QueueSpec) -> Result<DeclareCheck, PortError>;
    fn check_binding(&mut self, binding: &BindingSpec) -> Result<BindingCheck, PortError>;
    /// Declares a durable exchange; a differing existing one is `Refused` (drift), not replaced.
    fn declare_exchange(
        &mut self,
        exchange: &ExchangeSpec,
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    fn declare_queue(&mut self, queue: &QueueSpec, key: &IdempotencyKey) -> Result<(), PortError>;
    fn bind(&mut self, binding: &BindingSpec, key: &IdempotencyKey) -> Result<(), PortError>;
    /// Publishes and waits for the broker's confirm.
    fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    /// Takes one message from a queue, if any (acknowledged).
    fn get(&mut self, queue: &str) -> Result<Option<BusMessage>, PortError>;
    /// Destructive: only on an acknowledged destructive apply (C7).
    fn delete_exchange(&mut self, exchange: &str, key: &IdempotencyKey) -> Result<(), PortError>;
    /// Destructive: drops the queue and its messages.
    fn delete_queue(&mut self, queue: &str, key: &IdempotencyKey) -> Result<(), PortError>;
}

// ---------------------------------------------------------------------------------------------
// Vector index (C4)

/// A class as the index holds it, names as stored (normalised).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassState {
    pub name: String,
    pub properties: Vec<PropertySpec>,
}

/// One nearest-neighbour hit; `score` is the cosine similarity (1 = same direction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Neighbour {
    pub id: String,
    pub score: f32,
}

pub trait VectorIndex: Send {
    fn identity(&self) -> AdapterIdentity;
    /// `class` is normalised; `None` when absent.
    fn read_class(&mut self, class: &str) -> Result<Option<ClassState>, PortError>;
    fn create_class(
        &mut self,
        class: &IndexClassSpec,
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    fn add_property(
        &mut self,
        class: &str,
        property: &PropertySpec,
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    /// Destructive: changes a property's data type, dropping its values.
    fn retype_property(
        &mut self,
        class: &str,
        property: &PropertySpec,
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    /// Inserts or replaces object `id` (a UUID) with its vector and text properties.
    fn upsert(
        &mut self,
        class: &str,
        id: &str,
        vector: &[f32],
        properties: &BTreeMap<String, String>,
        key: &IdempotencyKey,
    ) -> Result<(), PortError>;
    /// The `limit` objects of `class` nearest to `vector` by cosine similarity, best first.
    fn nearest(
        &mut self,
        class: &str,
        vector: &[f32],
        limit: usize,
    ) -> Result<Vec<Neighbour>, PortError>;
}

/// Weaviate's name rules, which every index adapter follows: a class name starts upper-case.
pub fn normalize_class_name(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A property name starts lower-case.
pub fn normalize_property_name(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Data types compare lower-case; Weaviate reads the deprecated `string` as `text`.
pub fn normalize_data_type(data_type: &str) -> String {
    let lower = data_type.to_ascii_lowercase();
    match lower.as_str() {
        "string" => "text".into(),
        _ => lower,
    }
}

/// An object id as every index adapter takes it: a UUID in its canonical text form (8-4-4-4-12
/// hex digits), lower-cased as Weaviate stores and returns it. Anything else is refused, naming
/// the value.
pub fn normalize_object_id(
    operation: &'static str,
    class: &str,
    id: &str,
) -> Result<String, PortError> {
    let lengths: Vec<usize> = id.split('-').map(str::len).collect();
    let canonical =
        lengths == [8, 4, 4, 4, 12] && id.chars().all(|c| c == '-' || c.is_ascii_hexdigit());
    if canonical {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(PortError::refused(
            operation,
            format!("{class}/{id}"),
            format!("object id {id:?} is not a UUID (8-4-4-4-12 hex digits)"),
        ))
    }
}

/// Names compare case-insensitively.
pub fn same_name(left: &str, right: &str) -> bool {
    left.eq_ignore_ascii_case(right)
}

/// The class spec with every name and type normalised.
pub fn normalize_class(class: &IndexClassSpec) -> IndexClassSpec {
    IndexClassSpec {
        name: normalize_class_name(&class.name),
        properties: class
            .properties
            .iter()
            .map(|property| PropertySpec {
                name: normalize_property_name(&property.name),
                data_type: normalize_data_type(&property.data_type),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_like_weaviate() {
        assert_eq!(normalize_class_name("document"), "Document");
        assert_eq!(normalize_property_name("Title"), "title");
        assert_eq!(normalize_data_type("STRING"), "text");
        assert!(same_name("bodyText", "BodyText"));
        assert_eq!(normalize_class_name(""), "");
    }
}
