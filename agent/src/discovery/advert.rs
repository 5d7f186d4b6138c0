//! Control advertisements (D2) as data: parsing the TXT record of `_outpost-control._tcp`, the
//! trust decision, and the choice among trusted ones. Pure functions; `mdns` does the I/O.

use std::collections::BTreeMap;

use outpost_proto::site::AdvertFields;

pub const TXT_URL: &str = "url";
pub const TXT_EPOCH: &str = "epoch";
pub const TXT_CA_FINGERPRINT: &str = "ca";
pub const TXT_CLUSTER_ID: &str = "cluster";
pub const TXT_SIGNATURE: &str = "sig";

/// One control's advertisement as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The mDNS instance name, for messages.
    pub instance: String,
    pub fields: AdvertFields,
    pub signature: Option<String>,
}

/// Parses a TXT record. A missing or malformed field is an error naming it and the value.
pub fn parse_txt(instance: &str, txt: &BTreeMap<String, String>) -> Result<Advert, String> {
    let field = |key: &str| {
        txt.get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("advertisement {instance:?} has no TXT {key}"))
    };
    let url = field(TXT_URL)?;
    if !url.starts_with("https://") || url.len() > 256 {
        return Err(format!(
            "advertisement {instance:?} has TXT url {url:?}, not an https:// url"
        ));
    }
    let epoch_text = field(TXT_EPOCH)?;
    let epoch = epoch_text.parse().map_err(|_| {
        format!("advertisement {instance:?} has TXT epoch {epoch_text:?}, not a whole number")
    })?;
    let ca_fingerprint = field(TXT_CA_FINGERPRINT)?.to_ascii_lowercase();
    if ca_fingerprint.len() != 64 || !ca_fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "advertisement {instance:?} has TXT ca {ca_fingerprint:?}, not a sha256 hex fingerprint"
        ));
    }
    Ok(Advert {
        instance: instance.to_string(),
        fields: AdvertFields {
            url,
            epoch,
            ca_fingerprint,
            cluster_id: field(TXT_CLUSTER_ID)?,
        },
        signature: txt.get(TXT_SIGNATURE).cloned().filter(|s| !s.is_empty()),
    })
}

/// What this node can check an advertisement against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustAnchors {
    /// sha256 of the CA this node pinned when it enrolled.
    pub pinned_ca_fingerprint: Option<String>,
    /// The CA fingerprint of the configured enrollment token.
    pub token_ca_fingerprint: Option<String>,
    pub join_secret: Option<String>,
}

/// Why an advertisement is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustReason {
    PinnedCa,
    EnrollmentTokenCa,
    JoinSecretSignature,
}

impl TrustReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TrustReason::PinnedCa => "its CA is the one this node pinned",
            TrustReason::EnrollmentTokenCa => "its CA is the enrollment token's",
            TrustReason::JoinSecretSignature => "it is signed with the site join secret",
        }
    }
}

/// The trust decision (D2): the CA fingerprint matches the pinned one or the token's, or the
/// signature verifies with the join secret. Otherwise the error says why it was ignored.
pub fn trust(advert: &Advert, anchors: &TrustAnchors) -> Result<TrustReason, String> {
    let ca = &advert.fields.ca_fingerprint;
    if anchors.pinned_ca_fingerprint.as_deref() == Some(ca.as_str()) {
        return Ok(TrustReason::PinnedCa);
    }
    if anchors.token_ca_fingerprint.as_deref() == Some(ca.as_str()) {
        return Ok(TrustReason::EnrollmentTokenCa);
    }
    let signature = match (&anchors.join_secret, &advert.signature) {
        (Some(secret), Some(signature)) if advert.fields.verify(secret, signature) => {
            return Ok(TrustReason::JoinSecretSignature);
        }
        (Some(_), Some(_)) => "its signature does not verify with this node's join secret",
        (Some(_), None) => "it is not signed",
        (None, _) => "this node has no join secret to check a signature with",
    };
    let known: Vec<String> = [
        anchors
            .pinned_ca_fingerprint
            .as_ref()
            .map(|f| format!("pinned {f}")),
        anchors
            .token_ca_fingerprint
            .as_ref()
            .map(|f| format!("enrollment token's {f}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    Err(format!(
        "ignoring control advertisement {:?} at {}: its CA fingerprint {ca} matches no CA this node knows ({}), and {signature}",
        advert.instance,
        advert.fields.url,
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

/// The advertisement to follow among trusted ones: the highest epoch, then the lowest URL (so
/// every node makes the same choice).
pub fn choose(trusted: &[Advert]) -> Option<&Advert> {
    trusted.iter().min_by(|a, b| {
        b.fields
            .epoch
            .cmp(&a.fields.epoch)
            .then_with(|| a.fields.url.cmp(&b.fields.url))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn txt(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn advert(ca: &str, epoch: u64, secret: Option<&str>) -> Advert {
        let fields = AdvertFields {
            url: format!("https://10.0.0.{epoch}:7443"),
            epoch,
            ca_fingerprint: ca.repeat(32),
            cluster_id: "c1".into(),
        };
        Advert {
            instance: "i".into(),
            signature: secret.map(|s| fields.sign(s)),
            fields,
        }
    }

    #[test]
    fn txt_parses_and_names_bad_fields() {
        let good = txt(&[
            ("url", "https://10.0.0.1:7443"),
            ("epoch", "3"),
            ("ca", &"AB".repeat(32)),
            ("cluster", "c1"),
        ]);
        let parsed = parse_txt("x", &good).unwrap();
        assert_eq!(parsed.fields.epoch, 3);
        assert_eq!(parsed.fields.ca_fingerprint, "ab".repeat(32));
        assert_eq!(parsed.signature, None);
        let mut bad = good.clone();
        bad.insert("epoch".into(), "three".into());
        assert!(parse_txt("x", &bad).unwrap_err().contains("\"three\""));
        let mut bad = good.clone();
        bad.insert("url".into(), "http://x".into());
        assert!(parse_txt("x", &bad).unwrap_err().contains("url"));
        let mut bad = good;
        bad.remove("ca");
        assert!(parse_txt("x", &bad).unwrap_err().contains("no TXT ca"));
    }

    #[test]
    fn trust_needs_a_known_ca_or_a_good_signature() {
        let anchors = TrustAnchors {
            pinned_ca_fingerprint: Some("aa".repeat(32)),
            token_ca_fingerprint: Some("bb".repeat(32)),
            join_secret: Some("site".into()),
        };
        assert_eq!(
            trust(&advert("aa", 1, None), &anchors),
            Ok(TrustReason::PinnedCa)
        );
        assert_eq!(
            trust(&advert("bb", 1, None), &anchors),
            Ok(TrustReason::EnrollmentTokenCa)
        );
        assert_eq!(
            trust(&advert("cc", 1, Some("site")), &anchors),
            Ok(TrustReason::JoinSecretSignature)
        );
        let wrong = trust(&advert("cc", 1, Some("other")), &anchors).unwrap_err();
        assert!(wrong.contains("does not verify"), "{wrong}");
        assert!(wrong.contains(&"cc".repeat(32)), "{wrong}");
        let unsigned = trust(&advert("cc", 1, None), &anchors).unwrap_err();
        assert!(unsigned.contains("not signed"), "{unsigned}");
        let bare = trust(&advert("cc", 1, Some("site")), &TrustAnchors::default()).unwrap_err();
        assert!(bare.contains("no join secret"), "{bare}");
    }

    #[test]
    fn the_highest_epoch_wins_then_the_lowest_url() {
        let adverts = vec![
            advert("aa", 2, None),
            advert("aa", 5, None),
            advert("aa", 3, None),
        ];
        assert_eq!(choose(&adverts).unwrap().fields.epoch, 5);
        let mut tied = advert("aa", 5, None);
        tied.fields.url = "https://10.0.0.1:7443".into();
        let adverts = vec![advert("aa", 5, None), tied];
        assert_eq!(
            choose(&adverts).unwrap().fields.url,
            "https://10.0.0.1:7443"
        );
        assert!(choose(&[]).is_none());
    }
}
