//! Profile runner tests: the pure parts (event forwarding, status records, timing), then whole
//! runs against a real redb store and the default adapters in a temp dir.

use super::*;
use crate::config::Settings;

fn event(component: &str, action: &str, status: BootstrapStepStatus) -> BootstrapEvent {
    BootstrapEvent {
        node_id: Name::try_from("n1").unwrap(),
        component: component.into(),
        action: action.into(),
        status,
        message: None,
        generation: Some("g".into()),
    }
}

fn accept_all(sink: &mut OutboxSink<Vec<BootstrapEvent>>, events: &[BootstrapEvent]) {
    for event in events {
        sink.accept(event);
    }
}

#[test]
fn changes_only_forwarding_drops_quiet_components_and_keeps_the_rest_in_order() {
    use BootstrapStepStatus::{Error, Ok, Start};
    let run = [
        event("storage", "reconcile", Start),
        event("storage", "apply", Ok),
        event("broker", "reconcile", Start),
        event("broker", "noop", Ok),
        event("index", "reconcile", Start),
        event("index", "read_actual", Error),
    ];
    let mut sink = OutboxSink::new(Vec::new(), Forwarding::ChangesOnly);
    accept_all(&mut sink, &run);
    assert_eq!(sink.forwarded, 4);
    let forwarded: Vec<(String, String)> = sink
        .into_queue()
        .into_iter()
        .map(|e| (e.component, e.action))
        .collect();
    assert_eq!(
        forwarded,
        [
            ("storage", "reconcile"),
            ("storage", "apply"),
            ("index", "reconcile"),
            ("index", "read_actual"),
        ]
        .map(|(c, a)| (c.to_string(), a.to_string()))
    );
    let mut all = OutboxSink::new(Vec::new(), Forwarding::All);
    accept_all(&mut all, &run);
    assert_eq!(all.into_queue().len(), run.len());
}

#[test]
fn triggers_choose_policies() {
    assert_eq!(
        Trigger::Boot.unchanged_policy(),
        UnchangedPolicy::VerifyActual
    );
    assert_eq!(
        Trigger::Periodic.unchanged_policy(),
        UnchangedPolicy::VerifyActual
    );
    assert_eq!(Trigger::Fetched.unchanged_policy(), UnchangedPolicy::Skip);
    assert_eq!(Trigger::Retry.unchanged_policy(), UnchangedPolicy::Skip);
    assert_eq!(Trigger::Periodic.forwarding(), Forwarding::ChangesOnly);
    assert_eq!(Trigger::Fetched.forwarding(), Forwarding::All);
}

fn component_apply(outcome: Outcome) -> ComponentApply {
    ComponentApply {
        component: crate::apply::profile::Component::Broker,
        outcome,
        generation: "new".into(),
        applied_generation: Some("old".into()),
        adapter: None,
        steps_applied: Vec::new(),
        drift: Vec::new(),
        needs_migration: Vec::new(),
        withheld: Vec::new(),
        objects_copied: 0,
        objects_expired: 0,
        message: Some("amqp refused".into()),
        finished_at_unix: 7,
        duration_ms: 1,
    }
}

#[test]
fn status_records_keep_skips_quiet_and_name_failures() {
    assert_eq!(status_record(&component_apply(Outcome::Skipped)), None);
    assert_eq!(status_record(&component_apply(Outcome::OutOfScope)), None);
    let failed = status_record(&component_apply(Outcome::Failed)).unwrap();
    assert_eq!(failed.status, ApplyOutcome::Error);
    assert_eq!(failed.generation, "new");
    assert_eq!(failed.message, "failed: amqp refused");
    assert_eq!(failed.at_unix, 7);
    let mut applied = component_apply(Outcome::Applied);
    applied.applied_generation = Some("new".into());
    let applied = status_record(&applied).unwrap();
    assert_eq!(
        (applied.status, applied.generation.as_str()),
        (ApplyOutcome::Ok, "new")
    );
}

#[test]
fn clock_fetches_on_a_new_session_then_by_interval_and_backs_off_retries() {
    let start = Instant::now();
    let poll = Duration::from_secs(30);
    let verify = Duration::from_secs(600);
    let mut clock = Clock::new(start);
    let at = |secs: u64| start + Duration::from_secs(secs);
    assert_eq!(
        clock.due(at(1), false, false, true, poll, verify),
        Due::default()
    );
    assert!(clock.due(at(2), true, false, true, poll, verify).fetch);
    assert!(!clock.due(at(3), true, false, true, poll, verify).fetch);
    assert!(clock.due(at(32), true, false, true, poll, verify).fetch);
    // The session drops and comes back (registered again): fetch at once.
    assert!(!clock.due(at(33), false, false, true, poll, verify).fetch);
    assert!(clock.due(at(34), true, false, true, poll, verify).fetch);

    // Retries: after 30 s, then 60 s, then 120 s.
    assert!(!clock.due(at(20), false, true, true, poll, verify).retry);
    assert!(clock.due(at(30), false, true, true, poll, verify).retry);
    clock.ran(at(30), Trigger::Retry);
    assert!(!clock.due(at(80), false, true, true, poll, verify).retry);
    assert!(clock.due(at(90), false, true, true, poll, verify).retry);
    clock.ran(at(90), Trigger::Retry);
    assert!(!clock.due(at(200), false, true, true, poll, verify).retry);
    assert!(clock.due(at(210), false, true, true, poll, verify).retry);
    // Converged: the next failure starts again from `poll`.
    clock.due(at(211), false, false, true, poll, verify);
    clock.ran(at(211), Trigger::Fetched);
    assert!(clock.due(at(241), false, true, true, poll, verify).retry);

    // Verification every 600 s after the last one, only with a profile.
    assert!(!clock.due(at(599), false, false, true, poll, verify).verify);
    assert!(!clock.due(at(600), false, false, false, poll, verify).verify);
    assert!(clock.due(at(600), false, false, true, poll, verify).verify);
    clock.ran(at(600), Trigger::Periodic);
    assert!(!clock.due(at(601), false, false, true, poll, verify).verify);
}

const PROFILE: &str = r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile",
  "metadata":{"name":"site"},
  "spec":{
    "storage":{"buckets":[{"name":"media","versioning":true}]},
    "broker":{"exchanges":[{"name":"events"}],"queues":[{"name":"thumbs","message_ttl_ms":60000}],
              "bindings":[{"exchange":"events","queue":"thumbs","routing_key":"media.#"}]},
    "index":{"classes":[{"name":"article","properties":[{"name":"title","data_type":"text"}]}]},
    "services":[{"service":"api","modules":["auth"],"migrations":["001_init"]}]}}"#;

struct Fixture {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    config: AgentConfig,
    store: Arc<Store>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_path_buf();
    let mut settings = Settings::new();
    settings.insert("data_dir".into(), data_dir.display().to_string());
    let config = AgentConfig::from_settings(&settings).unwrap();
    let (store, _) = Store::open_for_boot(&data_dir).unwrap();
    Fixture {
        _dir: dir,
        data_dir,
        config,
        store: Arc::new(store),
    }
}

impl Fixture {
    fn boot(&self) -> ProfileRunner {
        self.boot_with(&BTreeMap::new())
    }

    fn boot_with(&self, environment: &BTreeMap<String, String>) -> ProfileRunner {
        ProfileRunner::boot(&self.config, "n1", self.store.clone(), environment)
    }

    /// Takes every queued event out of the outbox.
    fn drain_outbox(&self) -> Vec<BootstrapEvent> {
        let events = self.store.peek_outbox(1000).unwrap();
        if let Some((last, _)) = events.last() {
            self.store.remove_outbox_through(*last).unwrap();
        }
        events.into_iter().map(|(_, event)| event).collect()
    }
}

fn records_by_component(
    records: Vec<(String, crate::store::ComponentApply)>,
) -> BTreeMap<String, crate::store::ComponentApply> {
    records.into_iter().collect()
}

#[test]
fn boot_applies_the_cached_profile_and_reports_every_component() {
    let f = fixture();
    std::fs::write(f.data_dir.join(CACHED_PROFILE_FILE), PROFILE).unwrap();
    let mut runner = f.boot();
    assert!(runner.converged(), "{:?}", runner.notes());
    assert!(f.data_dir.join("storage").join("media").is_dir());
    assert_eq!(
        std::fs::read_to_string(f.data_dir.join(NODE_ID_FILE)).unwrap(),
        "n1\n"
    );
    let records = records_by_component(runner.take_records());
    for component in ["storage", "broker", "index", PROFILE_COMPONENT] {
        assert_eq!(
            records[component].status,
            ApplyOutcome::Ok,
            "{component}: {}",
            records[component].message
        );
    }
    let profile: EnvironmentProfile = serde_json::from_str(PROFILE).unwrap();
    assert_eq!(
        records[PROFILE_COMPONENT].generation,
        profile_generation(&profile)
    );
    let events = f.drain_outbox();
    for component in ["storage", "broker", "index"] {
        let ok = events
            .iter()
            .find(|e| e.component == component && e.status == BootstrapStepStatus::Ok)
            .unwrap_or_else(|| panic!("no ok event for {component} in {events:?}"));
        assert_eq!(ok.generation.as_ref(), Some(&records[component].generation));
    }
    assert!(events.iter().any(|e| e.component == PROFILE_COMPONENT));

    let environment = runner.environment();
    assert_eq!(
        environment.shared["OUTPOST_BUCKET_MEDIA_PATH"],
        f.data_dir
            .join("storage")
            .join("media")
            .display()
            .to_string()
    );
    assert_eq!(environment.per_service["api"]["OUTPOST_MODULES"], "auth");
}

#[test]
fn same_profile_is_a_no_op_and_a_new_one_skips_unchanged_components() {
    let f = fixture();
    std::fs::write(f.data_dir.join(CACHED_PROFILE_FILE), PROFILE).unwrap();
    let mut runner = f.boot();
    runner.take_records();
    f.drain_outbox();
    let profile: EnvironmentProfile = serde_json::from_str(PROFILE).unwrap();
    assert!(!runner.take_profile(profile.clone()));

    let mut renamed = profile;
    renamed.metadata.name = "site-v2".into();
    assert!(runner.take_profile(renamed.clone()));
    let cached = read_profile(&f.data_dir.join(CACHED_PROFILE_FILE)).unwrap();
    assert_eq!(cached, renamed);
    let report = runner.reconcile(Trigger::Fetched).unwrap();
    assert!(
        report
            .components
            .iter()
            .all(|apply| apply.outcome == Outcome::Skipped),
        "{report:?}"
    );
    let records = records_by_component(runner.take_records());
    assert_eq!(
        records.keys().collect::<Vec<_>>(),
        [PROFILE_COMPONENT],
        "skipped components keep their records"
    );
    assert_eq!(
        records[PROFILE_COMPONENT].generation,
        profile_generation(&renamed)
    );
    let events = f.drain_outbox();
    assert_eq!(events.len(), 1, "{events:?}");
}

#[test]
fn periodic_check_repairs_a_deleted_bucket_and_reports_only_the_repair() {
    let f = fixture();
    std::fs::write(f.data_dir.join(CACHED_PROFILE_FILE), PROFILE).unwrap();
    let mut runner = f.boot();
    runner.take_records();
    f.drain_outbox();
    let bucket = f.data_dir.join("storage").join("media");
    std::fs::remove_dir_all(&bucket).unwrap();

    let report = runner.reconcile(Trigger::Periodic).unwrap();
    assert!(bucket.is_dir());
    let storage = &report.components[0];
    assert_eq!(storage.outcome, Outcome::Applied, "{storage:?}");
    let events = f.drain_outbox();
    assert!(
        events
            .iter()
            .filter(|e| e.component != PROFILE_COMPONENT)
            .all(|e| e.component == "storage"),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e.component == "storage"));

    // Nothing to repair: nothing for control.
    runner.reconcile(Trigger::Periodic).unwrap();
    assert_eq!(f.drain_outbox(), Vec::new());
}

#[test]
fn a_failed_component_blocks_the_rest_and_the_retry_converges() {
    let f = fixture();
    std::fs::write(f.data_dir.join(CACHED_PROFILE_FILE), PROFILE).unwrap();
    // The default storage cannot create its root: a file is in the way.
    std::fs::write(f.data_dir.join("storage"), b"not a directory").unwrap();
    let mut runner = f.boot();
    assert!(!runner.converged());
    assert!(runner.retry_wanted());
    let records = records_by_component(runner.take_records());
    assert_eq!(records["storage"].status, ApplyOutcome::Error);
    assert_eq!(records["broker"].status, ApplyOutcome::Error);
    assert!(
        records["broker"].message.contains("blocked"),
        "{}",
        records["broker"].message
    );
    assert_eq!(records[PROFILE_COMPONENT].status, ApplyOutcome::Error);
    let note = runner.notes().join("\n");
    assert!(
        note.contains("storage failed") && note.contains("services started anyway"),
        "{note}"
    );

    std::fs::remove_file(f.data_dir.join("storage")).unwrap();
    let report = runner.reconcile(Trigger::Retry).unwrap();
    assert!(report.services_may_start, "{report:?}");
    assert!(runner.converged());
    assert!(runner.notes().is_empty(), "{:?}", runner.notes());
    let records = records_by_component(runner.take_records());
    assert_eq!(records["storage"].status, ApplyOutcome::Ok);
    assert_eq!(records["index"].status, ApplyOutcome::Ok);
    assert_eq!(records[PROFILE_COMPONENT].status, ApplyOutcome::Ok);
}

#[test]
fn unusable_cache_or_adapter_settings_are_notes_not_failures() {
    let f = fixture();
    let mut runner = f.boot();
    assert!(
        runner.take_records().is_empty(),
        "no profile, nothing to do"
    );
    assert!(runner.notes().is_empty());
    runner.fetch_failed("control answered 503 projection_lagging");
    let note = runner.notes().join("\n");
    assert!(
        note.contains("503 projection_lagging") && note.contains("no profile applied yet"),
        "{note}"
    );
    let profile: EnvironmentProfile = serde_json::from_str(PROFILE).unwrap();
    assert!(runner.take_profile(profile));
    assert!(runner.notes().is_empty(), "{:?}", runner.notes());

    std::fs::write(f.data_dir.join(CACHED_PROFILE_FILE), b"{not json").unwrap();
    let runner = f.boot();
    let note = runner.notes().join("\n");
    assert!(note.contains("cached profile unusable"), "{note}");
    assert_eq!(runner.profile_generation(), None);

    std::fs::write(f.data_dir.join(CACHED_PROFILE_FILE), PROFILE).unwrap();
    let environment =
        BTreeMap::from([("OUTPOST_PROFILE_COMPONENTS".to_string(), "disk".to_string())]);
    let mut runner = f.boot_with(&environment);
    let records = records_by_component(runner.take_records());
    assert_eq!(records[PROFILE_COMPONENT].status, ApplyOutcome::Error);
    assert!(
        records[PROFILE_COMPONENT].message.contains("\"disk\""),
        "{}",
        records[PROFILE_COMPONENT].message
    );
    assert!(
        !runner.retry_wanted(),
        "a settings error does not heal by retrying"
    );
    assert!(!f.data_dir.join("storage").join("media").exists());
}

/// The boot run goes on its own thread; boot stops waiting for it after its wait, also when an
/// external broker accepts the connection and never answers.
#[cfg(feature = "amqp")]
#[test]
fn boot_stops_waiting_for_a_boot_run_held_by_a_blackholed_broker() {
    let f = fixture();
    std::fs::write(
        f.data_dir.join(CACHED_PROFILE_FILE),
        r#"{"apiVersion":"outpost/v1","kind":"EnvironmentProfile","metadata":{"name":"site"},
            "spec":{"broker":{"exchanges":[{"name":"events"}]}}}"#,
    )
    .unwrap();
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blackhole.local_addr().unwrap().port();
    let environment = BTreeMap::from([(
        "AMQP_URL".to_string(),
        format!("amqp://guest:guest@127.0.0.1:{port}/"),
    )]);
    let runner = ProfileRunner::prepare(&f.config, "n1", f.store.clone(), &environment);
    assert_eq!(runner.profile_generation().map(str::len), Some(64));
    let thread = runner.start_boot_run().unwrap();
    // The broker's connection is accepted (by the backlog) and never answered.
    let (held, _) = blackhole.accept().unwrap();
    assert_eq!(
        thread.wait_for_boot_run(Duration::from_millis(200)),
        BootRun::StillRunning
    );
    assert!(still_running_note(BOOT_RUN_WAIT).starts_with(NOTE_PREFIX));
    // The broker goes away: the run ends (with the broker failed).
    drop(held);
    drop(blackhole);
    assert_eq!(
        thread.wait_for_boot_run(Duration::from_secs(30)),
        BootRun::Ended
    );
}
