//! The site thread (D2, D6, D7): looks for control over mDNS, falls back to the configured URL,
//! and otherwise claims leadership (or runs solo when it may not lead). It follows the control
//! it chose until that stops answering, looks again periodically, leads (runs and supervises
//! `outpost-control`, renews the lease) until outranked, and reports each step in status and on
//! stderr. The sync threads do the registering; this thread only says where control is, by
//! writing its URL and pinned CA into the node's identity.

use std::collections::BTreeSet;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::node::Role;

use anyhow::Context;
use sha2::{Digest, Sha256};

use super::standby::{self, StandbyLog};
use super::transport::{Transport, first_lan_address};
use super::{Claim, LeaseRecord, Message, MessageKind, Observed, claim_epoch, observe};
use crate::config::AgentConfig;
use crate::config::site::{DiscoveryMode, Leadership};
use crate::discovery::advert::{self, Advert, TrustAnchors};
use crate::discovery::mdns;
use crate::discovery::pacing::Rediscovery;
use crate::enroll::Enrollment;
use crate::leader::{self, ControlChild, StartFrom};
use crate::link::pinning::{der_to_pem, fetch_pinned_ca, host_port, pem_to_der};
use crate::node::{Bell, NodeState};
use crate::status::{ControlState, StatusBoard};
use crate::store::Store;

/// What the `site` thread (discovery, election, leading) needs of the running agent.
#[derive(Clone)]
pub struct SiteParts {
    pub config: Arc<AgentConfig>,
    pub store: Arc<Store>,
    pub board: StatusBoard,
    pub node: Arc<NodeState>,
    /// Rung after pointing the node at another control: register there now.
    pub heartbeat: Arc<Bell>,
    pub enrollment: Enrollment,
}

/// How long one mDNS browse waits for answers.
pub const BROWSE_DEADLINE: Duration = Duration::from_millis(1500);
/// Probes of the followed control, and how many failed ones in a row mean it is gone.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_FAILURES_LOST: u32 = 3;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a claim is broadcast and listened on before it counts as won.
const CLAIM_WINDOW: Duration = Duration::from_millis(1200);
const CONTROL_READY_TIMEOUT: Duration = Duration::from_secs(30);
const CONTROL_RESTARTS_MAX: u32 = 5;

/// Whether this agent looks for control over mDNS and may elect itself (see `DiscoveryMode`).
pub fn active(config: &AgentConfig) -> bool {
    match config.site.discovery {
        DiscoveryMode::Off => false,
        DiscoveryMode::Mdns => true,
        // Only site members browse and elect by default: an agent started with nothing (a
        // bench, an image check) or pointed at a control stays off the LAN's multicast.
        DiscoveryMode::Auto => config.site.join_secret.is_some(),
    }
}

/// Starts the site thread when discovery is active.
pub fn spawn(agent: &SiteParts) -> anyhow::Result<()> {
    if !active(&agent.config) {
        if let Some(why) = enrolls_nowhere(agent) {
            say(agent, why);
        }
        return Ok(());
    }
    let agent = agent.clone();
    std::thread::Builder::new()
        .name("site".into())
        .spawn(move || Site::new(agent).run())
        .context("cannot start the site thread")?;
    Ok(())
}

/// Why a node that does not browse can never enroll: no site join secret, no enrollment token,
/// no control URL and no credential from an earlier registration. `None` when it has a way in.
fn enrolls_nowhere(agent: &SiteParts) -> Option<String> {
    let config = &agent.config;
    let registered = agent.node.identity_lock().node_credential.is_some();
    let has_way_in = registered
        || config.site.join_secret.is_some()
        || config.enroll_token.is_some()
        || config.control_url.is_some();
    (!has_way_in).then(|| {
        "discovery: this node enrolls nowhere: it has no site join secret (--join-secret), no enrollment token (--enroll) and no control url (--control), and was never registered".to_string()
    })
}

fn say(agent: &SiteParts, text: String) {
    tracing::info!(component = "site", action = "note", "{text}");
    agent.board.update(|s| s.note(text));
}

/// The control this node follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub ca_fingerprint: String,
    pub epoch: u64,
}

/// Whose control a node adopts: the standby copy follows only another node's control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whose {
    Another,
    Own,
}

/// The election side of a leader-capable node: the socket and this node's lease record.
struct Election {
    transport: Arc<Transport>,
    record: Arc<Mutex<Option<LeaseRecord>>>,
    started: Instant,
    ttl: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Election {
    fn start(agent: &SiteParts) -> Result<Self, String> {
        let site = &agent.config.site;
        let transport = Transport::bind(site.election_port, site.join_secret.clone())
            .map_err(|e| format!("cannot bind the election port {}: {e}", site.election_port))?;
        let election = Self {
            transport: Arc::new(transport),
            record: Arc::new(Mutex::new(None)),
            started: Instant::now(),
            ttl: Duration::from_secs(site.lease_ttl_secs),
        };
        let (transport, record, started) = (
            election.transport.clone(),
            election.record.clone(),
            election.started,
        );
        let listener_agent = agent.clone();
        std::thread::Builder::new()
            .name("election".into())
            .spawn(move || listen(&listener_agent, &transport, &record, started))
            .map_err(|e| format!("cannot start the election thread: {e}"))?;
        Ok(election)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn record(&self) -> Option<LeaseRecord> {
        lock(&self.record).clone()
    }

    fn message(&self, kind: MessageKind, claim: &Claim, url: &str, from: &str) -> Message {
        Message {
            kind,
            claim: claim.clone(),
            ttl_ms: self.ttl.as_millis() as u64,
            url: url.to_string(),
            from: from.to_string(),
        }
    }

    /// Applies our own message to our record and broadcasts it.
    fn announce(&self, agent: &SiteParts, message: &Message) -> Observed {
        let observed = observe(&mut lock(&self.record), message, self.now_ms());
        if let Err(error) = self.transport.send(message) {
            agent.board.update(|s| s.note(format!("election: {error}")));
        }
        observed
    }

    /// Claims at `epoch`: broadcasts the claim during the claim window and wins if no better
    /// claim or lease was heard by its end.
    fn claim(&self, agent: &SiteParts, epoch: u64) -> Option<Claim> {
        let me = agent.node.node_id();
        let claim = Claim {
            epoch,
            node_id: me.clone(),
        };
        say(
            agent,
            format!("election: claiming leadership at epoch {epoch}"),
        );
        let message = self.message(MessageKind::Claim, &claim, "", &me);
        let deadline = Instant::now() + CLAIM_WINDOW;
        for _ in 0..3 {
            if self.announce(agent, &message) == Observed::Ignored {
                break;
            }
            std::thread::sleep(CLAIM_WINDOW / 3);
        }
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        match self.record() {
            Some(record) if record.holder == claim => Some(claim),
            Some(record) => {
                say(
                    agent,
                    format!(
                        "election: lost the claim at epoch {epoch} to {} at epoch {}",
                        record.holder.node_id, record.holder.epoch
                    ),
                );
                None
            }
            None => None,
        }
    }
}

/// The election listener: applies every datagram to the record, answers claimants that are
/// behind with the record.
fn listen(
    agent: &SiteParts,
    transport: &Transport,
    record: &Mutex<Option<LeaseRecord>>,
    started: Instant,
) {
    let mut refused_from = BTreeSet::new();
    loop {
        let Some(received) = transport.receive(Duration::from_millis(500)) else {
            continue;
        };
        let me = agent.node.node_id();
        let message = match received {
            Ok(message) if message.from == me => continue,
            Ok(message) => message,
            Err(error) => {
                // Once per sender, so a misconfigured neighbour does not flood the log.
                let sender = error.rsplit("(from ").next().unwrap_or("").to_string();
                if refused_from.len() < 64 && refused_from.insert(sender) {
                    say(agent, format!("election: ignored a datagram: {error}"));
                }
                continue;
            }
        };
        let now_ms = started.elapsed().as_millis() as u64;
        let mut guard = lock(record);
        let before = guard.as_ref().map(|r| r.holder.clone());
        let observed = observe(&mut guard, &message, now_ms);
        if super::should_answer_with_record(guard.as_ref(), &message, observed, now_ms)
            && let Some(current) = guard.as_ref()
        {
            let answer = Message {
                kind: MessageKind::Known,
                claim: current.holder.clone(),
                ttl_ms: current.expires_at_ms.saturating_sub(now_ms),
                url: current.url.clone(),
                from: me.clone(),
            };
            let _ = transport.send(&answer);
        }
        let after = guard.as_ref().map(|r| r.holder.clone());
        drop(guard);
        if observed == Observed::Took && before != after {
            say(
                agent,
                format!(
                    "election: {} holds the lease at epoch {} (heard from {})",
                    message.claim.node_id, message.claim.epoch, message.from
                ),
            );
        }
    }
}

/// What the site thread is doing.
enum State {
    Searching,
    Following {
        target: Target,
        failures: u32,
        next_look: Instant,
    },
    Leading(Box<Leading>),
    Solo {
        next_look: Instant,
    },
}

struct Leading {
    child: ControlChild,
    claim: Claim,
    next_renewal: Instant,
    role_set: bool,
    restarts: u32,
}

struct Site {
    agent: SiteParts,
    election: Option<Election>,
    /// Why this node does not lead, shown in status while it runs solo.
    solo_reason: String,
    /// The control the standby thread copies: another node's control this node follows, never
    /// its own (a leader's copy of its own log would be seeded into its next control as if it
    /// came from elsewhere). `None` while leading, searching or solo.
    standby_source: Arc<Mutex<Option<Target>>>,
    pacing: Rediscovery,
    logged: BTreeSet<String>,
    last_role: Role,
}

/// Whether a TCP connection to the URL's host and port opens within the probe timeout.
pub fn reachable(url: &str) -> bool {
    let Some((host, port)) = host_port(url) else {
        return false;
    };
    let Ok(mut addresses) = (host.as_str(), port).to_socket_addrs() else {
        return false;
    };
    addresses.any(|address| TcpStream::connect_timeout(&address, PROBE_TIMEOUT).is_ok())
}

impl Site {
    fn new(agent: SiteParts) -> Self {
        if let Some(pid) = leader::stop_orphan(&agent.config.data_dir) {
            say(
                &agent,
                format!(
                    "leader: stopped outpost-control (pid {pid}) left running by a previous agent"
                ),
            );
        }
        let (election, solo_reason) = match (
            agent.config.site.leadership,
            agent.config.site.join_secret.is_some(),
        ) {
            (Leadership::Never, _) => (None, "this node may not lead (may_lead no)".to_string()),
            // A control without the secret could admit no node (no operator makes tokens on an
            // offline site), and unsigned election datagrams could be forged by anyone.
            (Leadership::MayLead, false) => {
                let reason = "this node has no site join secret, so it does not lead: a control it started could admit no node".to_string();
                say(&agent, format!("election: {reason}"));
                (None, reason)
            }
            (Leadership::MayLead, true) => match Election::start(&agent) {
                Ok(election) => (Some(election), String::new()),
                Err(error) => {
                    say(
                        &agent,
                        format!("election: {error}; this node will not lead"),
                    );
                    (None, format!("this node cannot lead: {error}"))
                }
            },
        };
        let standby_source = Arc::new(Mutex::new(None));
        if election.is_some() {
            let (standby_agent, standby_target) = (agent.clone(), standby_source.clone());
            let _ = std::thread::Builder::new()
                .name("standby".into())
                .spawn(move || follow_standby(&standby_agent, &standby_target));
        }
        let last_role = agent.board.snapshot().role;
        Self {
            agent,
            election,
            solo_reason,
            standby_source,
            pacing: Rediscovery::default(),
            logged: BTreeSet::new(),
            last_role,
        }
    }

    fn run(mut self) {
        let mut state = State::Searching;
        loop {
            self.watch_role();
            state = match state {
                State::Searching => self.search(),
                State::Following {
                    target,
                    failures,
                    next_look,
                } => self.follow(target, failures, next_look),
                State::Leading(leading) => self.lead(*leading),
                State::Solo { next_look } => self.solo(next_look),
            };
        }
    }

    /// Role changes are events (D3): noted in status and logged.
    fn watch_role(&mut self) {
        let role = self.agent.board.snapshot().role;
        if role != self.last_role {
            say(
                &self.agent,
                format!(
                    "role changed from {} to {}",
                    self.last_role.as_str(),
                    role.as_str()
                ),
            );
            self.last_role = role;
        }
    }

    fn anchors(&self) -> TrustAnchors {
        let identity = self.agent.node.identity_lock().clone();
        TrustAnchors {
            pinned_ca_fingerprint: identity
                .ca_pem
                .as_deref()
                .and_then(pem_to_der)
                .map(|der| crate::os::hex(&Sha256::digest(&der))),
            token_ca_fingerprint: self.agent.config.enroll_token.as_deref().and_then(|token| {
                outpost_proto::enroll::EnrollmentClaims::parse(token)
                    .ok()
                    .map(|claims| claims.ca_fingerprint.to_ascii_lowercase())
            }),
            join_secret: self.agent.config.site.join_secret.clone(),
        }
    }

    /// Browses once and returns the trusted, reachable advertisement to follow, if any.
    fn look(&mut self) -> Option<Advert> {
        let answers = match mdns::browse(BROWSE_DEADLINE) {
            Ok(answers) => answers,
            Err(error) => {
                self.log_once(format!("discovery: {error}"));
                return None;
            }
        };
        let anchors = self.anchors();
        let mut trusted = Vec::new();
        for answer in answers {
            match advert::parse_txt(&answer.instance, &answer.txt)
                .and_then(|a| advert::trust(&a, &anchors).map(|reason| (a, reason)))
            {
                Ok((advert, reason)) => {
                    self.log_once(format!(
                        "discovery: control at {} (epoch {}) is trusted: {}",
                        advert.fields.url,
                        advert.fields.epoch,
                        reason.as_str()
                    ));
                    trusted.push(advert);
                }
                Err(why) => self.log_once(format!("discovery: {why}")),
            }
        }
        trusted.retain(|a| reachable(&a.fields.url));
        advert::choose(&trusted).cloned()
    }

    fn log_once(&mut self, text: String) {
        if self.logged.len() < 256 && self.logged.insert(text.clone()) {
            say(&self.agent, text);
        }
    }

    /// Points the node at a control: pins its CA and writes URL and CA into the identity, so
    /// the sync threads register there (with the credential, else the join secret). Only
    /// another node's control becomes the standby thread's source.
    fn adopt(&mut self, target: &Target, whose: Whose) -> Result<(), String> {
        let identity = self.agent.node.identity_lock().clone();
        let pinned = identity
            .ca_pem
            .as_deref()
            .and_then(pem_to_der)
            .map(|der| crate::os::hex(&Sha256::digest(&der)));
        let same = identity.control_url.as_deref() == Some(target.url.as_str())
            && pinned.as_deref() == Some(target.ca_fingerprint.as_str());
        if !same {
            let ca_der = fetch_pinned_ca(&target.url, &target.ca_fingerprint, PROBE_TIMEOUT * 5)
                .map_err(|e| e.to_string())?;
            let moved = crate::store::Identity {
                control_url: Some(target.url.clone()),
                ca_pem: Some(der_to_pem(&ca_der)),
                revoked: false,
                ..identity
            };
            self.agent
                .store
                .save_identity(&moved)
                .map_err(|e| format!("cannot save the identity: {e}"))?;
            *self.agent.node.identity_lock() = moved;
            self.agent.enrollment.invalidate();
            // Register with the new control now rather than at the next heartbeat.
            self.agent.heartbeat.ring();
        }
        *lock(&self.standby_source) = match whose {
            Whose::Another => Some(target.clone()),
            Whose::Own => None,
        };
        self.agent
            .board
            .update(|s| s.control.url = Some(target.url.clone()));
        Ok(())
    }

    fn search(&mut self) -> State {
        if let Some(found) = self.look() {
            let target = Target {
                url: found.fields.url.clone(),
                ca_fingerprint: found.fields.ca_fingerprint.clone(),
                epoch: found.fields.epoch,
            };
            match self.adopt(&target, Whose::Another) {
                Ok(()) => {
                    say(
                        &self.agent,
                        format!(
                            "discovery: following control at {} (epoch {})",
                            target.url, target.epoch
                        ),
                    );
                    return State::Following {
                        target,
                        failures: 0,
                        next_look: Instant::now() + self.pacing.next_pause(),
                    };
                }
                Err(error) => self.log_once(format!(
                    "discovery: cannot pin control at {}: {error}",
                    target.url
                )),
            }
        }
        if let Some(url) = self.agent.config.control_url.clone()
            && reachable(&url)
        {
            self.log_once(format!(
                "discovery: no trusted control advertised over mDNS; using the configured control url {url}"
            ));
            let target = Target {
                url,
                ca_fingerprint: String::new(),
                epoch: 0,
            };
            return State::Following {
                target,
                failures: 0,
                next_look: Instant::now() + self.pacing.next_pause(),
            };
        }
        let Some(election) = &self.election else {
            return State::Solo {
                next_look: Instant::now(),
            };
        };
        let me = self.agent.node.node_id();
        let record = election.record();
        let listened_enough =
            election.started.elapsed() >= election.ttl / 3 + Duration::from_secs(1);
        match claim_epoch(record.as_ref(), &me, election.now_ms()) {
            None => {
                if let Some(record) = record {
                    self.agent.board.update(|s| {
                        s.control.state = ControlState::Searching;
                        s.control.last_error = Some(format!(
                            "{} leads at epoch {} but its control was not found yet",
                            record.holder.node_id, record.holder.epoch
                        ));
                    });
                }
                State::Searching
            }
            Some(_) if !listened_enough => {
                std::thread::sleep(Duration::from_millis(300));
                State::Searching
            }
            Some(epoch) => match election.claim(&self.agent, epoch) {
                Some(claim) => self.become_leader(claim),
                None => State::Searching,
            },
        }
    }

    fn become_leader(&mut self, claim: Claim) -> State {
        let Some(ip) = self
            .agent
            .config
            .site
            .advertise_ip
            .or_else(first_lan_address)
        else {
            say(
                &self.agent,
                "election: won, but this host has no LAN IPv4 address to serve control on".into(),
            );
            self.release(&claim, "");
            return State::Searching;
        };
        let config = &self.agent.config;
        let control_dir = leader::control_data_dir(&config.data_dir);
        let desired = StandbyLog::new(&config.data_dir).desired_state();
        let served_before = leader::served_epoch(&control_dir);
        let led_last = served_before.is_some_and(|served| served + 1 >= claim.epoch);
        let from = if desired.events == 0 || led_last {
            StartFrom::Previous
        } else {
            StartFrom::Fresh
        };
        say(
            &self.agent,
            starting_state(from, served_before, desired.events),
        );
        let mut child = match leader::start(config, claim.epoch, ip, from) {
            Ok(child) => child,
            Err(error) => {
                say(&self.agent, format!("election: won, but {error}"));
                self.release(&claim, "");
                return State::Searching;
            }
        };
        if let Err(error) = child.wait_ready(CONTROL_READY_TIMEOUT) {
            say(&self.agent, format!("election: won, but {error}"));
            child.stop();
            self.release(&claim, "");
            return State::Searching;
        }
        if let Some(election) = &self.election {
            let me = self.agent.node.node_id();
            election.announce(
                &self.agent,
                &election.message(MessageKind::Lease, &claim, &child.url, &me),
            );
        }
        say(
            &self.agent,
            format!(
                "leader at epoch {}: serving outpost-control (pid {}) at {}",
                claim.epoch,
                child.pid(),
                child.url
            ),
        );
        if from == StartFrom::Fresh {
            match seed_control(&child, &desired) {
                Ok(applied) => say(
                    &self.agent,
                    format!(
                        "leader: seeded control from the standby log ({} events folded, {applied} documents applied)",
                        desired.events
                    ),
                ),
                Err(error) => say(
                    &self.agent,
                    format!("leader: cannot seed control from the standby log: {error}"),
                ),
            }
        }
        let Some(fingerprint) = leader::ca_fingerprint(&child.data_dir) else {
            say(&self.agent, "leader: control wrote no admin/ca.pem".into());
            child.stop();
            self.release(&claim, "");
            return State::Searching;
        };
        let target = Target {
            url: child.url.clone(),
            ca_fingerprint: fingerprint,
            epoch: claim.epoch,
        };
        if let Err(error) = self.adopt(&target, Whose::Own) {
            say(
                &self.agent,
                format!("leader: cannot use its own control: {error}"),
            );
        }
        State::Leading(Box::new(Leading {
            child,
            claim,
            next_renewal: Instant::now(),
            role_set: false,
            restarts: 0,
        }))
    }

    fn release(&self, claim: &Claim, url: &str) {
        if let Some(election) = &self.election {
            let me = self.agent.node.node_id();
            election.announce(
                &self.agent,
                &election.message(MessageKind::Release, claim, url, &me),
            );
        }
    }

    fn lead(&mut self, mut leading: Leading) -> State {
        let Some(election) = &self.election else {
            leading.child.stop();
            return State::Searching;
        };
        let me = self.agent.node.node_id();
        if Instant::now() >= leading.next_renewal {
            election.announce(
                &self.agent,
                &election.message(MessageKind::Lease, &leading.claim, &leading.child.url, &me),
            );
            leading.next_renewal = Instant::now() + election.ttl / 3;
        }
        match election.record() {
            Some(record) if record.holder != leading.claim => {
                say(
                    &self.agent,
                    format!(
                        "election: stepping down from epoch {}: {} leads at epoch {}",
                        leading.claim.epoch, record.holder.node_id, record.holder.epoch
                    ),
                );
                leading.child.stop();
                *lock(&self.standby_source) = None;
                self.pacing.reset();
                return State::Searching;
            }
            _ => {}
        }
        if let Some(status) = leading.child.exited() {
            leading.restarts += 1;
            say(
                &self.agent,
                format!(
                    "leader: outpost-control exited ({status}); restart {} of {CONTROL_RESTARTS_MAX}",
                    leading.restarts
                ),
            );
            if leading.restarts > CONTROL_RESTARTS_MAX {
                self.release(&leading.claim, "");
                *lock(&self.standby_source) = None;
                return State::Searching;
            }
            std::thread::sleep(Duration::from_secs(u64::from(leading.restarts)));
            let ip = self
                .agent
                .config
                .site
                .advertise_ip
                .or_else(first_lan_address)
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST);
            match leader::start(
                &self.agent.config,
                leading.claim.epoch,
                ip,
                StartFrom::Previous,
            )
            .and_then(|mut child| child.wait_ready(CONTROL_READY_TIMEOUT).map(|()| child))
            {
                Ok(child) => leading.child = child,
                Err(error) => say(&self.agent, format!("leader: restart failed: {error}")),
            }
            return State::Leading(Box::new(leading));
        }
        if !leading.role_set {
            leading.role_set = set_own_role(&leading.child, &me);
        }
        std::thread::sleep(Duration::from_millis(250));
        State::Leading(Box::new(leading))
    }

    fn follow(&mut self, target: Target, failures: u32, next_look: Instant) -> State {
        std::thread::sleep(PROBE_INTERVAL);
        let failures = if reachable(&target.url) {
            0
        } else {
            failures + 1
        };
        if failures >= PROBE_FAILURES_LOST {
            say(
                &self.agent,
                format!(
                    "discovery: control at {} stopped answering; looking again",
                    target.url
                ),
            );
            *lock(&self.standby_source) = None;
            self.pacing.reset();
            return State::Searching;
        }
        // A leader with a higher epoch than the one followed (e.g. after a partition healed).
        let newer_leader = self
            .election
            .as_ref()
            .and_then(|e| e.record())
            .is_some_and(|r| {
                r.holder.epoch > target.epoch && !r.url.is_empty() && r.url != target.url
            });
        if newer_leader || Instant::now() >= next_look {
            if let Some(found) = self.look()
                && found.fields.url != target.url
                && found.fields.epoch > target.epoch
            {
                say(
                    &self.agent,
                    format!(
                        "discovery: control at {} has a higher epoch ({}) than {} ({}); moving",
                        found.fields.url, found.fields.epoch, target.url, target.epoch
                    ),
                );
                return State::Searching;
            }
            return State::Following {
                target,
                failures,
                next_look: Instant::now() + self.pacing.next_pause(),
            };
        }
        State::Following {
            target,
            failures,
            next_look,
        }
    }

    fn solo(&mut self, next_look: Instant) -> State {
        let why = format!(
            "solo: no control found over mDNS or at a configured url, and {}; running from its cache and the built-in profile",
            self.solo_reason
        );
        self.agent.board.update(|s| {
            s.control.state = ControlState::Solo;
            s.control.last_error = Some(why);
        });
        if Instant::now() < next_look {
            std::thread::sleep(Duration::from_millis(500));
            return State::Solo { next_look };
        }
        match self.search() {
            State::Solo { .. } => State::Solo {
                next_look: Instant::now() + self.pacing.next_pause(),
            },
            other => {
                self.pacing.reset();
                other
            }
        }
    }
}

/// What a new leader's control starts from, in words for the log and status (D6: the freshest
/// state it can reach).
fn starting_state(from: StartFrom, served_before: Option<u64>, standby_events: usize) -> String {
    match (from, served_before) {
        (StartFrom::Fresh, _) => format!(
            "leader: control starts empty and is seeded from the standby copy of the control log ({standby_events} events)"
        ),
        (StartFrom::Previous, Some(epoch)) => format!(
            "leader: control starts from the data it served at epoch {epoch} ({standby_events} events in the standby copy)"
        ),
        (StartFrom::Previous, None) => {
            "leader: no standby copy of the control log and no control data served before; control starts from the built-in profile".to_string()
        }
    }
}

/// Marks this node as leader in its own control (an event, shown by `outpostctl nodes`).
fn set_own_role(child: &ControlChild, node_id: &str) -> bool {
    let (Some(token), Some(ca_der)) = (
        leader::admin_token(&child.data_dir),
        std::fs::read_to_string(child.data_dir.join("admin/ca.pem"))
            .ok()
            .and_then(|pem| pem_to_der(&pem)),
    ) else {
        return false;
    };
    let agent = crate::link::client::agent_for_ca(&ca_der);
    matches!(
        standby::call_json(
            &agent,
            "POST",
            &format!("{}/v1/nodes/{node_id}/role", child.url),
            Some(&token),
            Some(&serde_json::json!({"role": "leader"})),
        ),
        Ok((200, _))
    )
}

fn seed_control(child: &ControlChild, desired: &standby::DesiredState) -> Result<usize, String> {
    if desired.services.is_empty() && desired.profile.is_none() {
        return Ok(0);
    }
    let token = leader::admin_token(&child.data_dir).ok_or("control wrote no admin token")?;
    let ca_der = std::fs::read_to_string(child.data_dir.join("admin/ca.pem"))
        .ok()
        .and_then(|pem| pem_to_der(&pem))
        .ok_or("control wrote no readable admin/ca.pem")?;
    let agent = crate::link::client::agent_for_ca(&ca_der);
    standby::seed(&agent, &child.url, &token, desired)
}

/// The standby thread: follows the control this node follows (never its own: `source` is `None`
/// while this node leads) into the standby log.
fn follow_standby(agent: &SiteParts, source: &Mutex<Option<Target>>) {
    let log = StandbyLog::new(&agent.config.data_dir);
    let mut token: Option<(String, String)> = None;
    let mut last_error = String::new();
    loop {
        let Some(current) = lock(source).clone() else {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        let Some(ca_der) = agent
            .node
            .identity_lock()
            .ca_pem
            .as_deref()
            .and_then(pem_to_der)
        else {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        let client = crate::link::client::agent_for_ca(&ca_der);
        let result = (|| {
            let secret = agent
                .config
                .site
                .join_secret
                .as_deref()
                .ok_or("no join secret")?;
            if token.as_ref().is_none_or(|(url, _)| url != &current.url) {
                let fresh =
                    standby::fetch_token(&client, &current.url, secret, &agent.node.node_id())?;
                token = Some((current.url.clone(), fresh));
            }
            let (_, bearer) = token.as_ref().ok_or("no token")?;
            standby::follow_once(&client, &current.url, bearer, &log)
        })();
        match result {
            Ok(_) => last_error.clear(),
            Err(error) => {
                if error != last_error {
                    tracing::warn!(component = "standby", action = "follow", "{error}");
                    last_error = error;
                }
                token = None;
                std::thread::sleep(standby::FOLLOW_RETRY);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> AgentConfig {
        let mut settings: crate::config::Settings = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        settings.insert("data_dir".into(), "/tmp/x".into());
        AgentConfig::from_settings(&settings).unwrap()
    }

    #[test]
    fn only_site_members_browse_and_elect_by_default() {
        assert!(
            !active(&config(&[])),
            "an agent started with nothing stays quiet"
        );
        assert!(!active(&config(&[("control_url", "https://c:7443")])));
        assert!(active(&config(&[("join_secret", "0123456789abcdef")])));
        assert!(active(&config(&[
            ("control_url", "https://c:7443"),
            ("discovery", "mdns")
        ])));
        assert!(!active(&config(&[
            ("join_secret", "0123456789abcdef"),
            ("discovery", "off")
        ])));
    }

    #[test]
    fn a_new_leader_says_what_its_control_starts_from() {
        assert!(starting_state(StartFrom::Previous, None, 0).contains("built-in profile"));
        assert!(
            starting_state(StartFrom::Previous, Some(3), 0).contains("data it served at epoch 3")
        );
        assert!(
            starting_state(StartFrom::Fresh, Some(1), 12)
                .contains("seeded from the standby copy of the control log (12 events)")
        );
    }

    #[test]
    fn unreachable_urls_are_not_reachable() {
        assert!(!reachable("not a url"));
        assert!(!reachable("https://127.0.0.1:1"));
    }
}
