//! Supervisor tests: decisions against the recording double, then real processes (/bin/sleep).

use super::launcher::Launcher;
use super::runtime::recording::{Call, RecordingSyscalls};
use super::runtime::{ExitReason, RealSyscalls};
use super::*;
use crate::store::tests::{sample_allocation, sample_plan};
use outpost_proto::service::{ReadinessCheck, ReadinessProbe};

fn supervisor(kernel: &RecordingSyscalls, ledger: &MemoryLedger) -> Supervisor {
    Supervisor::new(
        "n1",
        PathBuf::from("/data"),
        Box::new(kernel.clone()),
        Box::new(ledger.clone()),
    )
}

fn with_readiness(mut allocation: Allocation, timeout_ms: u32) -> Allocation {
    allocation.spec.readiness = Some(ReadinessCheck {
        probe: ReadinessProbe::Tcp { port: 9 },
        timeout_ms,
        interval_ms: 100,
    });
    allocation
}

fn plan_of(allocations: Vec<Allocation>) -> Plan {
    let mut plan = sample_plan(0);
    plan.allocations = allocations;
    plan.allocations.sort_by(|a, b| a.id.cmp(&b.id));
    plan
}

fn state_of(supervisor: &Supervisor, id: &str) -> AllocationState {
    supervisor
        .reports()
        .into_iter()
        .find(|r| r.allocation_id == id)
        .map(|r| r.state)
        .unwrap()
}

#[test]
fn starts_with_env_dirs_and_records_the_process() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let mut allocation = sample_allocation("web-0", 0);
    allocation.spec.env.insert("GREETING".into(), "hi".into());
    sup.apply(&plan_of(vec![allocation]), Instant::now())
        .unwrap();
    let launch = kernel.kernel().launches[0].clone();
    assert_eq!(launch.env["GREETING"], "hi");
    assert_eq!(launch.env["OUTPOST_ALLOCATION_ID"], "web-0");
    assert_eq!(launch.env["OUTPOST_NODE_ID"], "n1");
    assert_eq!(launch.env["OUTPOST_SERVICE"], "web");
    assert_eq!(
        launch.working_dir,
        PathBuf::from("/data/allocations/web-0/work")
    );
    assert_eq!(launch.log_dir, PathBuf::from("/data/allocations/web-0"));
    let pid = kernel.pid_of("web-0").unwrap();
    assert_eq!(ledger.0.lock().unwrap()["web-0"].pid, pid);
    assert_eq!(state_of(&sup, "web-0"), AllocationState::Running);
    assert!(kernel.kernel().calls.contains(&Call::Confirm { pid }));
}

/// A ledger whose saves fail while `failing` is set (a full or damaged store).
#[derive(Clone, Default)]
struct FlakyLedger {
    records: MemoryLedger,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl ProcessLedger for FlakyLedger {
    fn save(&mut self, record: &ProcessRecord) -> Result<(), String> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("store: No space left on device".into());
        }
        self.records.save(record)
    }
    fn remove(&mut self, allocation_id: &str) -> Result<(), String> {
        self.records.remove(allocation_id)
    }
}

#[test]
fn a_start_that_cannot_be_recorded_is_called_off_and_retried() {
    let kernel = RecordingSyscalls::default();
    let ledger = FlakyLedger::default();
    ledger
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut sup = Supervisor::new(
        "n1",
        PathBuf::from("/data"),
        Box::new(kernel.clone()),
        Box::new(ledger.clone()),
    );
    let start = Instant::now();
    let error = sup
        .apply(&plan_of(vec![sample_allocation("web-0", 0)]), start)
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("web-0: cannot record the start of pid"),
        "{error}"
    );
    let pid = kernel.pid_of("web-0").unwrap();
    let calls = kernel.kernel().calls.clone();
    assert!(calls.contains(&Call::Abort { pid }), "{calls:?}");
    assert!(
        !calls.contains(&Call::Confirm { pid }),
        "no go-ahead for an unrecorded start: {calls:?}"
    );
    assert!(
        sup.notes()
            .iter()
            .any(|note| note.contains("No space left"))
    );
    let report = sup.reports().remove(0);
    assert_eq!(report.state, AllocationState::Backoff);
    assert!(report.message.contains("not started"), "{}", report.message);

    // The launcher is reaped; the allocation waits its backoff (800 ms with the double).
    sup.tick(start + Duration::from_millis(10));
    assert!(sup.is_idle());
    let report = sup.reports().remove(0);
    assert_eq!(report.state, AllocationState::Backoff);
    assert!(
        report.message.contains("cannot record the start"),
        "{}",
        report.message
    );
    assert_eq!(
        kernel.pid_of("web-0"),
        Some(pid),
        "no retry before the backoff"
    );

    // The store recovers: the next start is recorded and let go.
    ledger
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    sup.tick(start + Duration::from_millis(900));
    let second = kernel.pid_of("web-0").unwrap();
    assert_ne!(second, pid);
    assert!(
        kernel
            .kernel()
            .calls
            .contains(&Call::Confirm { pid: second })
    );
    assert_eq!(ledger.records.0.lock().unwrap()["web-0"].pid, second);
    assert_eq!(state_of(&sup, "web-0"), AllocationState::Running);
}

#[test]
fn profile_environment_reaches_new_processes_and_the_plan_env_wins() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let mut environment = ProfileEnvironment::default();
    environment.shared.insert(
        "OUTPOST_BUCKET_MEDIA_PATH".into(),
        "/data/storage/media".into(),
    );
    environment
        .shared
        .insert("GREETING".into(), "from profile".into());
    environment.per_service.insert(
        "web".into(),
        BTreeMap::from([("OUTPOST_MODULES".to_string(), "auth".to_string())]),
    );
    environment.per_service.insert(
        "db".into(),
        BTreeMap::from([("OUTPOST_MODULES".to_string(), "pg".to_string())]),
    );
    environment
        .shared
        .insert("OUTPOST_SERVICE".into(), "spoofed".into());
    sup.set_profile_environment(environment);
    let mut allocation = sample_allocation("web-0", 0);
    allocation.spec.env.insert("GREETING".into(), "hi".into());
    sup.apply(&plan_of(vec![allocation]), Instant::now())
        .unwrap();
    let launch = kernel.kernel().launches[0].clone();
    assert_eq!(
        launch.env["OUTPOST_BUCKET_MEDIA_PATH"],
        "/data/storage/media"
    );
    assert_eq!(launch.env["OUTPOST_MODULES"], "auth");
    assert_eq!(launch.env["GREETING"], "hi");
    assert_eq!(launch.env["OUTPOST_SERVICE"], "web");
}

#[test]
fn later_wave_waits_for_readiness_then_starts() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let plan = plan_of(vec![
        with_readiness(sample_allocation("db", 0), 10_000),
        sample_allocation("web", 1),
    ]);
    let start = Instant::now();
    sup.apply(&plan, start).unwrap();
    assert!(kernel.pid_of("db").is_some());
    assert!(kernel.pid_of("web").is_none());
    assert_eq!(state_of(&sup, "db"), AllocationState::Starting);
    assert_eq!(state_of(&sup, "web"), AllocationState::Pending);
    let web = sup
        .reports()
        .into_iter()
        .find(|r| r.allocation_id == "web")
        .unwrap();
    assert_eq!(web.message, "waiting for wave 0 to be ready");

    sup.tick(start + Duration::from_millis(200));
    assert!(kernel.pid_of("web").is_none(), "db is not ready yet");
    kernel.kernel().ready.insert("db".into(), true);
    sup.tick(start + Duration::from_millis(400));
    assert!(kernel.pid_of("web").is_some());
    assert_eq!(state_of(&sup, "db"), AllocationState::Running);
}

#[test]
fn unready_wave_is_reported_and_holds_the_next() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let plan = plan_of(vec![
        with_readiness(sample_allocation("db", 0), 300),
        sample_allocation("web", 1),
    ]);
    let start = Instant::now();
    sup.apply(&plan, start).unwrap();
    sup.tick(start + Duration::from_millis(500));
    assert_eq!(state_of(&sup, "db"), AllocationState::Unready);
    assert!(
        sup.reports()[0]
            .message
            .contains("readiness did not pass within 300 ms")
    );
    assert_eq!(state_of(&sup, "web"), AllocationState::Pending);
    // Becoming ready later opens the gate.
    kernel.kernel().ready.insert("db".into(), true);
    sup.tick(start + Duration::from_millis(700));
    assert!(kernel.pid_of("web").is_some());
}

#[test]
fn removed_allocation_gets_term_then_kill_after_grace() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let start = Instant::now();
    sup.apply(&plan_of(vec![sample_allocation("web-0", 0)]), start)
        .unwrap();
    let pid = kernel.pid_of("web-0").unwrap();
    kernel.kernel().ignore_term.push(pid);
    sup.apply(&plan_of(vec![]), start).unwrap();
    assert!(kernel.kernel().calls.contains(&Call::Signal {
        pgid: pid,
        signal: StopSignal::Terminate
    }));
    assert_eq!(sup.reports()[0].state, AllocationState::Stopped);
    sup.tick(start + Duration::from_millis(500));
    assert!(!kernel.kernel().calls.contains(&Call::Signal {
        pgid: pid,
        signal: StopSignal::Kill
    }));
    sup.tick(start + Duration::from_millis(1100));
    assert!(kernel.kernel().calls.contains(&Call::Signal {
        pgid: pid,
        signal: StopSignal::Kill
    }));
    sup.tick(start + Duration::from_millis(1200));
    assert!(sup.is_idle());
    assert!(sup.reports().is_empty());
    assert!(ledger.0.lock().unwrap().is_empty());
}

#[test]
fn changed_spec_restarts_the_process() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let start = Instant::now();
    sup.apply(&plan_of(vec![sample_allocation("web-0", 0)]), start)
        .unwrap();
    let first = kernel.pid_of("web-0").unwrap();
    let mut changed = sample_allocation("web-0", 0);
    changed.spec.args = vec!["7200".into()];
    sup.apply(&plan_of(vec![changed]), start).unwrap();
    assert!(kernel.kernel().calls.contains(&Call::Signal {
        pgid: first,
        signal: StopSignal::Terminate
    }));
    sup.tick(start + Duration::from_millis(10));
    let second = kernel.pid_of("web-0").unwrap();
    assert_ne!(first, second);
    assert_eq!(
        kernel.kernel().launches.last().unwrap().args,
        vec!["7200".to_string()]
    );
}

#[test]
fn crash_restarts_with_backoff_and_never_policy_gives_up() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let mut never = sample_allocation("once", 0);
    never.spec.restart = RestartPolicy::Never;
    let start = Instant::now();
    sup.apply(&plan_of(vec![sample_allocation("web-0", 0), never]), start)
        .unwrap();
    let (web, once) = (
        kernel.pid_of("web-0").unwrap(),
        kernel.pid_of("once").unwrap(),
    );
    kernel.exit(web, ExitReason::Code(3));
    kernel.exit(once, ExitReason::Code(1));
    sup.tick(start + Duration::from_millis(1));
    assert_eq!(state_of(&sup, "web-0"), AllocationState::Backoff);
    assert_eq!(state_of(&sup, "once"), AllocationState::Failed);
    // The double's randomness makes the first retry wait 800 ms.
    sup.tick(start + Duration::from_millis(700));
    assert_eq!(kernel.pid_of("web-0"), Some(web));
    sup.tick(start + Duration::from_millis(802));
    assert_ne!(kernel.pid_of("web-0"), Some(web));
    assert_eq!(state_of(&sup, "web-0"), AllocationState::Running);
    assert_eq!(
        sup.reports()
            .iter()
            .find(|r| r.allocation_id == "web-0")
            .unwrap()
            .restarts,
        1
    );
    assert_eq!(
        kernel.pid_of("once"),
        Some(once),
        "never policy does not restart"
    );
}

#[test]
fn spawn_failure_fails_the_apply_and_names_the_allocation() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    kernel.kernel().missing_programs.push("/nope".into());
    let mut sup = supervisor(&kernel, &ledger);
    let mut broken = sample_allocation("broken", 0);
    broken.spec.command = "/nope".into();
    let error = sup
        .apply(
            &plan_of(vec![broken, sample_allocation("web-0", 0)]),
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!(error.failures.len(), 1);
    assert!(
        error.to_string().contains("broken: cannot start \"/nope\""),
        "{error}"
    );
    assert_eq!(state_of(&sup, "broken"), AllocationState::Backoff);
    assert!(kernel.pid_of("web-0").is_some());
}

#[test]
fn adoption_keeps_live_processes_and_forgets_dead_ones() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    kernel.kernel().alive.insert(500, 7);
    let mut sup = supervisor(&kernel, &ledger);
    let plan = plan_of(vec![
        sample_allocation("web-0", 0),
        sample_allocation("web-1", 0),
    ]);
    let records = vec![
        ProcessRecord {
            allocation_id: "web-0".into(),
            pid: 500,
            start_ticks: 7,
            spec_hash: plan.allocations[0].spec_hash(),
            restarts: 2,
            ports: Default::default(),
        },
        // pid reused by another process: different start time.
        ProcessRecord {
            allocation_id: "web-1".into(),
            pid: 501,
            start_ticks: 9,
            spec_hash: plan.allocations[1].spec_hash(),
            restarts: 0,
            ports: Default::default(),
        },
    ];
    let (adopted, gone) = sup.adopt(records, &plan, Instant::now());
    assert_eq!(
        (adopted, gone),
        (vec!["web-0".to_string()], vec!["web-1".to_string()])
    );
    sup.apply(&plan, Instant::now()).unwrap();
    let spawns: Vec<_> = kernel
        .kernel()
        .calls
        .iter()
        .filter(|c| matches!(c, Call::Spawn { .. }))
        .cloned()
        .collect();
    assert_eq!(
        spawns.len(),
        1,
        "only the dead one is started again: {spawns:?}"
    );
    let report = sup
        .reports()
        .into_iter()
        .find(|r| r.allocation_id == "web-0")
        .unwrap();
    assert!(report.adopted);
    assert_eq!(report.pid, Some(500));
    assert_eq!(report.restarts, 2);
}

#[test]
fn drift_lists_missing_allocations() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    sup.apply(
        &plan_of(vec![
            with_readiness(sample_allocation("db", 0), 5000),
            sample_allocation("web", 1),
        ]),
        Instant::now(),
    )
    .unwrap();
    let drift = sup.drift();
    assert_eq!((drift.desired, drift.running), (2, 0));
    assert_eq!(drift.missing, vec!["db".to_string(), "web".to_string()]);
}

/// Kills leftover real processes even when a test fails.
struct GroupGuard(Vec<i32>);
impl Drop for GroupGuard {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn real_supervisor(dir: &std::path::Path, ledger: &MemoryLedger) -> Supervisor {
    let sys = RealSyscalls::new(1 << 20, Err("test".into()), Launcher::Direct);
    Supervisor::new(
        "n1",
        dir.to_path_buf(),
        Box::new(sys),
        Box::new(ledger.clone()),
    )
}

#[test]
fn real_processes_start_stop_and_are_adopted_by_a_new_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = MemoryLedger::default();
    let mut sleeper = sample_allocation("sleeper", 0);
    sleeper.spec.command = "/bin/sh".into();
    sleeper.spec.args = vec![
        "-c".into(),
        "echo started $OUTPOST_ALLOCATION_ID; exec sleep 60".into(),
    ];
    sleeper.spec.stop_grace_ms = 2000;
    let plan = plan_of(vec![sleeper]);
    let mut first = real_supervisor(dir.path(), &ledger);
    first.apply(&plan, Instant::now()).unwrap();
    let pid = first.reports()[0].pid.unwrap();
    let mut guard = GroupGuard(vec![pid]);
    let stdout = dir.path().join("allocations/sleeper/stdout.log");
    wait_until("the process writes its log", || {
        std::fs::read_to_string(&stdout)
            .unwrap_or_default()
            .contains("started sleeper")
    });
    assert!(dir.path().join("allocations/sleeper/work").is_dir());

    // The agent goes away without stopping anything; a new one adopts the process.
    drop(first);
    assert!(
        procfs::live_start_ticks(pid).is_some(),
        "the process outlives its supervisor"
    );
    let records: Vec<ProcessRecord> = ledger.0.lock().unwrap().values().cloned().collect();
    let mut second = real_supervisor(dir.path(), &ledger);
    let (adopted, _) = second.adopt(records, &plan, Instant::now());
    assert_eq!(adopted, vec!["sleeper".to_string()]);
    second.apply(&plan, Instant::now()).unwrap();
    assert_eq!(
        second.reports()[0].pid,
        Some(pid),
        "adopted, not duplicated"
    );
    assert!(second.reports()[0].adopted);

    // Stopping an adopted process works through its group and /proc.
    second.stop_all(Instant::now());
    wait_until("the adopted process stops", || {
        second.tick(Instant::now());
        second.is_idle()
    });
    assert!(procfs::live_start_ticks(pid).is_none());
    guard.0.clear();
}

#[test]
fn real_process_ignoring_sigterm_is_killed_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = MemoryLedger::default();
    let mut stubborn = sample_allocation("stubborn", 0);
    stubborn.spec.command = "/bin/sh".into();
    stubborn.spec.args = vec![
        "-c".into(),
        "trap '' TERM; echo armed; while true; do sleep 1; done".into(),
    ];
    stubborn.spec.stop_grace_ms = 300;
    let mut sup = real_supervisor(dir.path(), &ledger);
    sup.apply(&plan_of(vec![stubborn]), Instant::now()).unwrap();
    let pid = sup.reports()[0].pid.unwrap();
    let _guard = GroupGuard(vec![pid]);
    let stdout = dir.path().join("allocations/stubborn/stdout.log");
    wait_until("the trap is armed", || {
        std::fs::read_to_string(&stdout)
            .unwrap_or_default()
            .contains("armed")
    });
    sup.stop_all(Instant::now());
    wait_until("SIGKILL ends it", || {
        sup.tick(Instant::now());
        sup.is_idle()
    });
    assert!(procfs::live_start_ticks(pid).is_none());
}

#[test]
fn real_crash_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = MemoryLedger::default();
    let mut crasher = sample_allocation("crasher", 0);
    crasher.spec.command = "/bin/sh".into();
    crasher.spec.args = vec![
        "-c".into(),
        "echo run >> runs; test $(wc -l < runs) -ge 2 && exec sleep 60; exit 1".into(),
    ];
    let mut sup = real_supervisor(dir.path(), &ledger);
    sup.apply(&plan_of(vec![crasher]), Instant::now()).unwrap();
    wait_until("restarted and running", || {
        sup.tick(Instant::now());
        let report = &sup.reports()[0];
        report.restarts >= 1
            && report.state == AllocationState::Running
            && report.pid.is_some_and(|pid| {
                procfs::live_start_ticks(pid).is_some()
                    && std::fs::read_to_string(dir.path().join("allocations/crasher/work/runs"))
                        .unwrap_or_default()
                        .lines()
                        .count()
                        >= 2
            })
    });
    let _guard = GroupGuard(vec![sup.reports()[0].pid.unwrap()]);
    sup.stop_all(Instant::now());
    wait_until("stopped", || {
        sup.tick(Instant::now());
        sup.is_idle()
    });
}

#[test]
fn a_fixed_spec_starts_at_once_despite_the_old_backoff() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let start = Instant::now();
    sup.apply(&plan_of(vec![sample_allocation("web-0", 0)]), start)
        .unwrap();
    let first = kernel.pid_of("web-0").unwrap();
    kernel.exit(first, ExitReason::Code(1));
    sup.tick(start + Duration::from_millis(1));
    assert_eq!(state_of(&sup, "web-0"), AllocationState::Backoff);
    let mut fixed = sample_allocation("web-0", 0);
    fixed.spec.args = vec!["60".into()];
    sup.apply(&plan_of(vec![fixed]), start + Duration::from_millis(2))
        .unwrap();
    assert_ne!(
        kernel.pid_of("web-0"),
        Some(first),
        "started without waiting out the backoff"
    );
    assert_eq!(state_of(&sup, "web-0"), AllocationState::Running);
}

#[test]
fn probe_attempts_get_the_checks_own_timeout_up_to_the_maximum() {
    let check = |timeout_ms| ReadinessCheck {
        probe: ReadinessProbe::Tcp { port: 9 },
        timeout_ms,
        interval_ms: 100,
    };
    assert_eq!(
        probe_attempt_timeout(&check(1_500)),
        Duration::from_millis(1_500)
    );
    assert_eq!(
        probe_attempt_timeout(&check(600_000)),
        PROBE_ATTEMPT_TIMEOUT_MAX
    );

    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let start = Instant::now();
    sup.apply(
        &plan_of(vec![with_readiness(sample_allocation("db", 0), 2_500)]),
        start,
    )
    .unwrap();
    sup.tick(start);
    assert_eq!(
        kernel.kernel().probe_timeouts,
        vec![Duration::from_millis(2_500)]
    );
}

#[test]
fn deferred_probes_run_once_per_process_and_stale_results_are_dropped() {
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let start = Instant::now();
    let plan = plan_of(vec![
        with_readiness(sample_allocation("db", 0), 10_000),
        sample_allocation("web", 1),
    ]);
    sup.apply(&plan, start).unwrap();
    let jobs = sup.tick_deferring_probes(start);
    assert_eq!(jobs.len(), 1);
    assert!(
        sup.tick_deferring_probes(start + Duration::from_millis(500))
            .is_empty(),
        "one probe per process at a time"
    );
    // The process is replaced before its probe answers: the answer is for the old one.
    let old = kernel.pid_of("db").unwrap();
    kernel.exit(old, ExitReason::Code(1));
    sup.tick_deferring_probes(start + Duration::from_millis(600));
    // Restarted after its backoff (800 ms with the double), and probed at once.
    let new_jobs = sup.tick_deferring_probes(start + Duration::from_millis(1500));
    assert_ne!(kernel.pid_of("db"), Some(old));
    assert_eq!(new_jobs.len(), 1);
    sup.probe_finished(jobs[0].clone(), Ok(()), start + Duration::from_millis(1600));
    assert_eq!(state_of(&sup, "db"), AllocationState::Starting);
    assert!(kernel.pid_of("web").is_none());
    // The new process's own probe passes: the next wave starts.
    sup.probe_finished(
        new_jobs[0].clone(),
        Ok(()),
        start + Duration::from_millis(1800),
    );
    sup.tick_deferring_probes(start + Duration::from_millis(1900));
    assert_eq!(state_of(&sup, "db"), AllocationState::Running);
    assert!(kernel.pid_of("web").is_some());
}

/// An HTTP server on loopback that holds its first answer until `release` is sent, and answers
/// every request `200` no sooner than `answer_after` after accepting it. `requested` gets a
/// message per request.
fn slow_http_server(
    answer_after: Duration,
) -> (
    u16,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (requested_tx, requested) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut first = true;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let accepted = Instant::now();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = requested_tx.send(());
            if std::mem::take(&mut first) && released.recv().is_err() {
                return;
            }
            // The slow server: it answers only once `answer_after` has passed.
            std::thread::sleep(answer_after.saturating_sub(accepted.elapsed()));
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (port, requested, release)
}

#[test]
fn a_slow_http_probe_passes_and_never_holds_the_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = MemoryLedger::default();
    let (port, requested, release) = slow_http_server(Duration::from_millis(1_500));
    let mut db = sample_allocation("db", 0);
    db.spec.command = "/bin/sleep".into();
    db.spec.args = vec!["60".into()];
    db.spec.readiness = Some(ReadinessCheck {
        probe: ReadinessProbe::Http {
            port,
            path: "/ready".into(),
        },
        // Longer than the wait for a free lock below, so a probe run under the lock fails it.
        timeout_ms: 20_000,
        interval_ms: 200,
    });
    let mut web = sample_allocation("web", 1);
    web.spec.command = "/bin/sleep".into();
    web.spec.args = vec!["60".into()];
    let shared = Arc::new(std::sync::Mutex::new(real_supervisor(dir.path(), &ledger)));
    shared
        .lock()
        .unwrap()
        .apply(&plan_of(vec![db, web]), Instant::now())
        .unwrap();
    let mut guard = GroupGuard(vec![shared.lock().unwrap().reports()[0].pid.unwrap()]);

    // The supervision thread, as the agent runs it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let supervision = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            let probes = probes::OffLockProbes::default();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                probes.round(&shared, Instant::now(), |_| ());
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    requested
        .recv_timeout(Duration::from_secs(10))
        .expect("the probe reached the server");
    // The server holds its answer: status and stop must not wait for it.
    wait_until(
        "the supervisor lock to be free while the probe waits",
        || shared.try_lock().is_ok(),
    );
    let reports = shared.lock().unwrap().reports();
    assert_eq!(reports[0].state, AllocationState::Starting);
    assert_eq!(reports[1].state, AllocationState::Pending);

    release.send(()).unwrap();
    wait_until("the slow probe to pass and open the next wave", || {
        let reports = shared.lock().unwrap().reports();
        reports[0].state == AllocationState::Running && reports[1].pid.is_some()
    });
    let reports = shared.lock().unwrap().reports();
    assert_eq!(reports[0].message, "ready");
    guard.0.push(reports[1].pid.unwrap());

    shared.lock().unwrap().stop_all(Instant::now());
    wait_until("both stop", || shared.lock().unwrap().is_idle());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    supervision.join().unwrap();
    guard.0.clear();
}

#[test]
fn limits_unavailable_is_a_note_and_the_process_runs_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = MemoryLedger::default();
    let mut allocation = sample_allocation("limited", 0);
    allocation.spec.command = "/bin/sleep".into();
    allocation.spec.args = vec!["60".into()];
    allocation.spec.memory_bytes = 64 << 20;

    // A host without a cgroup2 file system at the root: the reason is a note from the start.
    let probed = cgroup::CgroupTree::probe(dir.path());
    let sys = RealSyscalls::new(1 << 20, probed, Launcher::Direct);
    let sup = Supervisor::new(
        "n1",
        dir.path().to_path_buf(),
        Box::new(sys),
        Box::new(ledger.clone()),
    );
    let notes = sup.notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("cgroup limits unavailable: ")
            && notes[0].contains("is not a cgroup2 file system"),
        "{notes:?}"
    );

    // A tree that breaks when an allocation's cgroup is made (here: a file where its folder
    // goes): the process still starts, without limits, and the note says why.
    let tree = cgroup::CgroupTree::at(dir.path().join("cgroup")).unwrap();
    std::fs::write(tree.allocation_dir("limited"), b"in the way").unwrap();
    let sys = RealSyscalls::new(1 << 20, Ok(tree), Launcher::Direct);
    let mut sup = Supervisor::new(
        "n1",
        dir.path().to_path_buf(),
        Box::new(sys),
        Box::new(ledger.clone()),
    );
    assert!(sup.notes().is_empty(), "limits were available at first");
    sup.apply(&plan_of(vec![allocation]), Instant::now())
        .unwrap();
    let pid = sup.reports()[0].pid.unwrap();
    let mut guard = GroupGuard(vec![pid]);
    assert!(procfs::live_start_ticks(pid).is_some());
    assert_eq!(sup.reports()[0].state, AllocationState::Running);
    let notes = sup.notes();
    assert!(
        notes.len() == 1
            && notes[0].starts_with("cgroup limits unavailable: cannot create ")
            && notes[0].contains("limited"),
        "{notes:?}"
    );
    sup.stop_all(Instant::now());
    wait_until("stopped", || {
        sup.tick(Instant::now());
        sup.is_idle()
    });
    guard.0.clear();
}

/// A ledger that counts its writes.
#[derive(Clone, Default)]
struct CountingLedger {
    records: MemoryLedger,
    writes: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl ProcessLedger for CountingLedger {
    fn save(&mut self, record: &ProcessRecord) -> Result<(), String> {
        self.save_all(std::slice::from_ref(record))
    }
    fn remove(&mut self, allocation_id: &str) -> Result<(), String> {
        self.remove_all(&[allocation_id])
    }
    fn save_all(&mut self, records: &[ProcessRecord]) -> Result<(), String> {
        self.writes.lock().unwrap().push(records.len());
        records
            .iter()
            .try_for_each(|record| self.records.save(record))
    }
    fn remove_all(&mut self, allocation_ids: &[&str]) -> Result<(), String> {
        self.writes.lock().unwrap().push(allocation_ids.len());
        allocation_ids
            .iter()
            .try_for_each(|id| self.records.remove(id))
    }
}

#[test]
fn a_rounds_starts_and_the_dead_found_at_boot_are_each_one_ledger_write() {
    let kernel = RecordingSyscalls::default();
    let ledger = CountingLedger::default();
    let mut sup = Supervisor::new(
        "n1",
        PathBuf::from("/data"),
        Box::new(kernel.clone()),
        Box::new(ledger.clone()),
    );
    let plan = plan_of(vec![
        sample_allocation("a", 0),
        sample_allocation("b", 0),
        sample_allocation("c", 0),
        sample_allocation("d", 1),
    ]);
    // Two records of processes that died with the previous agent (a power cut).
    let dead = |id: &str, pid| ProcessRecord {
        allocation_id: id.into(),
        pid,
        start_ticks: 7,
        spec_hash: "old".into(),
        restarts: 0,
        ports: Default::default(),
    };
    let (adopted, gone) = sup.adopt(vec![dead("a", 1), dead("b", 2)], &plan, Instant::now());
    assert!(adopted.is_empty());
    assert_eq!(gone.len(), 2);
    sup.apply(&plan, Instant::now()).unwrap();
    // One write forgets both dead; wave 0's three starts are one write, wave 1's one more.
    assert_eq!(*ledger.writes.lock().unwrap(), vec![2, 3, 1]);
    let calls = kernel.kernel().calls.clone();
    let confirms = calls
        .iter()
        .filter(|call| matches!(call, Call::Confirm { .. }))
        .count();
    assert_eq!(confirms, 4, "{calls:?}");
    assert_eq!(ledger.records.0.lock().unwrap().len(), 4);
}

#[test]
fn declared_ports_are_handed_over_kept_and_reported() {
    use outpost_proto::service::ServicePort;
    let port = |name: &str, port| ServicePort {
        name: outpost_proto::Name::try_from(name).unwrap(),
        port,
    };
    // Fixed ports as declared; port 0 picked once and kept across starts.
    let declared = vec![port("http", 0), port("admin", 9100)];
    let mut picks = vec![41000u16, 42000].into_iter();
    let first = assign_ports(&declared, &BTreeMap::new(), || picks.next());
    assert_eq!(first["http"], 41000);
    assert_eq!(first["admin"], 9100);
    let again = assign_ports(&declared, &first, || Some(1));
    assert_eq!(again, first, "a restart keeps the picked port");
    assert!(assign_ports(&[port("http", 0)], &BTreeMap::new(), || None).is_empty());

    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let mut allocation = sample_allocation("web-0", 0);
    allocation.spec.ports = vec![port("http", 0), port("metrics-v2", 9100)];
    sup.apply(&plan_of(vec![allocation]), Instant::now())
        .unwrap();
    let launch = kernel.kernel().launches[0].clone();
    let picked: u16 = launch.env["OUTPOST_PORT_HTTP"].parse().unwrap();
    assert_ne!(picked, 0);
    assert_eq!(launch.env["OUTPOST_PORT_METRICS_V2"], "9100");
    let reported = &sup.statuses()[0].ports;
    assert!(
        reported
            .iter()
            .any(|p| p.name.as_str() == "http" && p.port == picked),
        "{reported:?}"
    );
}

/// A secret whose ciphertext was changed on its way (or in the store) is refused at spawn: the
/// process does not start with garbage, the allocation reports backoff naming the secret, and
/// no secret file is written.
#[test]
fn a_tampered_secret_starts_nothing_and_is_reported() {
    use outpost_proto::hash::{from_hex, to_hex};
    use outpost_proto::secret::{NodeSecret, SecretValues, seal_for_node, sealing_public_key};
    let (kernel, ledger) = (RecordingSyscalls::default(), MemoryLedger::default());
    let mut sup = supervisor(&kernel, &ledger);
    let dir = tempfile::tempdir().unwrap();
    let key = [7u8; 32];
    sup.set_secrets(
        key,
        crate::apply::secret::SecretsRoot {
            dir: dir.path().join("secrets"),
            on_tmpfs: false,
        },
    );
    let mut allocation = sample_allocation("web-0", 0);
    allocation.spec.secrets = serde_json::from_str(
        r#"[{"name":"db","env":{"DB_PASSWORD":"password"},"files":{"pw.txt":"password"}}]"#,
    )
    .unwrap();
    let values = SecretValues(std::collections::BTreeMap::from([(
        "password".to_string(),
        "tampered-s3cret".to_string(),
    )]));
    let mut sealed = seal_for_node(
        &sealing_public_key(&key),
        "n1",
        "db",
        1,
        &values,
        [3; 32],
        [4; 24],
    );
    let mut bytes = from_hex(&sealed.ciphertext).unwrap();
    bytes[2] ^= 0x10;
    sealed.ciphertext = to_hex(&bytes);
    let mut plan = plan_of(vec![allocation]);
    plan.secrets = vec![NodeSecret {
        name: "db".try_into().unwrap(),
        version: 1,
        seq: 1,
        sealed,
    }];
    let _ = sup.apply(&plan, Instant::now());
    assert!(
        kernel.kernel().launches.is_empty(),
        "a process started with a secret that does not open"
    );
    let report = sup
        .reports()
        .into_iter()
        .find(|r| r.allocation_id == "web-0")
        .unwrap();
    assert_eq!(report.state, AllocationState::Backoff);
    assert!(
        report.message.contains("secret db refused"),
        "{}",
        report.message
    );
    assert!(!report.message.contains("s3cret"), "{}", report.message);
    let written: Vec<_> = std::fs::read_dir(dir.path().join("secrets"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "secret files written: {written:?}");
}
