//! Advertising control on the LAN (D2): an mDNS service `_outpost-control._tcp` whose TXT
//! record carries the URL, the leadership epoch, the CA fingerprint and the cluster id, signed
//! with the site join secret when control has one (`outpost_proto::site`). Off unless
//! `serve --advertise-mdns` asks for it, so a control run by an operator stays quiet.

pub mod join;

use std::collections::HashMap;
use std::net::IpAddr;

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};
use outpost_proto::site::AdvertFields;

/// The mDNS service type, fully qualified.
pub const SERVICE_TYPE: &str = "_outpost-control._tcp.local.";
pub const TXT_URL: &str = "url";
pub const TXT_EPOCH: &str = "epoch";
pub const TXT_CA_FINGERPRINT: &str = "ca";
pub const TXT_CLUSTER_ID: &str = "cluster";
pub const TXT_SIGNATURE: &str = "sig";

#[derive(Debug, thiserror::Error)]
pub enum AdvertiseError {
    #[error(
        "cannot advertise over mdns: public url {url:?} has no IP address host; pass --public-url https://IP:PORT"
    )]
    NoAddress { url: String },
    #[error("cannot advertise over mdns: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// The TXT properties of an advertisement: the fields, plus `sig` when a join secret is set.
pub fn txt_properties(fields: &AdvertFields, join_secret: Option<&str>) -> HashMap<String, String> {
    let mut properties = HashMap::from([
        (TXT_URL.to_string(), fields.url.clone()),
        (TXT_EPOCH.to_string(), fields.epoch.to_string()),
        (
            TXT_CA_FINGERPRINT.to_string(),
            fields.ca_fingerprint.clone(),
        ),
        (TXT_CLUSTER_ID.to_string(), fields.cluster_id.clone()),
    ]);
    if let Some(secret) = join_secret {
        properties.insert(TXT_SIGNATURE.to_string(), fields.sign(secret));
    }
    properties
}

/// `(ip, port)` of an `https://IP:PORT` URL.
pub fn url_ip_port(url: &str) -> Option<(IpAddr, u16)> {
    let authority = url.strip_prefix("https://")?.split('/').next()?;
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            (
                host,
                after
                    .strip_prefix(':')
                    .map_or(Some(443), |p| p.parse().ok())?,
            )
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()?),
            None => (authority, 443),
        },
    };
    Some((host.parse().ok()?, port))
}

/// A running advertisement; dropping it withdraws the record and stops the responder.
pub struct Advertiser {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Advertiser {
    /// Starts answering mDNS queries for this control on every IPv4 interface.
    pub fn start(fields: &AdvertFields, join_secret: Option<&str>) -> Result<Self, AdvertiseError> {
        let (ip, port) = url_ip_port(&fields.url).ok_or_else(|| AdvertiseError::NoAddress {
            url: fields.url.clone(),
        })?;
        let daemon = ServiceDaemon::new()?;
        let _ = daemon.disable_interface(IfKind::IPv6);
        let instance = format!("outpost-{}-{}", short(&fields.cluster_id), fields.epoch);
        let host = format!("{instance}.local.");
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            ip,
            port,
            txt_properties(fields, join_secret),
        )?;
        let fullname = info.get_fullname().to_string();
        daemon.register(info)?;
        Ok(Self { daemon, fullname })
    }
}

fn short(text: &str) -> &str {
    text.get(..12).unwrap_or(text)
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        if let Ok(done) = self.daemon.unregister(&self.fullname) {
            let _ = done.recv_timeout(std::time::Duration::from_secs(1));
        }
        let _ = self.daemon.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_carries_the_fields_and_a_signature_only_with_a_secret() {
        let fields = AdvertFields {
            url: "https://10.0.0.1:7443".into(),
            epoch: 2,
            ca_fingerprint: "ab".repeat(32),
            cluster_id: "c1".into(),
        };
        let plain = txt_properties(&fields, None);
        assert_eq!(plain[TXT_EPOCH], "2");
        assert!(!plain.contains_key(TXT_SIGNATURE));
        let signed = txt_properties(&fields, Some("secret"));
        assert!(fields.verify("secret", &signed[TXT_SIGNATURE]));
    }

    #[test]
    fn urls_give_ip_and_port() {
        assert_eq!(
            url_ip_port("https://10.0.0.1:7443"),
            Some(("10.0.0.1".parse().unwrap(), 7443))
        );
        assert_eq!(
            url_ip_port("https://[fd00::1]/x"),
            Some(("fd00::1".parse().unwrap(), 443))
        );
        assert_eq!(url_ip_port("https://control.lan:7443"), None);
    }
}

/// What a control of a site knows beyond the operator's settings: the join secret it accepts
/// enrollments with and signs its advertisement with, and the leadership epoch it was elected
/// at (the agent that runs it passes both).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SiteSettings {
    pub join_secret: Option<String>,
    /// Overrides the cluster's stored leadership epoch in plans, registrations and the advert.
    pub leader_epoch: Option<u64>,
}
