//! In-process API tests of the WireGuard overlay (P9): IPAM, the per-node peer projection in
//! plans and on the feed, key rotation, endpoint changes and revocation. The real router, core
//! and projector over the in-memory store, called with `oneshot` — no socket.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use outpost_proto::codec::{
    Encoding, POSTCARD_CONTENT_TYPE, WIRE_VERSION, WIRE_VERSION_HEADER, decode,
};
use outpost_proto::feed::{ChangeBatch, NodeChange};
use outpost_proto::overlay::OverlaySpec;
use outpost_proto::plan::Plan;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::app::{Control, ControlSettings, Followers, ManualClock};
use crate::store::memory::MemoryStore;

struct Harness {
    control: Arc<Control>,
    router: Router,
    admin: String,
}

struct Reply {
    status: StatusCode,
    bytes: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A node of the tests: its id, credential and key.
struct Node {
    id: String,
    credential: String,
}

fn key(n: u8) -> String {
    format!("{}{n:02x}=", "B".repeat(41))
}

async fn harness(cidr: &str) -> Harness {
    let settings = ControlSettings {
        projection_wait: Duration::from_secs(3),
        followers: Followers::LivenessOnDemand,
        overlay: crate::overlay::OverlayConfig::parse_cidr(cidr).unwrap(),
        ..ControlSettings::for_url("https://control.test:7443")
    };
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let started = Control::start(Arc::new(MemoryStore::new()), settings, clock)
        .await
        .unwrap();
    Harness {
        router: super::router(Arc::clone(&started.control)),
        control: started.control,
        admin: started.admin_token.unwrap(),
    }
}

impl Harness {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(value) => {
                request = request.header("content-type", "application/json");
                Body::from(serde_json::to_vec(&value).unwrap())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).unwrap()).await
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
            .await
            .unwrap()
            .to_vec();
        Reply { status, bytes }
    }

    async fn enroll_with(&self, node_id: &str, overlay: Option<(u8, &str)>) -> Node {
        let token = self
            .call(
                "POST",
                "/v1/enrollment-tokens",
                Some(&self.admin),
                Some(json!({"ttl_secs": 600})),
            )
            .await
            .json()["token"]
            .as_str()
            .unwrap()
            .to_string();
        let mut body = json!({"enrollment_token": token, "facts": {"node_id": node_id, "hostname": node_id,
            "arch": "x86_64", "capacity": {"memory_bytes": 1 << 30, "cpu_millis": 1000}}});
        if let Some((n, endpoint)) = overlay {
            body["wireguard_public_key"] = json!(key(n));
            body["endpoints"] = json!([endpoint]);
            body["wireguard_listen_port"] = json!(51820);
        }
        let reply = self
            .call("POST", "/v1/nodes/register", None, Some(body))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        Node {
            id: node_id.to_string(),
            credential: reply.json()["node_credential"]
                .as_str()
                .unwrap()
                .to_string(),
        }
    }

    async fn enroll(&self, node_id: &str, n: u8) -> Node {
        self.enroll_with(node_id, Some((n, &format!("10.231.0.{n}:51820"))))
            .await
    }

    /// A plan is consistent at the views' checkpoint; the tests read it once the views reached
    /// the log head, so it includes every change made so far.
    async fn plan(&self, node: &Node) -> Plan {
        let head = self.control.hub.position().head;
        self.control
            .projector
            .wait_for(head, Duration::from_secs(5))
            .await
            .unwrap();
        let reply = self
            .call(
                "GET",
                &format!("/v1/nodes/{}/plan", node.id),
                Some(&node.credential),
                None,
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        serde_json::from_slice(&reply.bytes).unwrap()
    }

    /// The node's feed from `plan.as_of` as the agent asks for it (postcard), with its size.
    async fn changes(&self, node: &Node, plan: &Plan) -> (ChangeBatch, usize) {
        let request = Request::builder()
            .uri(format!(
                "/v1/nodes/{}/changes?cursor={}&wait=0",
                node.id, plan.as_of
            ))
            .header("authorization", format!("Bearer {}", node.credential))
            .header("accept", POSTCARD_CONTENT_TYPE)
            .header(WIRE_VERSION_HEADER, WIRE_VERSION.to_string())
            .body(Body::empty())
            .unwrap();
        let reply = self.send(request).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let batch =
            decode::<ChangeBatch>(Encoding::Postcard, &reply.bytes, 1 << 22, "batch").unwrap();
        (batch, reply.bytes.len())
    }

    /// The events of node `node_id`'s aggregate (the audit trail), as the admin sees them.
    async fn node_events(&self, node_id: &str) -> Vec<Value> {
        let reply = self
            .call(
                "GET",
                &format!("/v1/admin/aggregates/node/{node_id}/events"),
                Some(&self.admin),
                None,
            )
            .await;
        reply.json().as_array().cloned().unwrap_or_default()
    }

    async fn heartbeat(&self, node: &Node, body: Value) -> Reply {
        self.call(
            "POST",
            &format!("/v1/nodes/{}/heartbeat", node.id),
            Some(&node.credential),
            Some(body),
        )
        .await
    }
}

fn overlay(plan: &Plan) -> &OverlaySpec {
    plan.overlay
        .as_ref()
        .unwrap_or_else(|| panic!("plan of {} has no overlay", plan.node_id))
}

fn peer_ids(plan: &Plan) -> Vec<String> {
    overlay(plan)
        .peers
        .iter()
        .map(|peer| peer.node_id.clone())
        .collect()
}

fn changes_of(batch: &ChangeBatch) -> Vec<&NodeChange> {
    batch.events.iter().map(|event| &event.change).collect()
}

#[tokio::test]
async fn every_node_gets_a_stable_address_and_the_other_members_as_peers() {
    let h = harness("10.232.0.0/16").await;
    let a = h.enroll("a", 1).await;
    let b = h.enroll("b", 2).await;
    let c = h.enroll("c", 3).await;
    let plan_a = h.plan(&a).await;
    let spec = overlay(&plan_a);
    assert_eq!(
        (
            spec.address.as_str(),
            spec.listen_port,
            spec.interface_name.as_str()
        ),
        ("10.232.0.1/16", 51820, "outpost0")
    );
    assert_eq!(peer_ids(&plan_a), ["b", "c"]);
    let peer_b = &spec.peers[0];
    assert_eq!(peer_b.public_key, key(2));
    assert_eq!(peer_b.endpoints, ["10.231.0.2:51820"]);
    assert_eq!(peer_b.allowed_ips, ["10.232.0.2/32"]);
    assert_eq!(peer_b.persistent_keepalive_secs, 25);
    assert_eq!(overlay(&h.plan(&c).await).address, "10.232.0.3/16");
    // Registering again (as after a restart) keeps the address and appends nothing for it.
    let head = h.control.hub.position().head;
    let again = json!({"node_credential": b.credential, "wireguard_public_key": key(2), "endpoints": ["10.231.0.2:51820"],
        "wireguard_listen_port": 51820, "facts": {"node_id": "b", "hostname": "b", "arch": "x86_64",
        "capacity": {"memory_bytes": 1 << 30, "cpu_millis": 1000}}});
    assert_eq!(
        h.call("POST", "/v1/nodes/register", None, Some(again))
            .await
            .status,
        StatusCode::OK
    );
    let kinds: Vec<String> = h
        .control
        .store
        .read_log(head, 100)
        .unwrap()
        .iter()
        .map(|e| e.kind.clone())
        .collect();
    assert!(!kinds.iter().any(|k| k.starts_with("Overlay")), "{kinds:?}");
    assert_eq!(overlay(&h.plan(&b).await).address, "10.232.0.2/16");
    // A node without a key takes no part.
    let plain = h.enroll_with("plain", None).await;
    assert!(h.plan(&plain).await.overlay.is_none());
    assert_eq!(peer_ids(&h.plan(&a).await), ["b", "c"]);
    // Operators see the addresses in the node list.
    let nodes = h
        .call("GET", "/v1/nodes", Some(&h.admin), None)
        .await
        .json();
    let address_of = |id: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == id)
            .unwrap()["overlay_address"]
            .clone()
    };
    assert_eq!(
        (address_of("c"), address_of("plain")),
        (json!("10.232.0.3/16"), Value::Null)
    );
    // The IP allocation is in the node's audit trail.
    let audit = h
        .call(
            "GET",
            "/v1/admin/aggregates/node/c/events",
            Some(&h.admin),
            None,
        )
        .await
        .json();
    let joined = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "OverlayJoined")
        .unwrap();
    assert_eq!(joined["data"]["member"]["address"], "10.232.0.3/16");
}

#[tokio::test]
async fn a_joining_node_reaches_each_member_as_one_small_peer_change() {
    let h = harness("10.232.0.0/16").await;
    let a = h.enroll("a", 1).await;
    let b = h.enroll("b", 2).await;
    let c = h.enroll("c", 3).await;
    let plan_a = h.plan(&a).await;
    let plan_b = h.plan(&b).await;
    let d = h.enroll("d", 4).await;
    let (batch, bytes) = h.changes(&a, &plan_a).await;
    let changes = changes_of(&batch);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        matches!(changes[0], NodeChange::PeerUpserted(peer) if peer.node_id == "d" && peer.allowed_ips == ["10.232.0.4/32"])
    );
    println!(
        "figure: feed bytes node a received for one peer change (fleet of 4, postcard ChangeBatch): {bytes}"
    );
    // Folding the feed onto the old plan gives the fresh plan, for every member.
    for (node, old) in [(&a, plan_a), (&b, plan_b)] {
        let mut folded = old.clone();
        folded.fold_batch(&h.changes(node, &old).await.0).unwrap();
        assert_eq!(
            folded.overlay,
            h.plan(node).await.overlay,
            "node {}",
            node.id
        );
    }
    // The joiner itself gets its whole overlay with the members it joined.
    let plan_d = h.plan(&d).await;
    assert_eq!(peer_ids(&plan_d), ["a", "b", "c"]);
    let (batch_c, _) = h.changes(&c, &h.plan(&c).await).await;
    assert!(batch_c.events.is_empty());
}

#[tokio::test]
async fn new_endpoints_and_rotated_keys_reach_the_peers_through_the_feed() {
    let h = harness("10.232.0.0/16").await;
    let a = h.enroll("a", 1).await;
    let b = h.enroll("b", 2).await;
    let old_a = h.plan(&a).await;
    let old_b = h.plan(&b).await;
    // The same endpoints again change nothing; a new LAN address updates the peer.
    let same = h
        .heartbeat(
            &b,
            json!({"wireguard_public_key": key(2), "endpoints": ["10.231.0.2:51820"]}),
        )
        .await;
    assert_eq!(same.status, StatusCode::OK);
    assert!(h.changes(&a, &old_a).await.0.events.is_empty());
    let moved = h
        .heartbeat(
            &b,
            json!({"wireguard_public_key": key(2), "endpoints": ["192.168.5.2:51820"]}),
        )
        .await;
    assert_eq!(moved.status, StatusCode::OK);
    let (batch, _) = h.changes(&a, &old_a).await;
    assert!(
        matches!(changes_of(&batch)[..], [NodeChange::PeerUpserted(peer)] if peer.endpoints == ["192.168.5.2:51820"]),
        "{batch:?}"
    );
    // b itself hears only that its own overlay stays as it was.
    let (own, _) = h.changes(&b, &old_b).await;
    assert!(
        matches!(changes_of(&own)[..], [NodeChange::OverlayChanged { address, .. }] if address == "10.232.0.2/16")
    );

    // Rotation through the key endpoint.
    let path = "/v1/nodes/b/wireguard-key";
    let rotated = h
        .call(
            "POST",
            path,
            Some(&b.credential),
            Some(json!({"public_key": key(9)})),
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text());
    let mut plan = old_a.clone();
    plan.fold_batch(&h.changes(&a, &old_a).await.0).unwrap();
    let peer = &overlay(&plan).peers[0];
    assert_eq!(
        (peer.public_key.as_str(), peer.endpoints[0].as_str()),
        (key(9).as_str(), "192.168.5.2:51820")
    );
    assert_eq!(plan.overlay, h.plan(&a).await.overlay);
    // The rotation is an audited event of the node's aggregate, carrying the new key.
    let audit = h.node_events("b").await;
    let rotation = audit
        .iter()
        .rev()
        .find(|event| event["kind"] == "OverlayMemberChanged")
        .unwrap_or_else(|| panic!("no OverlayMemberChanged for b: {audit:?}"));
    assert!(
        rotation.to_string().contains(&key(9)),
        "the audit record names the new key: {rotation}"
    );
    // Another node's key, a malformed key, another node's path: refused, nothing appended.
    let head = h.control.hub.position().head;
    let taken = h
        .call(
            "POST",
            path,
            Some(&b.credential),
            Some(json!({"public_key": key(1)})),
        )
        .await;
    assert_eq!(
        (taken.status, taken.json()["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("wireguard_public_key"))
    );
    let malformed = h
        .call(
            "POST",
            path,
            Some(&b.credential),
            Some(json!({"public_key": "short"})),
        )
        .await;
    assert_eq!(
        (malformed.status, malformed.json()["value"].clone()),
        (StatusCode::BAD_REQUEST, json!("short"))
    );
    let foreign = h
        .call(
            "POST",
            path,
            Some(&a.credential),
            Some(json!({"public_key": key(8)})),
        )
        .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert_eq!(h.control.hub.position().head, head);
    let bad_beat = h
        .heartbeat(
            &b,
            json!({"wireguard_public_key": key(2), "endpoints": ["nowhere"]}),
        )
        .await;
    assert_eq!(
        (bad_beat.status, bad_beat.json()["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("endpoints[0]"))
    );
}

#[tokio::test]
async fn revoking_a_node_drops_it_from_every_peer_set_and_frees_its_address() {
    let h = harness("10.232.0.0/16").await;
    let a = h.enroll("a", 1).await;
    let b = h.enroll("b", 2).await;
    let c = h.enroll("c", 3).await;
    let old_a = h.plan(&a).await;
    let old_c = h.plan(&c).await;
    assert_eq!(
        h.call("POST", "/v1/nodes/b/revoke", Some(&h.admin), None)
            .await
            .status,
        StatusCode::OK
    );
    for (node, old) in [(&a, &old_a), (&c, &old_c)] {
        let (batch, _) = h.changes(node, old).await;
        assert!(
            matches!(changes_of(&batch)[..], [NodeChange::PeerRemoved { node_id }] if node_id == "b"),
            "{}: {batch:?}",
            node.id
        );
    }
    assert_eq!(peer_ids(&h.plan(&a).await), ["c"]);
    // The credential no longer works; the node cannot rejoin with a key.
    let refused = h
        .heartbeat(&b, json!({"wireguard_public_key": key(2), "endpoints": []}))
        .await;
    assert!(
        refused.status == StatusCode::UNAUTHORIZED || refused.status == StatusCode::FORBIDDEN,
        "{}",
        refused.text()
    );
    // The freed address goes to the next node.
    let d = h.enroll("d", 4).await;
    assert_eq!(overlay(&h.plan(&d).await).address, "10.232.0.2/16");
    let audit = h.node_events("b").await;
    let kinds: Vec<&str> = audit.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(
        kinds.ends_with(&["NodeRevoked", "OverlayLeft"]),
        "{kinds:?}"
    );
    // Live views equal a replay of the log, overlay included.
    let head = h.control.hub.position().head;
    h.control
        .projector
        .wait_for(head, Duration::from_secs(5))
        .await
        .unwrap();
    let replayed = crate::projection::projector::replay(h.control.store.as_ref()).unwrap();
    assert_eq!(replayed.overlay, h.control.projector.views().overlay);
}

#[tokio::test]
async fn a_full_overlay_network_refuses_the_next_node_clearly() {
    let h = harness("10.9.0.0/30").await;
    h.enroll("a", 1).await;
    h.enroll("b", 2).await;
    // Registration itself succeeds; the node just gets no overlay, and saying so is the key
    // endpoint's answer.
    let c = h.enroll("c", 3).await;
    assert!(h.plan(&c).await.overlay.is_none());
    let reply = h
        .call(
            "POST",
            "/v1/nodes/c/wireguard-key",
            Some(&c.credential),
            Some(json!({"public_key": key(3)})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["field"], "overlay_cidr");
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("no free address"),
        "{}",
        reply.text()
    );
}
