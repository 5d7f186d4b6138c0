//! The EnvironmentProfile document (S1, S3): declarative desired state for storage buckets,
//! broker exchanges/queues/bindings, vector-index classes and per-service modules.
//!
//! Read leniently (unknown fields ignored) so old agents survive new controls; control checks
//! operator input strictly before storing it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::limits::{PROFILE_LIST_MAX, TEXT_MAX_BYTES};
use crate::name::{Name, check_name};
use crate::validate::{Validate, ValidationError, check_count, check_text};

pub const PROFILE_API_VERSION: &str = "outpost/v1";
pub const PROFILE_KIND: &str = "EnvironmentProfile";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentProfile {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ProfileMetadata,
    #[serde(default)]
    pub spec: ProfileSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProfileMetadata {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProfileSpec {
    #[serde(default)]
    pub storage: StorageSpec,
    #[serde(default)]
    pub broker: BrokerSpec,
    #[serde(default)]
    pub index: IndexSpec,
    #[serde(default)]
    pub services: Vec<ServiceModules>,
    /// Destructive changes are considered only with this set and an acknowledged dry-run (C7).
    #[serde(default)]
    pub allow_destructive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StorageSpec {
    #[serde(default)]
    pub buckets: Vec<BucketSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSpec {
    pub name: Name,
    #[serde(default)]
    pub versioning: bool,
    #[serde(default)]
    pub lifecycle: Vec<LifecycleRule>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleRule {
    pub id: String,
    #[serde(default)]
    pub prefix: String,
    pub expire_days: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BrokerSpec {
    #[serde(default)]
    pub exchanges: Vec<ExchangeSpec>,
    #[serde(default)]
    pub queues: Vec<QueueSpec>,
    #[serde(default)]
    pub bindings: Vec<BindingSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeSpec {
    pub name: Name,
    #[serde(default)]
    pub kind: ExchangeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Direct,
    #[default]
    Topic,
    Fanout,
    Headers,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSpec {
    pub name: Name,
    #[serde(default)]
    pub message_ttl_ms: Option<u64>,
    #[serde(default)]
    pub dead_letter_exchange: Option<Name>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingSpec {
    pub exchange: Name,
    pub queue: Name,
    #[serde(default)]
    pub routing_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IndexSpec {
    #[serde(default)]
    pub classes: Vec<IndexClassSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexClassSpec {
    /// Class name as written; adapters normalise it (Weaviate upper-cases the first letter).
    pub name: String,
    #[serde(default)]
    pub properties: Vec<PropertySpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertySpec {
    pub name: String,
    pub data_type: String,
}

/// Self-scoped bootstrap a service does on its own (S4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceModules {
    pub service: Name,
    #[serde(default)]
    pub modules: Vec<String>,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub migrations: Vec<String>,
}

impl EnvironmentProfile {
    /// The built-in minimal profile a node runs from in solo mode (D7): nothing external.
    pub fn minimal() -> Self {
        Self {
            api_version: PROFILE_API_VERSION.into(),
            kind: PROFILE_KIND.into(),
            metadata: ProfileMetadata {
                name: "minimal".into(),
            },
            spec: ProfileSpec::default(),
        }
    }
}

fn check_identifier(field: &str, value: &str) -> Result<(), ValidationError> {
    let valid = !value.is_empty()
        && value.len() <= 128
        && value.as_bytes()[0].is_ascii_alphabetic()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be a letter then letters, digits or '_' (at most 128)",
            value,
        ))
    }
}

impl Validate for EnvironmentProfile {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.api_version != PROFILE_API_VERSION {
            return Err(ValidationError::new(
                "apiVersion",
                format!("must be {PROFILE_API_VERSION:?}"),
                &self.api_version,
            ));
        }
        if self.kind != PROFILE_KIND {
            return Err(ValidationError::new(
                "kind",
                format!("must be {PROFILE_KIND:?}"),
                &self.kind,
            ));
        }
        check_text("metadata.name", &self.metadata.name)?;
        self.spec.validate().map_err(|e| e.within("spec"))
    }
}

impl Validate for ProfileSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        let storage = &self.storage.buckets;
        check_count("storage.buckets", storage.len(), PROFILE_LIST_MAX)?;
        for (index, bucket) in storage.iter().enumerate() {
            let field = format!("storage.buckets[{index}]");
            check_name(&format!("{field}.name"), &bucket.name)?;
            if bucket.name.len() < 3 {
                return Err(ValidationError::new(
                    format!("{field}.name"),
                    "bucket names need at least 3 characters",
                    &bucket.name,
                ));
            }
            check_count(
                &format!("{field}.lifecycle"),
                bucket.lifecycle.len(),
                PROFILE_LIST_MAX,
            )?;
            for (rule_index, rule) in bucket.lifecycle.iter().enumerate() {
                let rule_field = format!("{field}.lifecycle[{rule_index}]");
                check_name(&format!("{rule_field}.id"), &rule.id)?;
                check_text(&format!("{rule_field}.prefix"), &rule.prefix)?;
                if rule.expire_days == 0 {
                    return Err(ValidationError::new(
                        format!("{rule_field}.expire_days"),
                        "must be at least 1",
                        rule.expire_days,
                    ));
                }
            }
            check_count(&format!("{field}.tags"), bucket.tags.len(), 10)?;
            for (key, value) in &bucket.tags {
                if key.is_empty() || key.len() > 128 || value.len() > 256 {
                    return Err(ValidationError::new(
                        format!("{field}.tags"),
                        "tag keys are 1-128 bytes, values at most 256",
                        key,
                    ));
                }
            }
        }
        let broker = &self.broker;
        check_count("broker.exchanges", broker.exchanges.len(), PROFILE_LIST_MAX)?;
        check_count("broker.queues", broker.queues.len(), PROFILE_LIST_MAX)?;
        check_count("broker.bindings", broker.bindings.len(), PROFILE_LIST_MAX)?;
        for (index, exchange) in broker.exchanges.iter().enumerate() {
            check_name(&format!("broker.exchanges[{index}].name"), &exchange.name)?;
        }
        for (index, queue) in broker.queues.iter().enumerate() {
            check_name(&format!("broker.queues[{index}].name"), &queue.name)?;
            if let Some(ttl) = queue.message_ttl_ms
                && (ttl == 0 || ttl > u64::from(u32::MAX))
            {
                return Err(ValidationError::new(
                    format!("broker.queues[{index}].message_ttl_ms"),
                    "must be between 1 and 4294967295",
                    ttl,
                ));
            }
        }
        for (index, binding) in broker.bindings.iter().enumerate() {
            let field = format!("broker.bindings[{index}]");
            if !broker.exchanges.iter().any(|e| e.name == binding.exchange) {
                return Err(ValidationError::new(
                    format!("{field}.exchange"),
                    "names no exchange of this profile",
                    &binding.exchange,
                ));
            }
            if !broker.queues.iter().any(|q| q.name == binding.queue) {
                return Err(ValidationError::new(
                    format!("{field}.queue"),
                    "names no queue of this profile",
                    &binding.queue,
                ));
            }
            check_text(&format!("{field}.routing_key"), &binding.routing_key)?;
        }
        check_count("index.classes", self.index.classes.len(), PROFILE_LIST_MAX)?;
        for (index, class) in self.index.classes.iter().enumerate() {
            let field = format!("index.classes[{index}]");
            check_identifier(&format!("{field}.name"), &class.name)?;
            check_count(
                &format!("{field}.properties"),
                class.properties.len(),
                PROFILE_LIST_MAX,
            )?;
            for (p, property) in class.properties.iter().enumerate() {
                check_identifier(&format!("{field}.properties[{p}].name"), &property.name)?;
                check_identifier(
                    &format!("{field}.properties[{p}].data_type"),
                    &property.data_type,
                )?;
            }
        }
        check_count("services", self.services.len(), PROFILE_LIST_MAX)?;
        for (index, service) in self.services.iter().enumerate() {
            let field = format!("services[{index}]");
            check_name(&format!("{field}.service"), &service.service)?;
            for list in [&service.modules, &service.migrations] {
                check_count(&field, list.len(), PROFILE_LIST_MAX)?;
                for item in list {
                    check_text(&field, item)?;
                }
            }
            for value in service.parameters.values() {
                if value.len() > TEXT_MAX_BYTES {
                    return Err(ValidationError::new(
                        format!("{field}.parameters"),
                        "value too long",
                        value,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A profile of the seed's shape, every section used; for tests (codec ones too).
#[cfg(test)]
pub(crate) const SEED_SHAPED_PROFILE_JSON: &str = r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile","metadata":{"name":"site"},
    "spec":{"storage":{"buckets":[{"name":"media","versioning":true,
      "lifecycle":[{"id":"tmp","prefix":"tmp/","expire_days":7}],"tags":{"team":"edge"}}]},
    "broker":{"exchanges":[{"name":"events","kind":"topic"}],
      "queues":[{"name":"ingest","message_ttl_ms":60000,"dead_letter_exchange":"events"}],
      "bindings":[{"exchange":"events","queue":"ingest","routing_key":"sensor.#"}]},
    "index":{"classes":[{"name":"Document","properties":[{"name":"title","data_type":"text"}]}]},
    "services":[{"service":"api","modules":["auth"],"migrations":["001_init"]}]}}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> EnvironmentProfile {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn seed_shaped_profile_is_valid() {
        let profile = parse(SEED_SHAPED_PROFILE_JSON);
        assert_eq!(profile.validate(), Ok(()));
    }

    #[test]
    fn wrong_kind_and_dangling_binding_are_named() {
        let mut profile = EnvironmentProfile::minimal();
        profile.kind = "Plan".into();
        assert_eq!(profile.validate().unwrap_err().field, "kind");
        let profile = parse(
            r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile",
            "spec":{"broker":{"bindings":[{"exchange":"nope","queue":"q"}]}}}"#,
        );
        assert_eq!(
            profile.validate().unwrap_err().field,
            "spec.broker.bindings[0].exchange"
        );
    }

    #[test]
    fn unknown_fields_are_ignored_on_read() {
        let profile =
            parse(r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile","future":1}"#);
        assert_eq!(profile.validate(), Ok(()));
    }
}
