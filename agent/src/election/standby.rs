//! The standby copy of the control log (D6): leader-capable nodes of a site follow control's
//! unfiltered feed (`GET /v1/events`, with the `events:read` token control hands out at
//! `POST /v1/site/standby-token` for a join proof) into `DATA_DIR/standby/events.jsonl`. A new
//! leader folds the copy into the desired state it seeds its fresh control with (services and
//! the environment profile). A change of log epoch (a new leader) keeps the old copy as
//! `previous.jsonl` until the new one has caught up. A log behind the copy in the same epoch (a
//! control restored from an older copy, a replica that lags) makes the copy start over, since it
//! holds events that log does not.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_proto::Cursor;
use outpost_proto::site::JoinProof;
use serde_json::Value;

pub const STANDBY_DIR_NAME: &str = "standby";
const EVENTS_FILE: &str = "events.jsonl";
const PREVIOUS_FILE: &str = "previous.jsonl";
const CURSOR_FILE: &str = "cursor";
/// Largest answer read from control here.
const BODY_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// How long one events poll waits on control's side.
pub const EVENTS_WAIT_SECS: u64 = 5;

/// What a new leader seeds its control with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredState {
    /// Service specs by name, as control stored them.
    pub services: BTreeMap<String, Value>,
    pub profile: Option<Value>,
    /// How many events were folded.
    pub events: usize,
}

/// Folds log events (`{"kind", "data", ...}` as `GET /v1/events` returns them) in order.
pub fn fold<'a>(state: &mut DesiredState, events: impl IntoIterator<Item = &'a Value>) {
    for event in events {
        state.events += 1;
        let data = &event["data"];
        match event["kind"].as_str() {
            Some("ServiceDefined") => {
                if let Some(name) = data["spec"]["name"].as_str() {
                    state
                        .services
                        .insert(name.to_string(), data["spec"].clone());
                }
            }
            Some("ServiceDeleted") => {
                if let Some(name) = data["name"].as_str() {
                    state.services.remove(name);
                }
            }
            Some("ProfileSet") => state.profile = Some(data["profile"].clone()),
            _ => {}
        }
    }
}

/// The standby files of one node.
pub struct StandbyLog {
    dir: PathBuf,
}

impl StandbyLog {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(STANDBY_DIR_NAME),
        }
    }

    pub fn cursor(&self) -> Option<Cursor> {
        std::fs::read_to_string(self.dir.join(CURSOR_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Appends events and moves the cursor (events first, so a crash repeats, never skips).
    pub fn append(&self, events: &[Value], bookmark: Cursor) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        if let Some(current) = self.cursor()
            && current.log_epoch != bookmark.log_epoch
        {
            self.start_new_epoch()?;
        }
        if !events.is_empty() {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(EVENTS_FILE))?;
            let mut text = String::new();
            for event in events {
                text.push_str(&event.to_string());
                text.push('\n');
            }
            file.write_all(text.as_bytes())?;
            file.sync_data()?;
        }
        crate::os::atomic_write(&self.dir.join(CURSOR_FILE), bookmark.to_string().as_bytes())
    }

    /// The log moved to another epoch: keep the old copy aside and start a new one.
    pub fn start_new_epoch(&self) -> std::io::Result<()> {
        let events = self.dir.join(EVENTS_FILE);
        if events.exists() && std::fs::metadata(&events)?.len() > 0 {
            std::fs::rename(&events, self.dir.join(PREVIOUS_FILE))?;
        }
        let _ = std::fs::remove_file(self.dir.join(CURSOR_FILE));
        Ok(())
    }

    /// The log is behind this copy in the same epoch: the copy holds events the log does not, so
    /// it is dropped (the previous epoch's copy stays) and copied again from the log.
    pub fn start_over(&self) -> std::io::Result<()> {
        for name in [EVENTS_FILE, CURSOR_FILE] {
            match std::fs::remove_file(self.dir.join(name)) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        Ok(())
    }

    /// The desired state of the previous copy, then the current one.
    pub fn desired_state(&self) -> DesiredState {
        let mut state = DesiredState::default();
        for name in [PREVIOUS_FILE, EVENTS_FILE] {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let events: Vec<Value> = text
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect();
            fold(&mut state, &events);
        }
        state
    }
}

/// A JSON call to control with a bearer token; errors name the path and the answer.
pub fn call_json(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let result = match (method, body) {
        ("GET", _) => {
            let mut request = agent.get(url);
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            request.call()
        }
        (_, body) => {
            let mut request = if method == "PUT" {
                agent.put(url)
            } else {
                agent.post(url)
            };
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            request
                .header("Content-Type", "application/json")
                .send(body.map(Value::to_string).unwrap_or_default())
        }
    };
    let mut response = result.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(BODY_MAX_BYTES)
        .read_to_vec()
        .map_err(|e| format!("{method} {url}: cannot read the answer: {e}"))?;
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, value))
}

/// Asks control for the standby read token with a fresh join proof.
pub fn fetch_token(
    agent: &ureq::Agent,
    base_url: &str,
    join_secret: &str,
    node_id: &str,
) -> Result<String, String> {
    let proof = JoinProof::new(join_secret, node_id, crate::os::unix_now_secs()).to_text();
    let (status, answer) = call_json(
        agent,
        "POST",
        &format!("{base_url}/v1/site/standby-token"),
        None,
        Some(&serde_json::json!({ "join_proof": proof })),
    )?;
    match answer["token"].as_str() {
        Some(token) if status == 200 => Ok(token.to_string()),
        _ => Err(format!("standby token refused: {status} {answer}")),
    }
}

/// One round of following: fetches events after the stored cursor and appends them.
/// `Ok(n)` is how many events were copied.
pub fn follow_once(
    agent: &ureq::Agent,
    base_url: &str,
    token: &str,
    log: &StandbyLog,
) -> Result<usize, String> {
    let cursor = log
        .cursor()
        .map(|c| format!("&cursor={c}"))
        .unwrap_or_default();
    let url = format!("{base_url}/v1/events?wait={EVENTS_WAIT_SECS}&limit=512{cursor}");
    let (status, answer) = call_json(agent, "GET", &url, Some(token), None)?;
    if status == 410 {
        let reset = match after_gone(
            log.cursor(),
            answer["log_epoch"].as_u64(),
            answer["floor"].as_u64(),
        ) {
            AfterGone::NewEpoch => log.start_new_epoch(),
            AfterGone::StartOver => log.start_over(),
        };
        reset.map_err(|e| format!("cannot reset the standby log: {e}"))?;
        return Ok(0);
    }
    if status != 200 {
        return Err(format!("GET /v1/events answered {status}: {answer}"));
    }
    let events = answer["events"].as_array().cloned().unwrap_or_default();
    let bookmark = Cursor {
        log_epoch: answer["bookmark"]["log_epoch"].as_u64().unwrap_or(0),
        event_id: answer["bookmark"]["event_id"].as_u64().unwrap_or(0),
    };
    log.append(&events, bookmark)
        .map_err(|e| format!("cannot write the standby log: {e}"))?;
    Ok(events.len())
}

/// Seeds a fresh control with a desired state through its API, as its local admin.
pub fn seed(
    agent: &ureq::Agent,
    base_url: &str,
    admin_token: &str,
    state: &DesiredState,
) -> Result<usize, String> {
    let mut applied = 0;
    if let Some(profile) = &state.profile {
        let (status, answer) = call_json(
            agent,
            "PUT",
            &format!("{base_url}/v1/bootstrap/profile"),
            Some(admin_token),
            Some(profile),
        )?;
        if status != 200 {
            return Err(format!("seeding the profile: {status} {answer}"));
        }
        applied += 1;
    }
    for (name, spec) in &state.services {
        let (status, answer) = call_json(
            agent,
            "POST",
            &format!("{base_url}/v1/services"),
            Some(admin_token),
            Some(spec),
        )?;
        if !(200..300).contains(&status) {
            return Err(format!("seeding service {name}: {status} {answer}"));
        }
        applied += 1;
    }
    Ok(applied)
}

/// What a 410 on the events feed means for the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterGone {
    /// Another epoch, or events compacted past the copy: keep the copy as the previous one.
    NewEpoch,
    /// Same epoch and the log is behind the copy's cursor: the copy is ahead of the truth.
    StartOver,
}

/// Decides [`AfterGone`] from the copy's cursor and the 410 body's `log_epoch` and `floor`.
pub fn after_gone(cursor: Option<Cursor>, log_epoch: Option<u64>, floor: Option<u64>) -> AfterGone {
    match (cursor, log_epoch, floor) {
        (Some(cursor), Some(epoch), Some(floor))
            if cursor.log_epoch == epoch && cursor.event_id.saturating_add(1) >= floor =>
        {
            AfterGone::StartOver
        }
        _ => AfterGone::NewEpoch,
    }
}

/// How long to wait between failed follow rounds.
pub const FOLLOW_RETRY: Duration = Duration::from_secs(2);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn folding_keeps_the_latest_services_and_profile() {
        let events = vec![
            json!({"kind": "ServiceDefined", "data": {"org": "default", "spec": {"name": "web", "replicas": 1}}}),
            json!({"kind": "NodeRegistered", "data": {}}),
            json!({"kind": "ServiceDefined", "data": {"org": "default", "spec": {"name": "db"}}}),
            json!({"kind": "ServiceDefined", "data": {"org": "default", "spec": {"name": "web", "replicas": 3}}}),
            json!({"kind": "ServiceDeleted", "data": {"org": "default", "name": "db"}}),
            json!({"kind": "ProfileSet", "data": {"profile": {"kind": "EnvironmentProfile"}}}),
        ];
        let mut state = DesiredState::default();
        fold(&mut state, &events);
        assert_eq!(state.events, 6);
        assert_eq!(state.services.len(), 1);
        assert_eq!(state.services["web"]["replicas"], 3);
        assert_eq!(state.profile.unwrap()["kind"], "EnvironmentProfile");
    }

    #[test]
    fn a_410_starts_the_copy_over_only_when_the_log_is_behind_it_in_the_same_epoch() {
        let cursor = Some(Cursor {
            log_epoch: 7,
            event_id: 40,
        });
        assert_eq!(after_gone(cursor, Some(7), Some(1)), AfterGone::StartOver);
        assert_eq!(after_gone(cursor, Some(8), Some(1)), AfterGone::NewEpoch);
        assert_eq!(after_gone(cursor, Some(7), Some(60)), AfterGone::NewEpoch);
        assert_eq!(after_gone(None, Some(7), Some(1)), AfterGone::NewEpoch);
        assert_eq!(after_gone(cursor, None, None), AfterGone::NewEpoch);
    }

    #[test]
    fn starting_over_drops_the_copy_and_keeps_the_previous_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let log = StandbyLog::new(dir.path());
        log.append(
            &[json!({"kind": "ServiceDefined", "data": {"spec": {"name": "old"}}})],
            Cursor {
                log_epoch: 1,
                event_id: 1,
            },
        )
        .unwrap();
        log.append(
            &[json!({"kind": "ServiceDefined", "data": {"spec": {"name": "ahead"}}})],
            Cursor {
                log_epoch: 2,
                event_id: 9,
            },
        )
        .unwrap();
        log.start_over().unwrap();
        assert_eq!(log.cursor(), None);
        let state = log.desired_state();
        assert!(state.services.contains_key("old"), "{state:?}");
        assert!(!state.services.contains_key("ahead"), "{state:?}");
        // Twice is fine: nothing left to drop.
        log.start_over().unwrap();
    }

    #[test]
    fn a_new_epoch_keeps_the_old_copy_until_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let log = StandbyLog::new(dir.path());
        let first = Cursor {
            log_epoch: 1,
            event_id: 2,
        };
        log.append(
            &[json!({"kind": "ServiceDefined", "data": {"spec": {"name": "web"}}})],
            first,
        )
        .unwrap();
        assert_eq!(log.cursor(), Some(first));
        let other = Cursor {
            log_epoch: 9,
            event_id: 0,
        };
        log.append(&[], other).unwrap();
        assert_eq!(log.cursor(), Some(other));
        // The old epoch's service survives in previous.jsonl.
        assert!(log.desired_state().services.contains_key("web"));
        log.append(
            &[json!({"kind": "ServiceDeleted", "data": {"name": "web"}})],
            Cursor {
                log_epoch: 9,
                event_id: 1,
            },
        )
        .unwrap();
        assert!(log.desired_state().services.is_empty());
    }
}
