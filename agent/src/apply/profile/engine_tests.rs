//! Engine behaviour with the default adapters: the seed matrix (cold start no-ops, repair after a
//! hand deletion, property added / needs migration), destructive gating, retries that fail
//! closed, events and fall forward.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use outpost_proto::bootstrap::BootstrapStepStatus;
use outpost_proto::name::Name;
use outpost_proto::profile::{EnvironmentProfile, LifecycleRule};

use super::diff::{Component, DestructivePolicy};
use super::engine::{
    Adapters, CollectingSink, Engine, Outcome, ReconcileReport, ReconcileRequest, RetryPolicy,
    RunMode, UnchangedPolicy,
};
use super::ports::{
    AdapterIdentity, BucketState, EventBus, IdempotencyKey, ObjectStorage, PortError,
    VersioningChange,
};
use super::{FsObjectStorage, InMemoryIndex, InProcessBus};

pub fn seed_profile() -> EnvironmentProfile {
    serde_json::from_str(
        r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile","metadata":{"name":"site"},
        "spec":{"storage":{"buckets":[{"name":"media","versioning":true,
          "lifecycle":[{"id":"tmp","prefix":"tmp/","expire_days":7}],"tags":{"team":"edge"}}]},
        "broker":{"exchanges":[{"name":"events","kind":"topic"}],
          "queues":[{"name":"ingest","message_ttl_ms":60000,"dead_letter_exchange":"events"}],
          "bindings":[{"exchange":"events","queue":"ingest","routing_key":"sensor.#"}]},
        "index":{"classes":[{"name":"document","properties":[{"name":"title","data_type":"text"}]}]}}}"#,
    )
    .unwrap()
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub adapters: Adapters,
    pub bus: InProcessBus,
    pub index: InMemoryIndex,
    pub sink: CollectingSink,
}

impl Harness {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bus = InProcessBus::new();
        let index = InMemoryIndex::new();
        let adapters = Adapters {
            storage: Box::new(FsObjectStorage::new(dir.path().join("storage"))),
            bus: Box::new(bus.clone()),
            index: Box::new(index.clone()),
            fall_forward_from: None,
        };
        Self {
            dir,
            adapters,
            bus,
            index,
            sink: CollectingSink::default(),
        }
    }

    pub fn run(
        &mut self,
        profile: &EnvironmentProfile,
        unchanged: UnchangedPolicy,
    ) -> ReconcileReport {
        self.run_with(
            profile,
            unchanged,
            DestructivePolicy::Withhold,
            RunMode::Apply,
        )
        .unwrap()
    }

    pub fn run_with(
        &mut self,
        profile: &EnvironmentProfile,
        unchanged: UnchangedPolicy,
        destructive: DestructivePolicy,
        mode: RunMode,
    ) -> Result<ReconcileReport, super::engine::ReconcileError> {
        let components: BTreeSet<Component> = Component::ORDER.into_iter().collect();
        let data_dir = self.dir.path().to_path_buf();
        let mut engine = Engine::new(
            Name::try_from("node-1").unwrap(),
            &data_dir,
            &mut self.adapters,
            &mut self.sink,
        );
        engine.retry = RetryPolicy {
            max_attempts: 3,
            base_delay_ms: 1,
            cap_delay_ms: 2,
        };
        engine.reconcile(&ReconcileRequest {
            profile,
            components: &components,
            unchanged,
            destructive,
            mode,
        })
    }
}

pub fn outcomes(report: &ReconcileReport) -> Vec<(Component, Outcome)> {
    report
        .components
        .iter()
        .map(|apply| (apply.component, apply.outcome))
        .collect()
}

fn all(outcome: Outcome) -> Vec<(Component, Outcome)> {
    Component::ORDER
        .into_iter()
        .map(|component| (component, outcome))
        .collect()
}

#[test]
fn cold_start_without_externals_applies_once_then_every_run_is_a_no_op() {
    let mut harness = Harness::new();
    let profile = seed_profile();
    let first = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(outcomes(&first), all(Outcome::Applied), "{first:#?}");
    assert!(first.services_may_start);
    let bucket = harness.dir.path().join("storage/media");
    assert!(bucket.is_dir());

    let verify = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(outcomes(&verify), all(Outcome::Unchanged), "{verify:#?}");
    assert!(verify.diff.is_empty());
    let skip = harness.run(&profile, UnchangedPolicy::Skip);
    assert_eq!(outcomes(&skip), all(Outcome::Skipped));

    // The last apply per component survives on disk for `status` and /internal/bootstrap/status.
    let status = super::ApplyStatus::read(harness.dir.path()).unwrap();
    let shown = status.to_bootstrap_status();
    assert_eq!(shown.applied.len(), 3);
    assert!(shown.errors.is_empty(), "{shown:?}");
}

#[test]
fn events_reach_the_sink_and_the_bus() {
    let mut harness = Harness::new();
    let profile = seed_profile();
    harness.run(&profile, UnchangedPolicy::VerifyActual);
    let starts = harness
        .sink
        .events
        .iter()
        .filter(|event| event.status == BootstrapStepStatus::Start)
        .count();
    let oks = harness
        .sink
        .events
        .iter()
        .filter(|event| event.status == BootstrapStepStatus::Ok)
        .count();
    assert_eq!((starts, oks), (3, 3), "{:#?}", harness.sink.events);
    assert!(
        harness
            .sink
            .events
            .iter()
            .all(|event| event.node_id == "node-1" && event.generation.is_some())
    );

    // A listener bound to the bootstrap exchange sees the next run's events.
    let mut bus = harness.bus.clone();
    let queue = outpost_proto::profile::QueueSpec {
        name: Name::try_from("listener").unwrap(),
        message_ttl_ms: None,
        dead_letter_exchange: None,
    };
    let key = IdempotencyKey("test".into());
    bus.declare_queue(&queue, &key).unwrap();
    bus.bind(
        &outpost_proto::profile::BindingSpec {
            exchange: Name::try_from(super::BOOTSTRAP_EXCHANGE).unwrap(),
            queue: queue.name.clone(),
            routing_key: "overlay.bootstrap.#".into(),
        },
        &key,
    )
    .unwrap();
    harness.run(&profile, UnchangedPolicy::VerifyActual);
    let message = bus
        .get("listener")
        .unwrap()
        .expect("a bootstrap event on the bus");
    assert_eq!(message.routing_key, "overlay.bootstrap.start");
    let event: outpost_proto::bootstrap::BootstrapEvent =
        serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(event.component, "storage");
    assert_eq!(message.idempotency_key.as_ref().map(String::len), Some(64));
}

#[test]
fn a_bucket_or_queue_deleted_by_hand_is_added_back() {
    let mut harness = Harness::new();
    let profile = seed_profile();
    harness.run(&profile, UnchangedPolicy::VerifyActual);
    std::fs::remove_dir_all(harness.dir.path().join("storage/media")).unwrap();
    harness
        .bus
        .clone()
        .delete_queue("ingest", &IdempotencyKey("by-hand".into()))
        .unwrap();

    let repaired = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(
        outcomes(&repaired),
        vec![
            (Component::Storage, Outcome::Applied),
            (Component::Broker, Outcome::Applied),
            (Component::Index, Outcome::Unchanged)
        ]
    );
    let broker = &repaired.components[1];
    assert_eq!(
        broker.steps_applied.len(),
        2,
        "queue declared and bound again: {broker:?}"
    );
    assert!(harness.dir.path().join("storage/media").is_dir());
    // The binding works again.
    let key = IdempotencyKey("k".into());
    let mut bus = harness.bus.clone();
    bus.publish("events", "sensor.door", b"open", &key).unwrap();
    assert_eq!(bus.get("ingest").unwrap().unwrap().payload, b"open");
}

/// Seed case "deleted by hand" for the seed profile's binding, against whatever bus the harness
/// has: `unbind_by_hand` removes the binding outside the engine, and the next verify must make
/// the exchange route `sensor.*` to the queue again. `observer` is a second handle on the same
/// broker. Returns the broker's apply for adapter-specific checks.
pub fn binding_removed_by_hand_comes_back(
    harness: &mut Harness,
    profile: &EnvironmentProfile,
    observer: &mut dyn EventBus,
    unbind_by_hand: impl FnOnce(),
) -> super::engine::ComponentApply {
    let exchange = profile.spec.broker.bindings[0].exchange.to_string();
    let queue = profile.spec.broker.bindings[0].queue.to_string();
    let key = IdempotencyKey("observer".into());
    let converged = harness.run(profile, UnchangedPolicy::VerifyActual);
    assert!(converged.services_may_start, "{converged:#?}");
    observer
        .publish(&exchange, "sensor.door", b"bound", &key)
        .unwrap();
    assert_eq!(
        super::contract_tests::wait_for_message(observer, &queue).payload,
        b"bound"
    );

    unbind_by_hand();
    observer
        .publish(&exchange, "sensor.door", b"lost", &key)
        .unwrap();
    assert_eq!(
        observer.get(&queue).unwrap(),
        None,
        "the binding really is gone: a confirmed publish was not routed"
    );

    let repaired = harness.run(profile, UnchangedPolicy::VerifyActual);
    let broker = repaired.components[1].clone();
    assert!(
        matches!(broker.outcome, Outcome::Applied | Outcome::Unchanged),
        "{broker:#?}"
    );
    observer
        .publish(&exchange, "sensor.door", b"back", &key)
        .unwrap();
    assert_eq!(
        super::contract_tests::wait_for_message(observer, &queue).payload,
        b"back",
        "the next apply bound the queue again"
    );
    broker
}

#[test]
fn a_binding_removed_by_hand_is_added_back() {
    let mut harness = Harness::new();
    let profile = seed_profile();
    let bus = harness.bus.clone();
    let binding = profile.spec.broker.bindings[0].clone();
    let broker =
        binding_removed_by_hand_comes_back(&mut harness, &profile, &mut bus.clone(), || {
            assert!(bus.unbind(&binding), "the binding existed")
        });
    // The in-process bus can list its bindings: the missing one is a step applied.
    assert_eq!(broker.outcome, Outcome::Applied, "{broker:#?}");
    assert_eq!(broker.steps_applied.len(), 1, "{broker:#?}");
    assert!(broker.steps_applied[0].contains("bind queue ingest"));
}

#[test]
fn a_new_property_is_added_and_an_incompatible_one_needs_migration() {
    let mut harness = Harness::new();
    let mut profile = seed_profile();
    harness.run(&profile, UnchangedPolicy::VerifyActual);

    profile.spec.index.classes[0]
        .properties
        .push(outpost_proto::profile::PropertySpec {
            name: "Pages".into(),
            data_type: "int".into(),
        });
    let added = harness.run(&profile, UnchangedPolicy::Skip);
    assert_eq!(outcomes(&added)[2], (Component::Index, Outcome::Applied));
    assert_eq!(
        outcomes(&added)[0],
        (Component::Storage, Outcome::Skipped),
        "other components keep their generation"
    );

    profile.spec.index.classes[0].properties[1].data_type = "text".into();
    let incompatible = harness.run(&profile, UnchangedPolicy::Skip);
    let index = &incompatible.components[2];
    assert_eq!(index.outcome, Outcome::NeedsAttention);
    assert_eq!(index.needs_migration.len(), 1);
    assert!(
        index.needs_migration[0].contains("needs migration"),
        "{index:?}"
    );
    assert!(
        incompatible.services_may_start,
        "needing a migration does not stop services"
    );
    let class = super::ports::VectorIndex::read_class(&mut harness.index.clone(), "Document")
        .unwrap()
        .unwrap();
    assert_eq!(class.properties[1].data_type, "int", "nothing was retyped");
    let shown = super::ApplyStatus::read(harness.dir.path())
        .unwrap()
        .to_bootstrap_status();
    assert!(
        shown
            .errors
            .iter()
            .any(|error| error.contains("needs migration")),
        "{shown:?}"
    );
}

#[test]
fn destructive_changes_need_allow_destructive_and_the_dry_run_hash() {
    let mut harness = Harness::new();
    let mut profile = seed_profile();
    harness.run(&profile, UnchangedPolicy::VerifyActual);
    profile.spec.storage.buckets[0].versioning = false;
    profile.spec.storage.buckets[0].lifecycle[0] = LifecycleRule {
        id: "tmp".into(),
        prefix: "tmp/".into(),
        expire_days: 1,
    };

    let dry = harness
        .run_with(
            &profile,
            UnchangedPolicy::Skip,
            DestructivePolicy::Withhold,
            RunMode::DryRun,
        )
        .unwrap();
    assert_eq!(dry.diff.len(), 2);
    assert!(
        dry.diff
            .iter()
            .all(|step| step.safety() == super::Safety::Destructive)
    );
    assert!(dry.diff[0].describe().contains("DESTRUCTIVE"));

    let normal = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(normal.components[0].outcome, Outcome::NeedsAttention);
    assert_eq!(normal.components[0].withheld.len(), 2);
    let state = read_bucket(&harness, "media");
    assert_eq!(
        state.versioning,
        super::ports::VersioningState::Enabled,
        "withheld on the default path"
    );

    let acknowledged = DestructivePolicy::Acknowledged {
        diff_hash: dry.diff_hash.clone(),
    };
    let refused = harness.run_with(
        &profile,
        UnchangedPolicy::Skip,
        acknowledged.clone(),
        RunMode::Apply,
    );
    assert!(
        matches!(
            refused,
            Err(super::ReconcileError::DestructiveNotAllowed { count: 2 })
        ),
        "{refused:?}"
    );

    profile.spec.allow_destructive = true;
    let wrong = DestructivePolicy::Acknowledged {
        diff_hash: "0".repeat(64),
    };
    let mismatch = harness.run_with(&profile, UnchangedPolicy::Skip, wrong, RunMode::Apply);
    assert!(
        matches!(
            mismatch,
            Err(super::ReconcileError::AcknowledgementMismatch { .. })
        ),
        "{mismatch:?}"
    );

    let applied = harness
        .run_with(
            &profile,
            UnchangedPolicy::Skip,
            acknowledged,
            RunMode::Apply,
        )
        .unwrap();
    assert_eq!(
        applied.components[0].outcome,
        Outcome::Applied,
        "{applied:#?}"
    );
    let state = read_bucket(&harness, "media");
    assert_eq!(state.versioning, super::ports::VersioningState::Suspended);
    assert_eq!(state.lifecycle[0].expire_days, Some(1));
}

fn read_bucket(harness: &Harness, bucket: &str) -> BucketState {
    FsObjectStorage::new(harness.dir.path().join("storage"))
        .read_bucket(bucket)
        .unwrap()
        .unwrap()
}

/// Test double: a storage that fails with a transient error a set number of times first.
struct FlakyStorage {
    inner: FsObjectStorage,
    failures_left: u32,
    calls: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl FlakyStorage {
    fn trip(&mut self) -> Result<(), PortError> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.failures_left > 0 {
            self.failures_left -= 1;
            return Err(PortError::transient("test", "flaky", "connection reset"));
        }
        Ok(())
    }
}

impl ObjectStorage for FlakyStorage {
    fn identity(&self) -> AdapterIdentity {
        self.inner.identity()
    }
    fn read_bucket(&mut self, bucket: &str) -> Result<Option<BucketState>, PortError> {
        self.trip()?;
        self.inner.read_bucket(bucket)
    }
    fn create_bucket(&mut self, bucket: &str, key: &IdempotencyKey) -> Result<(), PortError> {
        self.trip()?;
        self.inner.create_bucket(bucket, key)
    }
    fn set_versioning(
        &mut self,
        bucket: &str,
        change: VersioningChange,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.inner.set_versioning(bucket, change, key)
    }
    fn merge_lifecycle_rules(
        &mut self,
        bucket: &str,
        rules: &[LifecycleRule],
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.inner.merge_lifecycle_rules(bucket, rules, key)
    }
    fn merge_tags(
        &mut self,
        bucket: &str,
        tags: &BTreeMap<String, String>,
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.inner.merge_tags(bucket, tags, key)
    }
    fn put_object(
        &mut self,
        bucket: &str,
        object: &str,
        bytes: &[u8],
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.inner.put_object(bucket, object, bytes, key)
    }
    fn get_object(&mut self, bucket: &str, object: &str) -> Result<Option<Vec<u8>>, PortError> {
        self.inner.get_object(bucket, object)
    }
    fn list_objects(&mut self, bucket: &str) -> Result<Vec<String>, PortError> {
        self.inner.list_objects(bucket)
    }
}

fn flaky_harness(failures: u32) -> (Harness, std::sync::Arc<std::sync::atomic::AtomicU32>) {
    let mut harness = Harness::new();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    harness.adapters.storage = Box::new(FlakyStorage {
        inner: FsObjectStorage::new(harness.dir.path().join("storage")),
        failures_left: failures,
        calls: calls.clone(),
    });
    (harness, calls)
}

#[test]
fn transient_errors_are_retried_within_the_bound() {
    let (mut harness, calls) = flaky_harness(2);
    let report = harness.run(&seed_profile(), UnchangedPolicy::VerifyActual);
    assert_eq!(outcomes(&report), all(Outcome::Applied));
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        4,
        "2 failed reads, 1 read, 1 create"
    );
}

#[test]
fn persistent_errors_fail_closed_and_block_later_components() {
    let (mut harness, calls) = flaky_harness(u32::MAX);
    let report = harness.run(&seed_profile(), UnchangedPolicy::VerifyActual);
    assert_eq!(
        outcomes(&report),
        vec![
            (Component::Storage, Outcome::Failed),
            (Component::Broker, Outcome::Blocked),
            (Component::Index, Outcome::Blocked)
        ]
    );
    assert!(!report.services_may_start);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        3,
        "bounded attempts"
    );
    assert!(harness.sink.events.iter().any(|event| {
        event.status == BootstrapStepStatus::Error
            && event
                .message
                .as_deref()
                .is_some_and(|message| message.contains("connection reset"))
    }));
    let status = super::ApplyStatus::read(harness.dir.path()).unwrap();
    assert_eq!(
        status.components[&Component::Storage].outcome,
        Outcome::Failed
    );
}

#[test]
fn objects_fall_forward_to_a_new_store_once() {
    let mut harness = Harness::new();
    let profile = seed_profile();
    harness.run(&profile, UnchangedPolicy::VerifyActual);
    let key = IdempotencyKey("k".into());
    let mut local = FsObjectStorage::new(harness.dir.path().join("storage"));
    local
        .put_object("media", "photos/1.jpg", b"jpeg", &key)
        .unwrap();
    local
        .put_object("media", "notes.txt", b"hello", &key)
        .unwrap();

    // The "external" store here is a second directory tree: the engine only sees the port.
    let external_root = harness.dir.path().join("external");
    harness.adapters.storage = Box::new(FsObjectStorage::new(&external_root));
    harness.adapters.fall_forward_from = Some(local.clone());
    let first = harness.run(&profile, UnchangedPolicy::Skip);
    assert_eq!(
        first.components[0].outcome,
        Outcome::Applied,
        "a new adapter is a new generation"
    );
    assert_eq!(first.components[0].objects_copied, 2);
    let mut external = FsObjectStorage::new(&external_root);
    assert_eq!(
        external
            .get_object("media", "photos/1.jpg")
            .unwrap()
            .as_deref(),
        Some(&b"jpeg"[..])
    );

    let again = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(again.components[0].objects_copied, 0, "copied once");
    assert_eq!(again.components[0].outcome, Outcome::Unchanged);
    local
        .put_object("media", "notes.txt", b"changed", &key)
        .unwrap();
    let changed = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(
        changed.components[0].objects_copied, 1,
        "a changed local object is copied again"
    );
}

#[test]
fn the_reconcile_command_dry_runs_then_applies_with_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let mut profile = seed_profile();
    let profile_path = dir.path().join("profile.json");
    std::fs::write(&profile_path, serde_json::to_vec(&profile).unwrap()).unwrap();
    let environment = BTreeMap::from([("OUTPOST_NODE_ID".to_string(), "node-7".to_string())]);
    let run = |args: super::command::ReconcileArgs, data_dir: &Path| {
        let mut out = Vec::new();
        let code =
            super::command::run_reconcile_with(&args, data_dir, &environment, &mut out).unwrap();
        (code, String::from_utf8(out).unwrap())
    };
    let (code, out) = run(
        super::command::ReconcileArgs {
            dry_run: true,
            ..Default::default()
        },
        dir.path(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[storage] add: create bucket media"), "{out}");
    let (code, out) = run(super::command::ReconcileArgs::default(), dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("storage  applied"), "{out}");

    // Each command run starts a fresh in-process bus, so the broker is applied again each time;
    // storage lives on disk and is unchanged.
    profile.spec.storage.buckets[0].versioning = false;
    std::fs::write(&profile_path, serde_json::to_vec(&profile).unwrap()).unwrap();
    let (code, out) = run(
        super::command::ReconcileArgs {
            dry_run: true,
            ..Default::default()
        },
        dir.path(),
    );
    assert_eq!(code, 2, "{out}");
    let hash = out
        .lines()
        .find_map(|line| line.strip_prefix("diff hash: "))
        .unwrap()
        .to_string();
    assert!(
        out.contains("DESTRUCTIVE: suspend versioning on bucket media"),
        "{out}"
    );
    let error = super::command::run_reconcile_with(
        &super::command::ReconcileArgs {
            ack_destructive: Some(hash.clone()),
            ..Default::default()
        },
        dir.path(),
        &environment,
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("allow_destructive"),
        "{error:#}"
    );

    let missing = super::command::run_reconcile_with(
        &super::command::ReconcileArgs {
            profile: Some(dir.path().join("nope.json")),
            ..Default::default()
        },
        dir.path(),
        &environment,
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(format!("{missing:#}").contains("nope.json"), "{missing:#}");
}

#[test]
fn lifecycle_rules_expire_local_objects_on_each_apply() {
    let mut harness = Harness::new();
    let profile = seed_profile();
    harness.run(&profile, UnchangedPolicy::VerifyActual);
    let key = IdempotencyKey("k".into());
    let mut local = FsObjectStorage::new(harness.dir.path().join("storage"));
    local
        .put_object("media", "tmp/old.bin", b"x", &key)
        .unwrap();
    local.put_object("media", "keep.bin", b"x", &key).unwrap();
    let path = harness.dir.path().join("storage/media/tmp/old.bin");
    let eight_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(8 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(eight_days_ago)
        .unwrap();

    let report = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(report.components[0].objects_expired, 1);
    assert_eq!(
        report.components[0].outcome,
        Outcome::Unchanged,
        "expiry is not a profile change"
    );
    assert_eq!(local.list_objects("media").unwrap(), ["keep.bin"]);
    assert_eq!(
        local.list_versions("media", "tmp/old.bin").unwrap(),
        vec![b"x".to_vec()],
        "versioned: kept as a prior version"
    );
}

#[test]
fn an_invalid_profile_changes_nothing() {
    let mut harness = Harness::new();
    let profile = seed_profile();
    harness.run(&profile, UnchangedPolicy::VerifyActual);
    let before = super::ApplyStatus::read(harness.dir.path()).unwrap();
    let mut bad = profile.clone();
    bad.spec.broker.queues[0].message_ttl_ms = Some(0);
    let error = harness
        .run_with(
            &bad,
            UnchangedPolicy::VerifyActual,
            DestructivePolicy::Withhold,
            RunMode::Apply,
        )
        .unwrap_err();
    assert!(error.to_string().contains("message_ttl_ms"), "{error}");
    assert_eq!(
        super::ApplyStatus::read(harness.dir.path()).unwrap(),
        before
    );
    assert!(harness.dir.path().join("storage/media").is_dir());
}

/// The seed case "cold start with externals": S3 (moto), RabbitMQ and Weaviate (fake) together
/// are created once, then every run is a no-op.
#[cfg(all(feature = "s3", feature = "amqp", feature = "weaviate"))]
#[test]
fn cold_start_with_externals_creates_once_then_no_ops() {
    let moto = super::s3::tests::MotoServer::start();
    let weaviate = super::weaviate_fake::FakeWeaviate::start();
    let mut harness = Harness::new();
    harness.adapters.storage = Box::new(moto.storage());
    harness.adapters.bus =
        Box::new(super::amqp::RabbitMqBus::new("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap());
    harness.adapters.index = Box::new(super::weaviate::WeaviateIndex::new(&weaviate.url()));
    let mut profile = seed_profile();
    let exchange = super::contract_tests::unique("cold-x");
    let queue = super::contract_tests::unique("cold-q");
    let name = |text: &str| Name::try_from(text).unwrap();
    profile.spec.broker.exchanges[0].name = name(&exchange);
    profile.spec.broker.queues[0].name = name(&queue);
    profile.spec.broker.queues[0].dead_letter_exchange = Some(name(&exchange));
    profile.spec.broker.bindings[0].exchange = name(&exchange);
    profile.spec.broker.bindings[0].queue = name(&queue);

    let first = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(outcomes(&first), all(Outcome::Applied), "{first:#?}");
    let kinds: Vec<_> = first
        .components
        .iter()
        .map(|apply| apply.adapter.as_ref().unwrap().kind)
        .collect();
    use super::ports::AdapterKind;
    assert_eq!(
        kinds,
        [
            AdapterKind::S3,
            AdapterKind::RabbitMq,
            AdapterKind::Weaviate
        ]
    );
    let second = harness.run(&profile, UnchangedPolicy::VerifyActual);
    assert_eq!(outcomes(&second), all(Outcome::Unchanged), "{second:#?}");
    let third = harness.run(&profile, UnchangedPolicy::Skip);
    assert_eq!(outcomes(&third), all(Outcome::Skipped));

    let mut cleanup =
        super::amqp::RabbitMqBus::new("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
    let key = IdempotencyKey("cleanup".into());
    cleanup.delete_queue(&queue, &key).unwrap();
    cleanup.delete_exchange(&exchange, &key).unwrap();
}
