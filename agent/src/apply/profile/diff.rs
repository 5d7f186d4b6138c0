//! Pure reconcile diffs: desired profile part + observed actual state → the steps that would
//! converge them, each marked additive, safe update or destructive (C1, C7).
//!
//! No I/O here. [`simulate`] applies steps to an observed state the way a well-behaved adapter
//! would, so property tests can check that a second diff finds nothing left to add.

use std::collections::BTreeMap;

use outpost_proto::hash::sha256_hex;
use outpost_proto::profile::{
    BindingSpec, BrokerSpec, ExchangeSpec, IndexClassSpec, IndexSpec, LifecycleRule, PropertySpec,
    QueueSpec, StorageSpec,
};
use serde::{Deserialize, Serialize};

use super::ports::{
    BindingCheck, BucketState, ClassState, DeclareCheck, ObservedLifecycleRule, VersioningChange,
    VersioningState, normalize_class, same_name,
};

/// The profile components, in the order they are reconciled (C1). Services come after the last
/// one and are started by the process supervisor, not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Storage,
    Broker,
    Index,
}

impl Component {
    pub const ORDER: [Component; 3] = [Component::Storage, Component::Broker, Component::Index];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Storage => "storage",
            Component::Broker => "broker",
            Component::Index => "index",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ORDER
            .into_iter()
            .find(|component| component.as_str() == text)
    }
}

/// How risky a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Safety {
    /// Creates something that is not there.
    Additive,
    /// Changes something in a way that loses nothing (enable versioning, longer expiry, tag value).
    SafeUpdate,
    /// Deletes, renames, purges or retypes, or expires data sooner. Needs explicit intent (C7).
    Destructive,
}

/// One step of a diff, with everything the adapter needs to carry it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Step {
    CreateBucket {
        bucket: String,
    },
    SetVersioning {
        bucket: String,
        change: VersioningChange,
    },
    /// Merge-add by rule id; `safety` says whether a same-id rule is replaced in a lossy way.
    MergeLifecycleRules {
        bucket: String,
        rules: Vec<LifecycleRule>,
        safety: Safety,
    },
    MergeTags {
        bucket: String,
        tags: BTreeMap<String, String>,
        safety: Safety,
    },
    DeclareExchange {
        exchange: ExchangeSpec,
    },
    /// Delete and declare again with the desired kind (drift repair), then bind `rebind` again.
    RedeclareExchange {
        exchange: ExchangeSpec,
        found: String,
        rebind: Vec<BindingSpec>,
    },
    DeclareQueue {
        queue: QueueSpec,
    },
    /// Delete (dropping its messages) and declare again with the desired arguments, then bind
    /// `rebind` again.
    RedeclareQueue {
        queue: QueueSpec,
        found: String,
        rebind: Vec<BindingSpec>,
    },
    Bind {
        binding: BindingSpec,
    },
    /// Re-issue a binding the broker cannot say exists ([`BindingCheck::Unknown`]: AMQP 0-9-1
    /// cannot list bindings). `queue.bind` is idempotent and non-destructive, so this repairs a
    /// binding removed by hand and changes nothing otherwise; it is a re-assertion, not a change
    /// ([`Step::is_reassertion`]).
    EnsureBinding {
        binding: BindingSpec,
    },
    CreateClass {
        class: IndexClassSpec,
    },
    AddProperty {
        class: String,
        property: PropertySpec,
    },
    /// Change a property's data type: drops its values. Reported as `needs migration` unless a
    /// destructive apply was acknowledged.
    RetypeProperty {
        class: String,
        property: PropertySpec,
        found: String,
    },
}

impl Step {
    pub fn safety(&self) -> Safety {
        match self {
            Step::CreateBucket { .. }
            | Step::DeclareExchange { .. }
            | Step::DeclareQueue { .. }
            | Step::Bind { .. }
            | Step::EnsureBinding { .. }
            | Step::CreateClass { .. }
            | Step::AddProperty { .. } => Safety::Additive,
            Step::SetVersioning {
                change: VersioningChange::Enable,
                ..
            } => Safety::SafeUpdate,
            Step::SetVersioning {
                change: VersioningChange::Suspend,
                ..
            } => Safety::Destructive,
            Step::MergeLifecycleRules { safety, .. } | Step::MergeTags { safety, .. } => *safety,
            Step::RedeclareExchange { .. }
            | Step::RedeclareQueue { .. }
            | Step::RetypeProperty { .. } => Safety::Destructive,
        }
    }

    /// True for a step that re-asserts what the adapter cannot observe ([`Step::EnsureBinding`]):
    /// it runs whenever the component is reconciled, but finding nothing else to do still
    /// counts as unchanged.
    pub fn is_reassertion(&self) -> bool {
        matches!(self, Step::EnsureBinding { .. })
    }

    pub fn component(&self) -> Component {
        match self {
            Step::CreateBucket { .. }
            | Step::SetVersioning { .. }
            | Step::MergeLifecycleRules { .. }
            | Step::MergeTags { .. } => Component::Storage,
            Step::DeclareExchange { .. }
            | Step::RedeclareExchange { .. }
            | Step::DeclareQueue { .. }
            | Step::RedeclareQueue { .. }
            | Step::Bind { .. }
            | Step::EnsureBinding { .. } => Component::Broker,
            Step::CreateClass { .. } | Step::AddProperty { .. } | Step::RetypeProperty { .. } => {
                Component::Index
            }
        }
    }

    /// Short action name for events and logs.
    pub fn action(&self) -> &'static str {
        match self {
            Step::CreateBucket { .. } => "create_bucket",
            Step::SetVersioning {
                change: VersioningChange::Enable,
                ..
            } => "enable_versioning",
            Step::SetVersioning {
                change: VersioningChange::Suspend,
                ..
            } => "suspend_versioning",
            Step::MergeLifecycleRules { .. } => "merge_lifecycle_rules",
            Step::MergeTags { .. } => "merge_tags",
            Step::DeclareExchange { .. } => "declare_exchange",
            Step::RedeclareExchange { .. } => "redeclare_exchange",
            Step::DeclareQueue { .. } => "declare_queue",
            Step::RedeclareQueue { .. } => "redeclare_queue",
            Step::Bind { .. } => "bind_queue",
            Step::EnsureBinding { .. } => "ensure_binding",
            Step::CreateClass { .. } => "create_class",
            Step::AddProperty { .. } => "add_property",
            Step::RetypeProperty { .. } => "retype_property",
        }
    }

    /// What the step acts on, for logs and reports.
    pub fn target(&self) -> String {
        match self {
            Step::CreateBucket { bucket }
            | Step::SetVersioning { bucket, .. }
            | Step::MergeLifecycleRules { bucket, .. }
            | Step::MergeTags { bucket, .. } => bucket.clone(),
            Step::DeclareExchange { exchange } | Step::RedeclareExchange { exchange, .. } => {
                exchange.name.to_string()
            }
            Step::DeclareQueue { queue } | Step::RedeclareQueue { queue, .. } => {
                queue.name.to_string()
            }
            Step::Bind { binding } | Step::EnsureBinding { binding } => {
                format!(
                    "{}->{}:{}",
                    binding.exchange, binding.queue, binding.routing_key
                )
            }
            Step::CreateClass { class } => class.name.clone(),
            Step::AddProperty { class, property }
            | Step::RetypeProperty {
                class, property, ..
            } => {
                format!("{class}.{}", property.name)
            }
        }
    }

    /// One line a person reads in a dry run.
    pub fn describe(&self) -> String {
        let what = match self {
            Step::CreateBucket { bucket } => format!("create bucket {bucket}"),
            Step::SetVersioning {
                bucket,
                change: VersioningChange::Enable,
            } => {
                format!("enable versioning on bucket {bucket}")
            }
            Step::SetVersioning {
                bucket,
                change: VersioningChange::Suspend,
            } => format!(
                "suspend versioning on bucket {bucket} (a versioned bucket cannot go back to unversioned; new writes stop keeping prior versions)"
            ),
            Step::MergeLifecycleRules { bucket, rules, .. } => {
                let rules: Vec<String> = rules
                    .iter()
                    .map(|rule| {
                        format!(
                            "{} (prefix {:?}, expire after {} days)",
                            rule.id, rule.prefix, rule.expire_days
                        )
                    })
                    .collect();
                format!(
                    "merge lifecycle rules into bucket {bucket}: {}",
                    rules.join(", ")
                )
            }
            Step::MergeTags { bucket, tags, .. } => {
                let tags: Vec<String> = tags
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                format!("merge tags into bucket {bucket}: {}", tags.join(", "))
            }
            Step::DeclareExchange { exchange } => {
                format!(
                    "declare durable {:?} exchange {}",
                    exchange.kind, exchange.name
                )
            }
            Step::RedeclareExchange {
                exchange, found, ..
            } => format!(
                "delete exchange {} ({found}) and declare it again as {:?} (its bindings are lost)",
                exchange.name, exchange.kind
            ),
            Step::DeclareQueue { queue } => format!(
                "declare durable queue {}{}",
                queue.name,
                queue_arguments(queue)
            ),
            Step::RedeclareQueue { queue, found, .. } => format!(
                "delete queue {} ({found}) and its messages, then declare it again{}",
                queue.name,
                queue_arguments(queue)
            ),
            Step::Bind { binding } => format!(
                "bind queue {} to exchange {} with routing key {:?}",
                binding.queue, binding.exchange, binding.routing_key
            ),
            Step::EnsureBinding { binding } => format!(
                "re-assert the binding of queue {} to exchange {} with routing key {:?} (the broker cannot list bindings; queue.bind is idempotent)",
                binding.queue, binding.exchange, binding.routing_key
            ),
            Step::CreateClass { class } => {
                let properties: Vec<String> = class
                    .properties
                    .iter()
                    .map(|p| format!("{}:{}", p.name, p.data_type))
                    .collect();
                format!(
                    "create class {} with properties [{}]",
                    class.name,
                    properties.join(", ")
                )
            }
            Step::AddProperty { class, property } => {
                format!(
                    "add property {}:{} to class {class}",
                    property.name, property.data_type
                )
            }
            Step::RetypeProperty {
                class,
                property,
                found,
            } => format!(
                "retype property {class}.{} from {found} to {} (drops its values; needs migration)",
                property.name, property.data_type
            ),
        };
        let safety = match self.safety() {
            _ if self.is_reassertion() => "ensure",
            Safety::Additive => "add",
            Safety::SafeUpdate => "update",
            Safety::Destructive => "DESTRUCTIVE",
        };
        format!("[{}] {safety}: {what}", self.component().as_str())
    }
}

fn queue_arguments(queue: &QueueSpec) -> String {
    let mut parts = Vec::new();
    if let Some(ttl) = queue.message_ttl_ms {
        parts.push(format!("x-message-ttl={ttl}"));
    }
    if let Some(exchange) = &queue.dead_letter_exchange {
        parts.push(format!("x-dead-letter-exchange={exchange}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// The hash an operator acknowledges to allow a destructive apply: sha256 of the full diff.
pub fn diff_hash(steps: &[Step]) -> String {
    let json = serde_json::to_vec(steps).unwrap_or_default();
    sha256_hex(&json)
}

/// Whether destructive steps may run (C7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestructivePolicy {
    /// The default path: destructive steps are withheld and reported.
    Withhold,
    /// An operator acknowledged the dry-run diff with this hash.
    Acknowledged { diff_hash: String },
}

/// Splits a diff into the steps to run and those withheld as destructive.
pub fn partition(steps: Vec<Step>, destructive_allowed: bool) -> (Vec<Step>, Vec<Step>) {
    if destructive_allowed {
        (steps, Vec::new())
    } else {
        steps
            .into_iter()
            .partition(|step| step.safety() != Safety::Destructive)
    }
}

// ---------------------------------------------------------------------------------------------
// Observed state per component

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StorageActual {
    /// Bucket name → its state, `None` when it does not exist.
    pub buckets: BTreeMap<String, Option<BucketState>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BrokerActual {
    pub exchanges: BTreeMap<String, DeclareCheck>,
    pub queues: BTreeMap<String, DeclareCheck>,
    /// Keyed by [`binding_key`].
    pub bindings: BTreeMap<String, BindingCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IndexActual {
    /// Normalised class name → the class, `None` when absent.
    pub classes: BTreeMap<String, Option<ClassState>>,
}

pub fn binding_key(binding: &BindingSpec) -> String {
    format!(
        "{}\u{1f}{}\u{1f}{}",
        binding.exchange, binding.queue, binding.routing_key
    )
}

// ---------------------------------------------------------------------------------------------
// Diffs

pub fn diff_storage(desired: &StorageSpec, actual: &StorageActual) -> Vec<Step> {
    let mut steps = Vec::new();
    for bucket in &desired.buckets {
        let name = bucket.name.to_string();
        let state = actual.buckets.get(&name).cloned().flatten();
        let state = match state {
            Some(state) => state,
            None => {
                steps.push(Step::CreateBucket {
                    bucket: name.clone(),
                });
                BucketState::default()
            }
        };
        match (bucket.versioning, state.versioning) {
            (true, VersioningState::Unversioned | VersioningState::Suspended) => {
                steps.push(Step::SetVersioning {
                    bucket: name.clone(),
                    change: VersioningChange::Enable,
                })
            }
            (false, VersioningState::Enabled) => steps.push(Step::SetVersioning {
                bucket: name.clone(),
                change: VersioningChange::Suspend,
            }),
            _ => {}
        }
        let mut safe_rules = Vec::new();
        let mut lossy_rules = Vec::new();
        for rule in &bucket.lifecycle {
            match state.lifecycle.iter().find(|found| found.id == rule.id) {
                None => safe_rules.push(rule.clone()),
                Some(found) if *found == ObservedLifecycleRule::from(rule) => {}
                Some(found) => {
                    let only_longer = found.prefix.as_deref() == Some(rule.prefix.as_str())
                        && found
                            .expire_days
                            .is_some_and(|days| days < rule.expire_days);
                    if only_longer {
                        safe_rules.push(rule.clone())
                    } else {
                        lossy_rules.push(rule.clone())
                    }
                }
            }
        }
        if !safe_rules.is_empty() {
            steps.push(Step::MergeLifecycleRules {
                bucket: name.clone(),
                rules: safe_rules,
                safety: Safety::Additive,
            });
        }
        if !lossy_rules.is_empty() {
            steps.push(Step::MergeLifecycleRules {
                bucket: name.clone(),
                rules: lossy_rules,
                safety: Safety::Destructive,
            });
        }
        let changed_tags: BTreeMap<String, String> = bucket
            .tags
            .iter()
            .filter(|(key, value)| state.tags.get(*key) != Some(*value))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        if !changed_tags.is_empty() {
            let safety = if changed_tags.keys().all(|key| !state.tags.contains_key(key)) {
                Safety::Additive
            } else {
                Safety::SafeUpdate
            };
            steps.push(Step::MergeTags {
                bucket: name,
                tags: changed_tags,
                safety,
            });
        }
    }
    steps
}

pub fn diff_broker(desired: &BrokerSpec, actual: &BrokerActual) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut fresh_exchanges = Vec::new();
    let mut fresh_queues = Vec::new();
    let bindings_of = |matches: &dyn Fn(&BindingSpec) -> bool| -> Vec<BindingSpec> {
        desired
            .bindings
            .iter()
            .filter(|binding| matches(binding))
            .cloned()
            .collect()
    };
    for exchange in &desired.exchanges {
        match actual
            .exchanges
            .get(exchange.name.as_str())
            .unwrap_or(&DeclareCheck::Missing)
        {
            DeclareCheck::Missing => {
                fresh_exchanges.push(exchange.name.to_string());
                steps.push(Step::DeclareExchange {
                    exchange: exchange.clone(),
                });
            }
            DeclareCheck::Matches => {}
            DeclareCheck::Differs(found) => steps.push(Step::RedeclareExchange {
                exchange: exchange.clone(),
                found: found.clone(),
                rebind: bindings_of(&|binding| binding.exchange == exchange.name),
            }),
        }
    }
    for queue in &desired.queues {
        match actual
            .queues
            .get(queue.name.as_str())
            .unwrap_or(&DeclareCheck::Missing)
        {
            DeclareCheck::Missing => {
                fresh_queues.push(queue.name.to_string());
                steps.push(Step::DeclareQueue {
                    queue: queue.clone(),
                });
            }
            DeclareCheck::Matches => {}
            DeclareCheck::Differs(found) => steps.push(Step::RedeclareQueue {
                queue: queue.clone(),
                found: found.clone(),
                rebind: bindings_of(&|binding| binding.queue == queue.name),
            }),
        }
    }
    for binding in &desired.bindings {
        let end_is_fresh = fresh_exchanges
            .iter()
            .any(|name| name == binding.exchange.as_str())
            || fresh_queues
                .iter()
                .any(|name| name == binding.queue.as_str());
        let check = actual
            .bindings
            .get(&binding_key(binding))
            .copied()
            .unwrap_or(BindingCheck::Missing);
        let binding = binding.clone();
        match check {
            BindingCheck::Missing => steps.push(Step::Bind { binding }),
            BindingCheck::Present | BindingCheck::Unknown if end_is_fresh => {
                steps.push(Step::Bind { binding })
            }
            BindingCheck::Present => {}
            // Unobservable: re-issue the (idempotent) bind, so one removed by hand comes back.
            BindingCheck::Unknown => steps.push(Step::EnsureBinding { binding }),
        }
    }
    steps
}

pub fn diff_index(desired: &IndexSpec, actual: &IndexActual) -> Vec<Step> {
    let mut steps = Vec::new();
    for class in &desired.classes {
        let class = normalize_class(class);
        let found = actual
            .classes
            .iter()
            .find(|(name, _)| same_name(name, &class.name))
            .and_then(|(_, state)| state.clone());
        let Some(found) = found else {
            steps.push(Step::CreateClass { class });
            continue;
        };
        for property in &class.properties {
            match found
                .properties
                .iter()
                .find(|existing| same_name(&existing.name, &property.name))
            {
                None => steps.push(Step::AddProperty {
                    class: found.name.clone(),
                    property: property.clone(),
                }),
                Some(existing) if existing.data_type.eq_ignore_ascii_case(&property.data_type) => {}
                Some(existing) => steps.push(Step::RetypeProperty {
                    class: found.name.clone(),
                    property: property.clone(),
                    found: existing.data_type.clone(),
                }),
            }
        }
    }
    steps
}

// ---------------------------------------------------------------------------------------------
// Simulation (for property tests and dry-run previews)

/// The storage state after a well-behaved adapter ran `steps`.
pub fn simulate_storage(actual: &StorageActual, steps: &[Step]) -> StorageActual {
    let mut next = actual.clone();
    for step in steps {
        match step {
            Step::CreateBucket { bucket } => {
                next.buckets
                    .entry(bucket.clone())
                    .or_default()
                    .get_or_insert_with(BucketState::default);
            }
            Step::SetVersioning { bucket, change } => {
                if let Some(Some(state)) = next.buckets.get_mut(bucket) {
                    state.versioning = match change {
                        VersioningChange::Enable => VersioningState::Enabled,
                        VersioningChange::Suspend => VersioningState::Suspended,
                    };
                }
            }
            Step::MergeLifecycleRules { bucket, rules, .. } => {
                if let Some(Some(state)) = next.buckets.get_mut(bucket) {
                    for rule in rules {
                        state.lifecycle.retain(|found| found.id != rule.id);
                        state.lifecycle.push(rule.into());
                    }
                }
            }
            Step::MergeTags { bucket, tags, .. } => {
                if let Some(Some(state)) = next.buckets.get_mut(bucket) {
                    state.tags.extend(tags.clone());
                }
            }
            _ => {}
        }
    }
    next
}

pub fn simulate_broker(actual: &BrokerActual, steps: &[Step]) -> BrokerActual {
    let mut next = actual.clone();
    for step in steps {
        match step {
            Step::DeclareExchange { exchange } => {
                next.exchanges
                    .insert(exchange.name.to_string(), DeclareCheck::Matches);
            }
            Step::DeclareQueue { queue } => {
                next.queues
                    .insert(queue.name.to_string(), DeclareCheck::Matches);
            }
            Step::RedeclareExchange {
                exchange, rebind, ..
            } => {
                next.exchanges
                    .insert(exchange.name.to_string(), DeclareCheck::Matches);
                for binding in rebind {
                    next.bindings
                        .insert(binding_key(binding), BindingCheck::Present);
                }
            }
            Step::RedeclareQueue { queue, rebind, .. } => {
                next.queues
                    .insert(queue.name.to_string(), DeclareCheck::Matches);
                for binding in rebind {
                    next.bindings
                        .insert(binding_key(binding), BindingCheck::Present);
                }
            }
            Step::Bind { binding } => {
                next.bindings
                    .insert(binding_key(binding), BindingCheck::Present);
            }
            // The binding now exists, but the adapter still cannot see it: it stays Unknown.
            Step::EnsureBinding { .. } => {}
            _ => {}
        }
    }
    next
}

pub fn simulate_index(actual: &IndexActual, steps: &[Step]) -> IndexActual {
    let mut next = actual.clone();
    for step in steps {
        match step {
            Step::CreateClass { class } => {
                next.classes.insert(
                    class.name.clone(),
                    Some(ClassState {
                        name: class.name.clone(),
                        properties: class.properties.clone(),
                    }),
                );
            }
            Step::AddProperty { class, property } => {
                if let Some(Some(state)) = next.classes.get_mut(class) {
                    state.properties.push(property.clone());
                }
            }
            Step::RetypeProperty {
                class, property, ..
            } => {
                if let Some(Some(state)) = next.classes.get_mut(class) {
                    for existing in &mut state.properties {
                        if same_name(&existing.name, &property.name) {
                            existing.data_type = property.data_type.clone();
                        }
                    }
                }
            }
            _ => {}
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_proto::name::Name;
    use outpost_proto::profile::{BucketSpec, ExchangeKind};
    use proptest::prelude::*;

    fn name(text: &str) -> Name {
        Name::try_from(text).unwrap()
    }

    fn bucket(name_text: &str) -> BucketSpec {
        BucketSpec {
            name: name(name_text),
            versioning: false,
            lifecycle: vec![],
            tags: BTreeMap::new(),
        }
    }

    #[test]
    fn missing_bucket_is_created_with_its_settings() {
        let mut media = bucket("media");
        media.versioning = true;
        media.lifecycle.push(LifecycleRule {
            id: "tmp".into(),
            prefix: "tmp/".into(),
            expire_days: 7,
        });
        media.tags.insert("team".into(), "edge".into());
        let steps = diff_storage(
            &StorageSpec {
                buckets: vec![media],
            },
            &StorageActual::default(),
        );
        let actions: Vec<&str> = steps.iter().map(Step::action).collect();
        assert_eq!(
            actions,
            [
                "create_bucket",
                "enable_versioning",
                "merge_lifecycle_rules",
                "merge_tags"
            ]
        );
        assert!(
            steps
                .iter()
                .all(|step| step.safety() != Safety::Destructive)
        );
    }

    #[test]
    fn foreign_rules_and_tags_are_left_alone() {
        let mut media = bucket("media");
        media.tags.insert("team".into(), "edge".into());
        let mut state = BucketState::default();
        state.tags.insert("owner".into(), "someone-else".into());
        state.tags.insert("team".into(), "edge".into());
        state.lifecycle.push(ObservedLifecycleRule {
            id: "theirs".into(),
            prefix: None,
            expire_days: None,
        });
        let actual = StorageActual {
            buckets: BTreeMap::from([("media".into(), Some(state))]),
        };
        assert!(
            diff_storage(
                &StorageSpec {
                    buckets: vec![media]
                },
                &actual
            )
            .is_empty()
        );
    }

    #[test]
    fn turning_versioning_off_and_shorter_expiry_are_destructive() {
        let mut media = bucket("media");
        media.lifecycle.push(LifecycleRule {
            id: "tmp".into(),
            prefix: "tmp/".into(),
            expire_days: 3,
        });
        let state = BucketState {
            versioning: VersioningState::Enabled,
            lifecycle: vec![ObservedLifecycleRule {
                id: "tmp".into(),
                prefix: Some("tmp/".into()),
                expire_days: Some(7),
            }],
            tags: BTreeMap::new(),
        };
        let actual = StorageActual {
            buckets: BTreeMap::from([("media".into(), Some(state))]),
        };
        let steps = diff_storage(
            &StorageSpec {
                buckets: vec![media],
            },
            &actual,
        );
        assert_eq!(steps.len(), 2);
        assert!(
            steps
                .iter()
                .all(|step| step.safety() == Safety::Destructive)
        );
        let (run, withheld) = partition(steps, false);
        assert!(run.is_empty());
        assert_eq!(withheld.len(), 2);
    }

    /// Topic exchange `events`, queue `ingest` (with `ttl`) and their binding `a.#`.
    fn events_to_ingest(ttl: Option<u64>) -> BrokerSpec {
        BrokerSpec {
            exchanges: vec![ExchangeSpec {
                name: name("events"),
                kind: ExchangeKind::Topic,
            }],
            queues: vec![QueueSpec {
                name: name("ingest"),
                message_ttl_ms: ttl,
                dead_letter_exchange: None,
            }],
            bindings: vec![BindingSpec {
                exchange: name("events"),
                queue: name("ingest"),
                routing_key: "a.#".into(),
            }],
        }
    }

    #[test]
    fn differing_queue_is_drift_and_binding_follows_a_fresh_queue() {
        let spec = events_to_ingest(Some(1000));
        let mut actual = BrokerActual::default();
        actual
            .exchanges
            .insert("events".into(), DeclareCheck::Matches);
        actual.queues.insert(
            "ingest".into(),
            DeclareCheck::Differs("x-message-ttl 5".into()),
        );
        actual
            .bindings
            .insert(binding_key(&spec.bindings[0]), BindingCheck::Unknown);
        let steps = diff_broker(&spec, &actual);
        assert_eq!(
            steps.iter().map(Step::action).collect::<Vec<_>>(),
            ["redeclare_queue", "ensure_binding"]
        );
        let Step::RedeclareQueue { rebind, .. } = &steps[0] else {
            panic!("not a redeclare: {steps:?}")
        };
        assert_eq!(
            rebind, &spec.bindings,
            "a redeclared queue gets its bindings back"
        );
        let (run, withheld) = partition(steps, false);
        assert_eq!(withheld.len(), 1);
        assert_eq!(
            run.iter().map(Step::action).collect::<Vec<_>>(),
            ["ensure_binding"],
            "the unobservable binding is re-asserted on the queue as it is"
        );
        actual.queues.insert("ingest".into(), DeclareCheck::Missing);
        let steps = diff_broker(&spec, &actual);
        assert_eq!(
            steps.iter().map(Step::action).collect::<Vec<_>>(),
            ["declare_queue", "bind_queue"]
        );
    }

    /// A binding the adapter cannot observe is re-asserted every time the broker is reconciled
    /// (so one removed by hand comes back); a known one is left alone or bound.
    #[test]
    fn unobservable_bindings_are_reasserted_and_known_ones_are_not() {
        let spec = events_to_ingest(None);
        let binding = spec.bindings[0].clone();
        let mut actual = BrokerActual::default();
        actual
            .exchanges
            .insert("events".into(), DeclareCheck::Matches);
        actual.queues.insert("ingest".into(), DeclareCheck::Matches);
        let with = |check: BindingCheck, actual: &mut BrokerActual| {
            actual.bindings.insert(binding_key(&binding), check);
            diff_broker(&spec, actual)
        };
        assert_eq!(with(BindingCheck::Present, &mut actual), []);
        assert_eq!(
            with(BindingCheck::Missing, &mut actual),
            [Step::Bind {
                binding: binding.clone()
            }]
        );
        let steps = with(BindingCheck::Unknown, &mut actual);
        assert_eq!(
            steps,
            [Step::EnsureBinding {
                binding: binding.clone()
            }]
        );
        assert!(steps[0].is_reassertion() && steps[0].safety() == Safety::Additive);
        assert!(!Step::Bind { binding }.is_reassertion());
        assert!(
            steps[0]
                .describe()
                .starts_with("[broker] ensure: re-assert"),
            "{steps:?}"
        );
    }

    #[test]
    fn index_names_compare_case_insensitively_and_retype_is_withheld() {
        let spec = IndexSpec {
            classes: vec![IndexClassSpec {
                name: "document".into(),
                properties: vec![
                    PropertySpec {
                        name: "Title".into(),
                        data_type: "text".into(),
                    },
                    PropertySpec {
                        name: "pages".into(),
                        data_type: "int".into(),
                    },
                    PropertySpec {
                        name: "summary".into(),
                        data_type: "text".into(),
                    },
                ],
            }],
        };
        let found = ClassState {
            name: "Document".into(),
            properties: vec![
                PropertySpec {
                    name: "title".into(),
                    data_type: "text".into(),
                },
                PropertySpec {
                    name: "pages".into(),
                    data_type: "text".into(),
                },
            ],
        };
        let actual = IndexActual {
            classes: BTreeMap::from([("Document".into(), Some(found))]),
        };
        let steps = diff_index(&spec, &actual);
        assert_eq!(
            steps.iter().map(Step::action).collect::<Vec<_>>(),
            ["retype_property", "add_property"]
        );
    }

    #[test]
    fn diff_hash_changes_with_the_diff() {
        let one = vec![Step::CreateBucket {
            bucket: "media".into(),
        }];
        let two = vec![Step::CreateBucket {
            bucket: "logs".into(),
        }];
        assert_ne!(diff_hash(&one), diff_hash(&two));
        assert_eq!(diff_hash(&one), diff_hash(&one.clone()));
    }

    // ---- properties -------------------------------------------------------------------------

    fn arb_name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["aaa", "bbb", "ccc", "ddd"]).prop_map(str::to_string)
    }

    fn arb_rule() -> impl Strategy<Value = LifecycleRule> {
        (
            prop::sample::select(vec!["r1", "r2", "r3"]),
            prop::sample::select(vec!["", "tmp/", "logs/"]),
            1u32..30,
        )
            .prop_map(|(id, prefix, expire_days)| LifecycleRule {
                id: id.into(),
                prefix: prefix.into(),
                expire_days,
            })
    }

    fn arb_tags() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop::collection::btree_map(
            prop::sample::select(vec!["team", "site", "tier"]).prop_map(str::to_string),
            prop::sample::select(vec!["a", "b"]).prop_map(str::to_string),
            0..3,
        )
    }

    fn arb_bucket_spec() -> impl Strategy<Value = BucketSpec> {
        (
            arb_name(),
            any::<bool>(),
            prop::collection::vec(arb_rule(), 0..3),
            arb_tags(),
        )
            .prop_map(|(bucket_name, versioning, mut lifecycle, tags)| {
                lifecycle.sort_by(|a, b| a.id.cmp(&b.id));
                lifecycle.dedup_by(|a, b| a.id == b.id);
                BucketSpec {
                    name: name(&bucket_name),
                    versioning,
                    lifecycle,
                    tags,
                }
            })
    }

    fn arb_storage_spec() -> impl Strategy<Value = StorageSpec> {
        prop::collection::vec(arb_bucket_spec(), 0..4).prop_map(|mut buckets| {
            buckets.sort_by(|a, b| a.name.cmp(&b.name));
            buckets.dedup_by(|a, b| a.name == b.name);
            StorageSpec { buckets }
        })
    }

    fn arb_bucket_state() -> impl Strategy<Value = Option<BucketState>> {
        prop::option::of(
            (
                prop::sample::select(vec![
                    VersioningState::Unversioned,
                    VersioningState::Enabled,
                    VersioningState::Suspended,
                ]),
                prop::collection::vec(arb_rule(), 0..3),
                arb_tags(),
            )
                .prop_map(|(versioning, rules, tags)| BucketState {
                    versioning,
                    lifecycle: rules.iter().map(ObservedLifecycleRule::from).collect(),
                    tags,
                }),
        )
    }

    fn arb_storage_actual() -> impl Strategy<Value = StorageActual> {
        prop::collection::btree_map(arb_name(), arb_bucket_state(), 0..4)
            .prop_map(|buckets| StorageActual { buckets })
    }

    fn arb_check() -> impl Strategy<Value = DeclareCheck> {
        prop_oneof![
            Just(DeclareCheck::Missing),
            Just(DeclareCheck::Matches),
            Just(DeclareCheck::Differs("other shape".into()))
        ]
    }

    fn arb_broker() -> impl Strategy<Value = (BrokerSpec, BrokerActual)> {
        let names = || prop::collection::btree_set(arb_name(), 0..4);
        (
            names(),
            names(),
            prop::collection::vec((arb_check(), arb_check()), 4),
            any::<u8>(),
        )
            .prop_map(|(exchanges, queues, checks, binding_bits)| {
                let exchanges: Vec<ExchangeSpec> = exchanges
                    .iter()
                    .map(|n| ExchangeSpec {
                        name: name(n),
                        kind: ExchangeKind::Topic,
                    })
                    .collect();
                let queues: Vec<QueueSpec> = queues
                    .iter()
                    .map(|n| QueueSpec {
                        name: name(n),
                        message_ttl_ms: None,
                        dead_letter_exchange: None,
                    })
                    .collect();
                let mut bindings = Vec::new();
                for exchange in &exchanges {
                    for queue in &queues {
                        bindings.push(BindingSpec {
                            exchange: exchange.name.clone(),
                            queue: queue.name.clone(),
                            routing_key: "k".into(),
                        });
                    }
                }
                let mut actual = BrokerActual::default();
                for (index, exchange) in exchanges.iter().enumerate() {
                    actual
                        .exchanges
                        .insert(exchange.name.to_string(), checks[index % 4].0.clone());
                }
                for (index, queue) in queues.iter().enumerate() {
                    actual
                        .queues
                        .insert(queue.name.to_string(), checks[index % 4].1.clone());
                }
                for (index, binding) in bindings.iter().enumerate() {
                    let check = match (binding_bits >> (index % 8)) & 3 {
                        0 => BindingCheck::Missing,
                        1 => BindingCheck::Present,
                        _ => BindingCheck::Unknown,
                    };
                    actual.bindings.insert(binding_key(binding), check);
                }
                (
                    BrokerSpec {
                        exchanges,
                        queues,
                        bindings,
                    },
                    actual,
                )
            })
    }

    fn arb_property() -> impl Strategy<Value = PropertySpec> {
        (
            prop::sample::select(vec!["title", "Title", "body", "pages"]),
            prop::sample::select(vec!["text", "int"]),
        )
            .prop_map(|(n, t)| PropertySpec {
                name: n.into(),
                data_type: t.into(),
            })
    }

    fn arb_index() -> impl Strategy<Value = (IndexSpec, IndexActual)> {
        let class = || {
            (
                prop::sample::select(vec!["doc", "Doc", "image"]),
                prop::collection::vec(arb_property(), 0..4),
            )
                .prop_map(|(n, mut properties)| {
                    properties.dedup_by(|a, b| same_name(&a.name, &b.name));
                    let mut seen: Vec<String> = Vec::new();
                    properties.retain(|p| {
                        let fresh = !seen.iter().any(|s| same_name(s, &p.name));
                        seen.push(p.name.clone());
                        fresh
                    });
                    IndexClassSpec {
                        name: n.into(),
                        properties,
                    }
                })
        };
        (
            prop::collection::vec(class(), 0..3),
            prop::collection::vec(prop::option::of(class()), 0..3),
        )
            .prop_map(|(mut desired, found)| {
                let mut seen: Vec<String> = Vec::new();
                desired.retain(|c| {
                    let fresh = !seen.iter().any(|s| same_name(s, &c.name));
                    seen.push(c.name.clone());
                    fresh
                });
                let mut actual = IndexActual::default();
                for class in found.into_iter().flatten() {
                    let class = normalize_class(&class);
                    actual.classes.insert(
                        class.name.clone(),
                        Some(ClassState {
                            name: class.name.clone(),
                            properties: class.properties,
                        }),
                    );
                }
                (IndexSpec { classes: desired }, actual)
            })
    }

    proptest! {
        #[test]
        fn storage_second_diff_adds_nothing(desired in arb_storage_spec(), actual in arb_storage_actual()) {
            let steps = diff_storage(&desired, &actual);
            let (run, _withheld) = partition(steps.clone(), false);
            prop_assert!(run.iter().all(|step| step.safety() != Safety::Destructive));
            let after = simulate_storage(&actual, &run);
            let again = diff_storage(&desired, &after);
            prop_assert!(again.iter().all(|step| step.safety() == Safety::Destructive), "left: {again:?}");
            let after_all = simulate_storage(&actual, &steps);
            prop_assert!(diff_storage(&desired, &after_all).is_empty());
        }

        #[test]
        fn broker_second_diff_adds_nothing((desired, actual) in arb_broker()) {
            let steps = diff_broker(&desired, &actual);
            let (run, _withheld) = partition(steps.clone(), false);
            prop_assert!(run.iter().all(|step| step.safety() != Safety::Destructive));
            let after = simulate_broker(&actual, &run);
            let again = diff_broker(&desired, &after);
            prop_assert!(again.iter().all(|step| step.safety() == Safety::Destructive || step.is_reassertion()), "left: {again:?}");
            let after_all = simulate_broker(&actual, &steps);
            let left = diff_broker(&desired, &after_all);
            prop_assert!(left.iter().all(Step::is_reassertion), "left: {left:?}");
            // Exactly the bindings the adapter cannot observe are re-asserted, every time.
            let unknown = desired.bindings.iter().filter(|binding| after_all.bindings.get(&binding_key(binding)) == Some(&BindingCheck::Unknown)).count();
            prop_assert_eq!(left.len(), unknown);
        }

        #[test]
        fn index_second_diff_adds_nothing((desired, actual) in arb_index()) {
            let steps = diff_index(&desired, &actual);
            let (run, _withheld) = partition(steps.clone(), false);
            prop_assert!(run.iter().all(|step| step.safety() != Safety::Destructive));
            let after = simulate_index(&actual, &run);
            let again = diff_index(&desired, &after);
            prop_assert!(again.iter().all(|step| step.safety() == Safety::Destructive), "left: {again:?}");
            let after_all = simulate_index(&actual, &steps);
            prop_assert!(diff_index(&desired, &after_all).is_empty());
        }
    }
}
