//! Releases (R2): every accepted change of a service's spec is release N+1. The history is the
//! service's own aggregate in the log ([`service_aggregate`]), folded by [`fold_releases`]; the views
//! keep only each service's newest release number and the artifacts any of its releases
//! references ([`ReleaseIndex`]), which is what `artifacts rm` checks.
//!
//! A spec submitted again unchanged is not a new release. Deleting a service ends its history:
//! a service of the same name defined later starts again at release 1.

pub mod command;
pub mod http;
pub mod signing;

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::service::ServiceSpec;
use serde::{Deserialize, Serialize};

use crate::log::{Event, EventDecodeError};
use crate::projection::org_scoped_key;
use crate::store::StoredEvent;

/// Per service: the newest release number and every artifact its releases reference.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServiceReleases {
    pub latest: u64,
    pub artifacts: BTreeSet<String>,
}

/// A part of the views.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReleaseIndex {
    /// By `crate::projection::org_scoped_key` (org and service name).
    pub services: BTreeMap<String, ServiceReleases>,
}

/// Whether `spec` replacing `previous` is a new release.
pub fn is_new_release(previous: Option<&ServiceSpec>, spec: &ServiceSpec) -> bool {
    previous != Some(spec)
}

impl ReleaseIndex {
    /// A `ServiceDefined` of `spec`, whose service ran `previous` before.
    pub fn record_defined(
        &mut self,
        org: &str,
        previous: Option<&ServiceSpec>,
        spec: &ServiceSpec,
    ) {
        let entry = self
            .services
            .entry(org_scoped_key(org, &spec.name))
            .or_default();
        if is_new_release(previous, spec) {
            entry.latest += 1;
        }
        if let Some(artifact) = &spec.artifact {
            entry.artifacts.insert(artifact.sha256.clone());
        }
    }

    pub fn record_deleted(&mut self, org: &str, name: &str) {
        self.services.remove(&org_scoped_key(org, name));
    }

    /// The newest release of `org`'s `service` (0 when it has none).
    pub fn latest(&self, org: &str, service: &str) -> u64 {
        self.services
            .get(&org_scoped_key(org, service))
            .map_or(0, |s| s.latest)
    }

    /// Names of `org`'s services one of whose releases references `sha256`, sorted.
    pub fn services_referencing(&self, org: &str, sha256: &str) -> Vec<String> {
        let prefix = org_scoped_key(org, "");
        self.services
            .iter()
            .filter(|(_, releases)| releases.artifacts.contains(sha256))
            .filter_map(|(key, _)| key.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }
}

/// One release of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub release: u64,
    pub event_id: u64,
    pub at_unix_ms: u64,
    pub spec: ServiceSpec,
}

/// Folds a service's aggregate (oldest first) into its releases since it was last created.
pub fn fold_releases(history: &[StoredEvent]) -> Result<Vec<Release>, EventDecodeError> {
    let mut releases: Vec<Release> = Vec::new();
    for stored in history {
        match Event::from_stored(stored)? {
            Event::ServiceDefined { spec, .. } | Event::RolloutRolledBack { spec, .. }
                if is_new_release(releases.last().map(|r| &r.spec), &spec) =>
            {
                releases.push(Release {
                    release: releases.last().map_or(0, |r| r.release) + 1,
                    event_id: stored.event_id,
                    at_unix_ms: stored.at_unix_ms,
                    spec,
                });
            }
            Event::ServiceDeleted { .. } => releases.clear(),
            _ => {}
        }
    }
    Ok(releases)
}

/// The aggregate a service's history lives in (see `crate::log::org_scoped_aggregate`).
pub fn service_aggregate(org: &str, name: &str) -> String {
    crate::log::org_scoped_aggregate("service", org, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(version: u8, artifact: Option<u8>) -> ServiceSpec {
        let mut spec: ServiceSpec =
            serde_json::from_str(r#"{"name":"web","command":"bin/app"}"#).unwrap();
        spec.args = vec![version.to_string()];
        spec.artifact = artifact.map(|a| outpost_proto::artifact::ArtifactRef {
            sha256: format!("{a:064}"),
        });
        spec
    }

    fn stored(event: &Event, event_id: u64) -> StoredEvent {
        let new = event.to_new_event();
        StoredEvent {
            event_id,
            aggregate: new.aggregate,
            seq: event_id,
            kind: new.kind,
            schema_version: new.schema_version,
            at_unix_ms: event_id * 10,
            routing_keys: new.routing_keys,
            data: new.data,
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Define(u8, Option<u8>),
        Delete,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..3, proptest::option::of(0u8..3)).prop_map(|(v, a)| Step::Define(v, a)),
            1 => Just(Step::Delete),
        ]
    }

    #[test]
    fn unchanged_specs_are_not_releases_and_delete_starts_over() {
        let events = [
            Event::ServiceDefined {
                org: "o".into(),
                spec: spec(1, None),
            },
            Event::ServiceDefined {
                org: "o".into(),
                spec: spec(1, None),
            },
            Event::ServiceDefined {
                org: "o".into(),
                spec: spec(2, Some(7)),
            },
        ];
        let history: Vec<_> = events
            .iter()
            .enumerate()
            .map(|(i, e)| stored(e, i as u64 + 1))
            .collect();
        let releases = fold_releases(&history).unwrap();
        assert_eq!(
            releases.iter().map(|r| r.release).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(releases[1].event_id, 3);
    }

    proptest! {
        /// The views' newest release number always equals the folded history's, and every
        /// artifact a release in the history names is among the index's references.
        #[test]
        fn index_agrees_with_the_folded_history(steps in proptest::collection::vec(step(), 1..30)) {
            let mut index = ReleaseIndex::default();
            let mut current: Option<ServiceSpec> = None;
            let mut history = Vec::new();
            for (i, step) in steps.iter().enumerate() {
                let event = match step {
                    Step::Define(version, artifact) => {
                        let spec = spec(*version, *artifact);
                        index.record_defined("o", current.as_ref(), &spec);
                        current = Some(spec.clone());
                        Event::ServiceDefined { org: "o".into(), spec }
                    }
                    Step::Delete => {
                        index.record_deleted("o", "web");
                        current = None;
                        Event::ServiceDeleted { org: "o".into(), name: "web".into() }
                    }
                };
                history.push(stored(&event, i as u64 + 1));
            }
            let releases = fold_releases(&history).unwrap();
            prop_assert_eq!(index.latest("o", "web"), releases.last().map_or(0, |r| r.release));
            for release in &releases {
                if let Some(artifact) = &release.spec.artifact {
                    prop_assert!(index.services_referencing("o", &artifact.sha256) == vec!["web".to_string()]);
                    prop_assert!(index.services_referencing("other", &artifact.sha256).is_empty());
                }
            }
            for pair in releases.windows(2) {
                prop_assert_eq!(pair[1].release, pair[0].release + 1);
                prop_assert!(pair[0].spec != pair[1].spec);
            }
        }
    }
}
