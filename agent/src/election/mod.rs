//! Self-election and leases (D6) on a LAN without a shared store: every leader-capable node
//! keeps its own copy of the lease record and changes it only by [`observe`], a compare-and-swap
//! on (epoch, node id): a claim replaces the record only if it outranks the holder (higher epoch,
//! or equal epoch and lower node id); the holder's renewals extend it. Claims, renewals and
//! releases travel as small signed datagrams ([`Message`], sans-IO here; `transport` sends them).
//! `site` runs discovery and the election; `standby` keeps the copy of the log a new leader
//! starts from. docs/election.md says what this guarantees and what it does not.

pub mod site;
pub mod standby;
pub mod transport;

use outpost_proto::hash::to_hex;
use outpost_proto::site::hmac_sha256;

/// A claim to leadership: who, at which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub epoch: u64,
    pub node_id: String,
}

/// `a` beats `b`: a higher epoch, or the same epoch and a lower node id.
pub fn outranks(a: &Claim, b: &Claim) -> bool {
    a.epoch > b.epoch || (a.epoch == b.epoch && a.node_id < b.node_id)
}

/// What a datagram says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// "I claim leadership at this epoch."
    Claim,
    /// The holder renews its lease.
    Lease,
    /// The holder gives the lease up (stepping down, shutting down).
    Release,
    /// A node repeats the lease record it holds, to a claimant that is behind.
    Known,
}

impl MessageKind {
    fn as_str(self) -> &'static str {
        match self {
            MessageKind::Claim => "claim",
            MessageKind::Lease => "lease",
            MessageKind::Release => "release",
            MessageKind::Known => "known",
        }
    }
}

/// One election datagram: `OPE1 KIND EPOCH NODE_ID TTL_MS URL SIG` (`-` for an empty URL or
/// no signature; SIG is the HMAC-SHA256 of everything before it, keyed by the join secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: MessageKind,
    pub claim: Claim,
    /// How long the lease lasts from receipt (claims and leases), or what is left (known).
    pub ttl_ms: u64,
    /// The holder's control URL, once it serves.
    pub url: String,
    /// The sender (differs from `claim.node_id` for `Known`).
    pub from: String,
}

pub const MESSAGE_MAX_BYTES: usize = 512;

impl Message {
    fn body(&self) -> String {
        format!(
            "OPE1 {} {} {} {} {} {}",
            self.kind.as_str(),
            self.claim.epoch,
            self.claim.node_id,
            self.ttl_ms,
            if self.url.is_empty() { "-" } else { &self.url },
            self.from
        )
    }

    /// The datagram, signed when a join secret is given.
    pub fn encode(&self, join_secret: Option<&str>) -> Vec<u8> {
        let body = self.body();
        let signature = join_secret.map_or_else(
            || "-".to_string(),
            |secret| to_hex(&hmac_sha256(secret.as_bytes(), body.as_bytes())),
        );
        format!("{body} {signature}").into_bytes()
    }

    /// Parses a datagram. With a join secret, only a message signed with it is accepted.
    pub fn parse(bytes: &[u8], join_secret: Option<&str>) -> Result<Message, String> {
        if bytes.len() > MESSAGE_MAX_BYTES {
            return Err(format!(
                "election datagram of {} bytes is over {MESSAGE_MAX_BYTES}",
                bytes.len()
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "election datagram is not utf-8")?;
        let parts: Vec<&str> = text.split(' ').collect();
        let [magic, kind, epoch, node_id, ttl_ms, url, from, signature] = parts[..] else {
            return Err(format!(
                "election datagram has {} fields, expected 8: {:?}",
                parts.len(),
                text.chars().take(80).collect::<String>()
            ));
        };
        if magic != "OPE1" {
            return Err(format!("election datagram starts with {magic:?}, not OPE1"));
        }
        let kind = match kind {
            "claim" => MessageKind::Claim,
            "lease" => MessageKind::Lease,
            "release" => MessageKind::Release,
            "known" => MessageKind::Known,
            other => return Err(format!("election datagram has unknown kind {other:?}")),
        };
        let number = |name: &str, value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("election datagram has {name} {value:?}, not a number"))
        };
        let message = Message {
            kind,
            claim: Claim {
                epoch: number("epoch", epoch)?,
                node_id: node_id.to_string(),
            },
            ttl_ms: number("ttl_ms", ttl_ms)?,
            url: if url == "-" {
                String::new()
            } else {
                url.to_string()
            },
            from: from.to_string(),
        };
        if let Some(secret) = join_secret {
            let expected = hmac_sha256(secret.as_bytes(), message.body().as_bytes());
            let given = outpost_proto::hash::from_hex(signature).unwrap_or_default();
            if !outpost_proto::site::constant_time_equal(&expected, &given) {
                return Err(format!(
                    "election datagram from {} is not signed with this site's join secret",
                    message.from
                ));
            }
        }
        Ok(message)
    }
}

/// This node's copy of the lease record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub holder: Claim,
    pub url: String,
    /// On this node's monotonic clock (milliseconds since the election started here).
    pub expires_at_ms: u64,
}

impl LeaseRecord {
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }
}

/// What a message did to the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// A new holder (or the first record).
    Took,
    /// The holder's lease was extended.
    Renewed,
    /// The holder gave the lease up; it expires now.
    Released,
    /// No change: the message does not outrank the holder.
    Ignored,
}

/// The compare-and-swap: applies `message` received at `now_ms` to `record`.
pub fn observe(record: &mut Option<LeaseRecord>, message: &Message, now_ms: u64) -> Observed {
    let expires_at_ms = now_ms.saturating_add(message.ttl_ms);
    let fresh = || LeaseRecord {
        holder: message.claim.clone(),
        url: message.url.clone(),
        expires_at_ms,
    };
    match (record.as_mut(), message.kind) {
        (Some(current), MessageKind::Release) if current.holder == message.claim => {
            current.expires_at_ms = current.expires_at_ms.min(now_ms);
            Observed::Released
        }
        (_, MessageKind::Release) => Observed::Ignored,
        (None, _) => {
            *record = Some(fresh());
            Observed::Took
        }
        (Some(current), _) if current.holder == message.claim => {
            current.expires_at_ms = current.expires_at_ms.max(expires_at_ms);
            if !message.url.is_empty() {
                current.url.clone_from(&message.url);
            }
            Observed::Renewed
        }
        (Some(current), _) if outranks(&message.claim, &current.holder) => {
            *current = fresh();
            Observed::Took
        }
        (Some(_), _) => Observed::Ignored,
    }
}

/// The epoch this node claims with, or `None` while another node holds a live lease.
pub fn claim_epoch(record: Option<&LeaseRecord>, node_id: &str, now_ms: u64) -> Option<u64> {
    match record {
        None => Some(1),
        Some(current) if current.live(now_ms) && current.holder.node_id != node_id => None,
        Some(current) => Some(current.holder.epoch + 1),
    }
}

/// Whether a message that changed nothing deserves an answer with our record: a claim from a
/// node that is behind (lower epoch than the live record it did not hear about).
pub fn should_answer_with_record(
    record: Option<&LeaseRecord>,
    message: &Message,
    observed: Observed,
    now_ms: u64,
) -> bool {
    observed == Observed::Ignored
        && message.kind == MessageKind::Claim
        && record.is_some_and(|r| {
            r.holder != message.claim && (r.live(now_ms) || r.holder.epoch >= message.claim.epoch)
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn claim(epoch: u64, node: &str) -> Claim {
        Claim {
            epoch,
            node_id: node.into(),
        }
    }

    fn message(kind: MessageKind, epoch: u64, node: &str, ttl_ms: u64) -> Message {
        Message {
            kind,
            claim: claim(epoch, node),
            ttl_ms,
            url: String::new(),
            from: node.into(),
        }
    }

    #[test]
    fn higher_epoch_then_lower_node_id_outranks() {
        assert!(outranks(&claim(2, "z"), &claim(1, "a")));
        assert!(outranks(&claim(1, "a"), &claim(1, "b")));
        assert!(!outranks(&claim(1, "b"), &claim(1, "a")));
        assert!(!outranks(&claim(1, "a"), &claim(1, "a")));
        assert!(!outranks(&claim(1, "a"), &claim(2, "z")));
    }

    #[test]
    fn two_claimants_at_once_agree_on_one_winner() {
        // Each starts from its own claim and then hears the other's; both end with the same
        // holder, whatever the order.
        for (first, second) in [("n1", "n2"), ("n2", "n1")] {
            let mut at_first = None;
            observe(
                &mut at_first,
                &message(MessageKind::Claim, 1, first, 5000),
                0,
            );
            observe(
                &mut at_first,
                &message(MessageKind::Claim, 1, second, 5000),
                10,
            );
            let mut at_second = None;
            observe(
                &mut at_second,
                &message(MessageKind::Claim, 1, second, 5000),
                0,
            );
            observe(
                &mut at_second,
                &message(MessageKind::Claim, 1, first, 5000),
                10,
            );
            assert_eq!(at_first.unwrap().holder, claim(1, "n1"));
            assert_eq!(at_second.unwrap().holder, claim(1, "n1"));
        }
    }

    #[test]
    fn renewals_extend_releases_expire_and_others_cannot_renew() {
        let mut record = None;
        assert_eq!(
            observe(&mut record, &message(MessageKind::Claim, 3, "n2", 1000), 0),
            Observed::Took
        );
        assert_eq!(
            observe(
                &mut record,
                &message(MessageKind::Lease, 3, "n2", 1000),
                800
            ),
            Observed::Renewed
        );
        assert!(record.as_ref().unwrap().live(1500));
        // Same epoch, higher node id: not a renewal, not a takeover.
        assert_eq!(
            observe(
                &mut record,
                &message(MessageKind::Lease, 3, "n3", 1000),
                900
            ),
            Observed::Ignored
        );
        // An old epoch never takes over, even when the lease has expired.
        assert_eq!(
            observe(
                &mut record,
                &message(MessageKind::Claim, 2, "n1", 1000),
                5000
            ),
            Observed::Ignored
        );
        assert_eq!(
            observe(
                &mut record,
                &message(MessageKind::Release, 3, "n3", 0),
                1000
            ),
            Observed::Ignored
        );
        assert_eq!(
            observe(
                &mut record,
                &message(MessageKind::Release, 3, "n2", 0),
                1000
            ),
            Observed::Released
        );
        assert!(!record.as_ref().unwrap().live(1000));
    }

    #[test]
    fn claims_wait_for_a_live_lease_to_expire_and_go_one_epoch_up() {
        assert_eq!(claim_epoch(None, "n1", 0), Some(1));
        let record = LeaseRecord {
            holder: claim(4, "n2"),
            url: String::new(),
            expires_at_ms: 1000,
        };
        assert_eq!(claim_epoch(Some(&record), "n1", 999), None);
        assert_eq!(claim_epoch(Some(&record), "n1", 1000), Some(5));
        // The holder itself may claim again (after a restart) one epoch up.
        assert_eq!(claim_epoch(Some(&record), "n2", 10), Some(5));
    }

    #[test]
    fn a_claimant_that_is_behind_gets_the_record() {
        let mut record = None;
        observe(&mut record, &message(MessageKind::Lease, 4, "n2", 1000), 0);
        let stale = message(MessageKind::Claim, 1, "n9", 1000);
        let observed = observe(&mut record, &stale, 10);
        assert!(should_answer_with_record(
            record.as_ref(),
            &stale,
            observed,
            10
        ));
        let better = message(MessageKind::Claim, 5, "n9", 1000);
        let observed = observe(&mut record, &better, 20);
        assert_eq!(observed, Observed::Took);
        assert!(!should_answer_with_record(
            record.as_ref(),
            &better,
            observed,
            20
        ));
    }

    #[test]
    fn datagrams_round_trip_and_signatures_are_checked() {
        let sent = Message {
            url: "https://10.0.0.1:7443".into(),
            ..message(MessageKind::Lease, 7, "edge.1", 6000)
        };
        let bytes = sent.encode(Some("site-secret-0123"));
        assert_eq!(
            Message::parse(&bytes, Some("site-secret-0123")).unwrap(),
            sent
        );
        assert!(Message::parse(&bytes, None).is_ok());
        let error = Message::parse(&bytes, Some("other-secret-0123")).unwrap_err();
        assert!(error.contains("not signed"), "{error}");
        let unsigned = sent.encode(None);
        assert!(Message::parse(&unsigned, Some("site-secret-0123")).is_err());
        for bad in [
            &b"OPE2 lease 1 n 1 - n -"[..],
            b"OPE1 lease x n 1 - n -",
            b"OPE1 x",
            b"\xff",
        ] {
            assert!(Message::parse(bad, None).is_err());
        }
        assert!(Message::parse(&[b'a'; 600], None).is_err());
    }
}
