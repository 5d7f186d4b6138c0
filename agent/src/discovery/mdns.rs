//! Browsing for `_outpost-control._tcp` over mDNS (mdns-sd) with a deadline. Each browse uses a
//! fresh responder, so only controls that answer now are seen (no stale cache after a leader
//! dies). IPv4 only.

use std::collections::BTreeMap;
use std::time::Duration;

/// The mDNS service type control advertises.
pub const SERVICE_TYPE: &str = "_outpost-control._tcp.local.";

/// One resolved answer: the instance name and its TXT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub instance: String,
    pub txt: BTreeMap<String, String>,
}

/// Without the `mdns` feature there is nothing to browse with; the caller falls back to the URL.
#[cfg(not(feature = "mdns"))]
pub fn browse(_deadline: Duration) -> Result<Vec<Answer>, String> {
    Err("this outpost-agent was built without the mdns feature; use --control URL".into())
}

/// Browses until `deadline` passes and returns every instance resolved by then.
#[cfg(feature = "mdns")]
pub fn browse(deadline: Duration) -> Result<Vec<Answer>, String> {
    use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
    use std::time::Instant;
    let daemon = ServiceDaemon::new().map_err(|e| format!("cannot start mdns: {e}"))?;
    let _ = daemon.disable_interface(IfKind::IPv6);
    let receiver = match daemon.browse(SERVICE_TYPE) {
        Ok(receiver) => receiver,
        Err(error) => {
            let _ = daemon.shutdown();
            return Err(format!("cannot browse {SERVICE_TYPE}: {error}"));
        }
    };
    let until = Instant::now() + deadline;
    let mut answers: BTreeMap<String, Answer> = BTreeMap::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match receiver.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(resolved)) => {
                let txt = resolved
                    .get_properties()
                    .iter()
                    .map(|p| (p.key().to_string(), p.val_str().to_string()))
                    .collect();
                let instance = resolved.get_fullname().to_string();
                answers.insert(instance.clone(), Answer { instance, txt });
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    Ok(answers.into_values().collect())
}
