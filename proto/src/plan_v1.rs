//! Plans in the postcard layout of wire version 1 (before the placement block of the service
//! spec, F1/F2), so a plan an agent kept in its store or last-good copy still decodes after an
//! upgrade. Read only: nothing writes this layout any more.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::cursor::Cursor;
use crate::name::Name;
use crate::node::Role;
use crate::overlay::OverlaySpec;
use crate::plan::{Allocation, Plan};
use crate::service::{ReadinessCheck, Replicas, RestartPolicy, ServiceSpec};

#[derive(Deserialize)]
pub(crate) struct PlanV1 {
    node_id: Name,
    role: Role,
    as_of: Cursor,
    control_url: String,
    gateway_url: String,
    ttl_secs: u32,
    epoch: u64,
    allocations: Vec<AllocationV1>,
    #[serde(default)]
    overlay: Option<OverlaySpec>,
}

#[derive(Deserialize)]
struct AllocationV1 {
    id: Name,
    node_id: Name,
    service: Name,
    seq: u64,
    spec: ServiceSpecV1,
}

#[derive(Deserialize)]
struct ServiceSpecV1 {
    name: Name,
    process_type: Name,
    command: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    replicas: u32,
    memory_bytes: u64,
    cpu_millis: u32,
    wave: u32,
    readiness: Option<ReadinessCheck>,
    restart: RestartPolicy,
    stop_grace_ms: u32,
    working_dir: Option<String>,
}

impl From<PlanV1> for Plan {
    fn from(old: PlanV1) -> Plan {
        Plan {
            node_id: old.node_id,
            role: old.role,
            as_of: old.as_of,
            control_url: old.control_url,
            gateway_url: old.gateway_url,
            ttl_secs: old.ttl_secs,
            epoch: old.epoch,
            allocations: old
                .allocations
                .into_iter()
                .map(|allocation| Allocation {
                    id: allocation.id,
                    node_id: allocation.node_id,
                    service: allocation.service,
                    seq: allocation.seq,
                    spec: allocation.spec.into(),
                })
                .collect(),
            overlay: old.overlay,
            secrets: Default::default(),
        }
    }
}

impl From<ServiceSpecV1> for ServiceSpec {
    fn from(old: ServiceSpecV1) -> ServiceSpec {
        ServiceSpec {
            name: old.name,
            process_type: old.process_type,
            command: old.command,
            args: old.args,
            env: old.env,
            replicas: Replicas::Count(old.replicas),
            memory_bytes: old.memory_bytes,
            cpu_millis: old.cpu_millis,
            wave: old.wave,
            readiness: old.readiness,
            restart: old.restart,
            stop_grace_ms: old.stop_grace_ms,
            working_dir: old.working_dir,
            selector: Default::default(),
            reschedule: Default::default(),
            reschedule_after_secs: None,
            artifact: None,
            rollout: None,
            secrets: Default::default(),
            ports: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Serialize;

    use crate::plan::decode_postcard_plan;
    use crate::service::sample_spec;

    use super::*;

    /// The v1 layout as an old agent wrote it.
    #[derive(Serialize)]
    struct WrittenSpecV1<'a> {
        name: &'a Name,
        process_type: &'a Name,
        command: &'a str,
        args: &'a [String],
        env: &'a BTreeMap<String, String>,
        replicas: u32,
        memory_bytes: u64,
        cpu_millis: u32,
        wave: u32,
        readiness: &'a Option<ReadinessCheck>,
        restart: RestartPolicy,
        stop_grace_ms: u32,
        working_dir: &'a Option<String>,
    }

    #[derive(Serialize)]
    struct WrittenAllocationV1<'a> {
        id: &'a Name,
        node_id: &'a Name,
        service: &'a Name,
        seq: u64,
        spec: WrittenSpecV1<'a>,
    }

    #[derive(Serialize)]
    struct WrittenPlanV1<'a> {
        node_id: &'a Name,
        role: Role,
        as_of: Cursor,
        control_url: &'a str,
        gateway_url: &'a str,
        ttl_secs: u32,
        epoch: u64,
        allocations: Vec<WrittenAllocationV1<'a>>,
    }

    #[test]
    fn a_plan_cached_before_the_placement_block_still_decodes() {
        let spec = ServiceSpec {
            replicas: Replicas::Count(3),
            ..sample_spec("web")
        };
        let plan = Plan {
            allocations: vec![Allocation {
                id: Name::try_from("web-1").unwrap(),
                node_id: Name::try_from("n1").unwrap(),
                service: Name::try_from("web").unwrap(),
                seq: 4,
                spec: spec.clone(),
            }],
            ttl_secs: 30,
            ..Plan::empty(Name::try_from("n1").unwrap())
        };
        let allocation = &plan.allocations[0];
        // Written before `overlay` existed, too: the bytes end after the allocations.
        let written = WrittenPlanV1 {
            node_id: &plan.node_id,
            role: plan.role,
            as_of: plan.as_of,
            control_url: &plan.control_url,
            gateway_url: &plan.gateway_url,
            ttl_secs: plan.ttl_secs,
            epoch: plan.epoch,
            allocations: vec![WrittenAllocationV1 {
                id: &allocation.id,
                node_id: &allocation.node_id,
                service: &allocation.service,
                seq: allocation.seq,
                spec: WrittenSpecV1 {
                    name: &spec.name,
                    process_type: &spec.process_type,
                    command: &spec.command,
                    args: &spec.args,
                    env: &spec.env,
                    replicas: 3,
                    memory_bytes: spec.memory_bytes,
                    cpu_millis: spec.cpu_millis,
                    wave: spec.wave,
                    readiness: &spec.readiness,
                    restart: spec.restart,
                    stop_grace_ms: spec.stop_grace_ms,
                    working_dir: &spec.working_dir,
                },
            }],
        };
        let bytes = postcard::to_allocvec(&written).unwrap();
        assert!(
            crate::codec::decode::<Plan>(crate::codec::Encoding::Postcard, &bytes, 1 << 20, "plan")
                .is_err()
        );
        assert_eq!(decode_postcard_plan(&bytes, 1 << 20, "plan").unwrap(), plan);
    }
}
