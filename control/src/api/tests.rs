//! In-process API tests: the real router, core and projector over the in-memory store (or redb
//! where persistence matters), called with `tower::ServiceExt::oneshot` — no socket.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use outpost_proto::codec::{
    Encoding, POSTCARD_CONTENT_TYPE, WIRE_VERSION, WIRE_VERSION_HEADER, decode,
};
use outpost_proto::feed::{ChangeBatch, NodeChange};
use outpost_proto::plan::Plan;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::app::{Control, ControlSettings, Followers, ManualClock};
use crate::store::Store;
use crate::store::memory::MemoryStore;

const MIB: u64 = 1 << 20;

struct Harness {
    control: Arc<Control>,
    router: Router,
    admin: String,
    clock: Arc<ManualClock>,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    bytes: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|_| panic!("not json: {}", String::from_utf8_lossy(&self.bytes)))
    }
}

/// The master key of every control these tests start: a restarted control, or a second
/// replica, holds the key the store's records are sealed with, as `master.key` on disk gives it.
fn test_master_keys() -> crate::secret::MasterKeyring {
    static KEYS: std::sync::OnceLock<crate::secret::MasterKeyring> = std::sync::OnceLock::new();
    KEYS.get_or_init(crate::secret::MasterKeyring::ephemeral)
        .clone()
}

fn settings() -> ControlSettings {
    ControlSettings {
        projection_wait: Duration::from_secs(3),
        followers: Followers::LivenessOnDemand,
        node_ttl_secs: 30,
        master_keys: test_master_keys(),
        ..ControlSettings::for_url("https://control.test:7443")
    }
}

async fn harness_with(store: Arc<dyn Store>, settings: ControlSettings) -> Harness {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let started = Control::start(store, settings, clock.clone())
        .await
        .unwrap();
    Harness {
        router: super::router(Arc::clone(&started.control)),
        control: started.control,
        admin: started.admin_token.unwrap(),
        clock,
    }
}

async fn harness() -> Harness {
    harness_configured(settings()).await
}

/// A harness over the in-memory store with other settings.
async fn harness_configured(settings: ControlSettings) -> Harness {
    harness_with(Arc::new(MemoryStore::new()), settings).await
}

/// Polls `condition` until it holds or the deadline passes.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Harness {
    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
            .await
            .unwrap()
            .to_vec();
        Reply {
            status,
            headers,
            bytes,
        }
    }

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

    async fn raw(&self, method: &str, path: &str, token: &str, body: Vec<u8>) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body))
            .unwrap();
        self.send(request).await
    }

    fn head(&self) -> u64 {
        self.control.store.log_position().unwrap().head
    }

    async fn enrollment_token(&self) -> String {
        let reply = self
            .call(
                "POST",
                "/v1/enrollment-tokens",
                Some(&self.admin),
                Some(json!({"ttl_secs": 600})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        reply.json()["token"].as_str().unwrap().to_string()
    }

    fn facts(node_id: &str, memory_mib: u64) -> Value {
        json!({"node_id": node_id, "hostname": format!("host-{node_id}"), "arch": "x86_64",
               "capacity": {"memory_bytes": memory_mib * MIB, "cpu_millis": 2000}})
    }

    /// A token of `org` with `scopes`, issued by the cluster admin.
    async fn org_token(&self, org: &str, scopes: Value) -> String {
        let reply = self
            .call(
                "POST",
                "/v1/admin/tokens",
                Some(&self.admin),
                Some(json!({"org": org, "scopes": scopes})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        reply.json()["token"].as_str().unwrap().to_string()
    }

    /// Enrolls a node and returns its credential.
    async fn enroll(&self, node_id: &str, memory_mib: u64) -> String {
        let token = self.enrollment_token().await;
        let reply = self
            .call(
                "POST",
                "/v1/nodes/register",
                None,
                Some(json!({"enrollment_token": token, "facts": Self::facts(node_id, memory_mib)})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        reply.json()["node_credential"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn define(&self, spec: Value) -> Reply {
        self.call("POST", "/v1/services", Some(&self.admin), Some(spec))
            .await
    }

    async fn plan(&self, node_id: &str, credential: &str) -> Plan {
        let reply = self
            .call(
                "GET",
                &format!("/v1/nodes/{node_id}/plan"),
                Some(credential),
                None,
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&reply.bytes)
        );
        serde_json::from_slice(&reply.bytes).unwrap()
    }

    async fn allocations(&self) -> Vec<Value> {
        let reply = self
            .call("GET", "/v1/allocations", Some(&self.admin), None)
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.json().as_array().unwrap().clone()
    }

    async fn allocations_on(&self, node_id: &str) -> usize {
        self.allocations()
            .await
            .iter()
            .filter(|a| a["node_id"] == node_id)
            .count()
    }

    /// Waits until the projector and scheduler are idle at the log head: nothing staged, the
    /// views at the head, and a scheduler pass with nothing left to decide.
    async fn settled(&self) {
        eventually("views at the log head", || async {
            self.control.committer.outstanding() == 0
                && self.control.projector.checkpoint() == self.head()
                && matches!(self.control.run_scheduler_once().await, Ok(0))
                && self.control.projector.checkpoint() == self.head()
        })
        .await;
    }

    /// Asserts a refusal's status, code, and the field and value its body names.
    fn assert_refused(reply: &Reply, status: StatusCode, code: &str, field: &str, value: &str) {
        let body = Self::assert_error(reply, status, code);
        assert_eq!(
            (body["field"].as_str(), body["value"].as_str()),
            (Some(field), Some(value)),
            "{body}"
        );
    }

    fn assert_error(reply: &Reply, status: StatusCode, code: &str) -> Value {
        assert_eq!(
            reply.status,
            status,
            "{}",
            String::from_utf8_lossy(&reply.bytes)
        );
        let body = reply.json();
        assert_eq!(body["error"], code, "{body}");
        body
    }
}

fn web(replicas: u32, memory_mib: u64) -> Value {
    json!({"name": "web", "command": "/bin/sleep", "args": ["3600"], "replicas": replicas, "memory_bytes": memory_mib * MIB})
}

#[tokio::test]
async fn health_answers_without_a_token() {
    let h = harness().await;
    let reply = h.call("GET", "/v1/health", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["head"], h.head());
    assert_eq!(body["floor"], 1);
}

#[tokio::test]
async fn enroll_register_plan_and_heartbeat() {
    let h = harness().await;
    let token = h.enrollment_token().await;
    let claims = outpost_proto::enroll::EnrollmentClaims::parse(&token).unwrap();
    assert_eq!(claims.ca_fingerprint, h.control.identity.ca.fingerprint);
    assert_eq!(claims.control_url, "https://control.test:7443");
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"enrollment_token": token, "facts": Harness::facts("n1", 512)})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let registered: outpost_proto::node::RegisterResponse =
        serde_json::from_slice(&reply.bytes).unwrap();
    assert_eq!(registered.node_id.as_str(), "n1");
    assert!(registered.node_credential.starts_with("opn.n1."));
    assert_eq!((registered.ttl_secs, registered.epoch), (30, 1));

    let plan = h.plan("n1", &registered.node_credential).await;
    assert_eq!(plan.node_id.as_str(), "n1");
    assert_eq!(plan.as_of.log_epoch, h.control.hub.position().log_epoch);
    assert!(plan.allocations.is_empty());

    let reply = h
        .call(
            "POST",
            "/v1/nodes/n1/heartbeat",
            Some(&registered.node_credential),
            Some(json!({"allocations": [{"allocation_id": "x-1", "state": "running"}]})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert_eq!(reply.json()["ttl_secs"], 30);

    // Re-registering with the credential returns the same credential and updates facts.
    let mut facts = Harness::facts("n1", 1024);
    facts["hostname"] = json!("renamed");
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"node_credential": registered.node_credential, "facts": facts})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["node_credential"],
        registered.node_credential.as_str()
    );
    h.settled().await;
    let nodes = h
        .call("GET", "/v1/nodes", Some(&h.admin), None)
        .await
        .json();
    assert_eq!(nodes[0]["hostname"], "renamed");
    assert_eq!(nodes[0]["state"], "ready");
    assert!(nodes[0]["last_heartbeat_unix_ms"].is_u64());
}

#[tokio::test]
async fn enrollment_tokens_are_one_time_and_expire() {
    let h = harness().await;
    let token = h.enrollment_token().await;
    let register = |token: String, node: &str| json!({"enrollment_token": token, "facts": Harness::facts(node, 64)});
    assert_eq!(
        h.call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(register(token.clone(), "n1"))
        )
        .await
        .status,
        StatusCode::OK
    );
    let head = h.head();
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(register(token, "n2")),
        )
        .await;
    let body = Harness::assert_error(&reply, StatusCode::UNAUTHORIZED, "enrollment_token_used");
    assert!(body["message"].as_str().unwrap().contains("n1"));

    let expiring = h.enrollment_token().await;
    h.clock.advance(Duration::from_secs(601));
    let head_after_issue = h.head();
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(register(expiring, "n3")),
        )
        .await;
    Harness::assert_error(&reply, StatusCode::UNAUTHORIZED, "enrollment_token_expired");

    // A well-formed token this control never issued, and garbage.
    let mut claims =
        outpost_proto::enroll::EnrollmentClaims::parse(&h.enrollment_token().await).unwrap();
    claims.token_id = "feedfacefeedface".into();
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(register(claims.to_token(), "n4")),
        )
        .await;
    Harness::assert_error(&reply, StatusCode::UNAUTHORIZED, "enrollment_token_unknown");
    let mut wrong_secret =
        outpost_proto::enroll::EnrollmentClaims::parse(&h.enrollment_token().await).unwrap();
    wrong_secret.secret = "guess".into();
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(register(wrong_secret.to_token(), "n4")),
        )
        .await;
    Harness::assert_error(&reply, StatusCode::UNAUTHORIZED, "enrollment_token_unknown");
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(register("opt1.zz".into(), "n4")),
        )
        .await;
    Harness::assert_error(&reply, StatusCode::UNAUTHORIZED, "enrollment_token_unknown");
    // Failed registrations append nothing (issuing the two tokens above did).
    assert_eq!(h.head(), head_after_issue + 2);
    assert!(head < head_after_issue);
}

#[tokio::test]
async fn credentials_are_checked_and_node_paths_are_private() {
    let h = harness().await;
    let n1 = h.enroll("n1", 256).await;
    let n2 = h.enroll("n2", 256).await;
    h.settled().await;
    let head = h.head();
    // Another node's credential on n1's paths: 403 naming the node.
    let reply = h.call("GET", "/v1/nodes/n1/plan", Some(&n2), None).await;
    Harness::assert_refused(&reply, StatusCode::FORBIDDEN, "forbidden", "node_id", "n1");
    let reply = h
        .call("POST", "/v1/nodes/n1/heartbeat", Some(&n2), Some(json!({})))
        .await;
    Harness::assert_refused(&reply, StatusCode::FORBIDDEN, "forbidden", "node_id", "n1");
    // A wrong secret, an unknown node, no token: 401 naming the credential by its id only.
    let forged = format!("{}x", &n1[..n1.len() - 1]);
    let reply = h
        .call("GET", "/v1/nodes/n1/plan", Some(&forged), None)
        .await;
    Harness::assert_refused(
        &reply,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "authorization",
        "opn.n1",
    );
    let secret = forged.rsplit_once('.').unwrap().1;
    assert!(!String::from_utf8_lossy(&reply.bytes).contains(secret));
    Harness::assert_refused(
        &h.call("GET", "/v1/nodes/n9/plan", Some("opn.n9.abc"), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "authorization",
        "opn.n9",
    );
    Harness::assert_refused(
        &h.call("GET", "/v1/nodes/n1/plan", None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "authorization",
        "(missing)",
    );
    let reply = h
        .call("GET", "/v1/services", Some("opa.nope.s3cret"), None)
        .await;
    Harness::assert_refused(
        &reply,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "authorization",
        "opa.nope",
    );
    assert!(!String::from_utf8_lossy(&reply.bytes).contains("s3cret"));
    // Re-registering with a credential that belongs to another node.
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"node_credential": n2, "facts": Harness::facts("n1", 1)})),
        )
        .await;
    Harness::assert_refused(
        &reply,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "node_credential",
        "opn.n2",
    );
    // An operator with read may fetch a plan; for an unknown node that is 404.
    assert_eq!(
        h.call("GET", "/v1/nodes/n1/plan", Some(&h.admin), None)
            .await
            .status,
        StatusCode::OK
    );
    Harness::assert_refused(
        &h.call("GET", "/v1/nodes/n9/plan", Some(&h.admin), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
        "node",
        "n9",
    );
    // A node may not use operator endpoints: 403 naming its credential.
    Harness::assert_refused(
        &h.call("GET", "/v1/services", Some(&n1), None).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        "authorization",
        "opn.n1",
    );
    assert_eq!(h.head(), head, "refused calls append nothing");
}

#[tokio::test]
async fn routing_refusals_answer_with_the_json_error_body() {
    let h = harness().await;
    let cases = [
        // A known path with a method it does not take: 405 naming the method.
        (
            "DELETE",
            "/v1/nodes",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method",
            "DELETE",
        ),
        // An unknown path: 404 naming the path.
        (
            "GET",
            "/v1/no-such-thing",
            StatusCode::NOT_FOUND,
            "not_found",
            "path",
            "/v1/no-such-thing",
        ),
        // Path segments that do not decode to text: 400 naming the path.
        (
            "GET",
            "/v1/services/%FF",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "path",
            "/v1/services/%FF",
        ),
        (
            "GET",
            "/v1/nodes/%C3%28/plan",
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "path",
            "/v1/nodes/%C3%28/plan",
        ),
    ];
    for (method, path, status, code, field, value) in cases {
        let reply = h.call(method, path, Some(&h.admin), None).await;
        Harness::assert_refused(&reply, status, code, field, value);
    }
    // The 405 keeps the Allow header that lists what the path takes.
    let reply = h.call("DELETE", "/v1/nodes", Some(&h.admin), None).await;
    let allow = reply.headers.get("allow").map(|v| v.to_str().unwrap());
    assert!(allow.is_some_and(|a| a.contains("GET")), "{allow:?}");
}

#[tokio::test]
async fn services_place_update_scale_and_delete() {
    let h = harness().await;
    let n1 = h.enroll("n1", 1024).await;
    h.enroll("n2", 1024).await;
    let reply = h.define(web(2, 100)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let body = reply.json();
    assert_eq!(body["service"]["name"], "web");
    assert_eq!(body["service"]["spec"]["replicas"], 2);
    assert_eq!(body["event_id"], body["service"]["event_id"]);
    eventually("two replicas placed", || async {
        h.allocations().await.len() == 2
    })
    .await;
    // Soft anti-affinity spreads the replicas.
    assert_eq!(h.allocations_on("n1").await, 1);
    assert_eq!(h.allocations_on("n2").await, 1);

    let before = h.plan("n1", &n1).await;
    let id = before.allocations[0].id.clone();
    let mut updated = web(2, 100);
    updated["args"] = json!(["7200"]);
    assert_eq!(h.define(updated).await.status, StatusCode::OK);
    eventually("the spec update reaches n1's plan", || async {
        h.plan("n1", &n1)
            .await
            .allocations
            .first()
            .is_some_and(|a| a.spec.args == ["7200"])
    })
    .await;
    let after = h.plan("n1", &n1).await;
    assert_eq!(
        after.allocations[0].id, id,
        "an update keeps the allocation on its node"
    );
    assert!(after.allocations[0].seq > before.allocations[0].seq);

    assert_eq!(h.define(web(1, 100)).await.status, StatusCode::OK);
    eventually("scaled down to one", || async {
        h.allocations().await.len() == 1
    })
    .await;
    assert_eq!(h.allocations().await[0]["replica"], 0);

    let services = h
        .call("GET", "/v1/services", Some(&h.admin), None)
        .await
        .json();
    assert_eq!(services.as_array().unwrap().len(), 1);
    let reply = h
        .call("DELETE", "/v1/services/web", Some(&h.admin), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.json()["event_id"].is_u64());
    eventually("allocations removed", || async {
        h.allocations().await.is_empty()
    })
    .await;
    Harness::assert_error(
        &h.call("DELETE", "/v1/services/web", Some(&h.admin), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn what_does_not_fit_waits_for_a_joining_node() {
    let h = harness().await;
    h.enroll("n1", 256).await;
    assert_eq!(h.define(web(3, 100)).await.status, StatusCode::OK);
    eventually("two of three fit", || async {
        h.allocations().await.len() == 2
    })
    .await;
    h.enroll("n2", 256).await;
    eventually("the joining node gets the rest", || async {
        h.allocations_on("n2").await == 1
    })
    .await;
    assert_eq!(h.allocations().await.len(), 3);
}

#[tokio::test]
async fn unschedulable_specs_are_refused_and_nothing_is_appended() {
    let h = harness().await;
    // With no nodes, any size is accepted.
    assert_eq!(
        h.define(json!({"name": "big", "command": "/bin/true", "memory_bytes": 1u64 << 40}))
            .await
            .status,
        StatusCode::OK
    );
    h.enroll("n1", 512).await;
    h.settled().await;
    let head = h.head();
    let reply = h
        .define(json!({"name": "huge", "command": "/bin/true", "memory_bytes": 1u64 << 40}))
        .await;
    let body = Harness::assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "unschedulable");
    assert_eq!(body["field"], "memory_bytes");
    assert_eq!(body["value"], (1u64 << 40).to_string());
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&(512 * MIB).to_string())
    );
    assert_eq!(h.head(), head);
}

#[tokio::test]
async fn specs_beyond_every_nodes_cpu_are_refused_and_nothing_is_appended() {
    let h = harness_configured(ControlSettings {
        cpu_overcommit_ratio: 1.5,
        ..settings()
    })
    .await;
    let spec = |name: &str, cpu_millis: u64| json!({"name": name, "command": "/bin/true", "memory_bytes": MIB, "cpu_millis": cpu_millis});
    // With no nodes yet, any CPU request is accepted and waits for a node (declarative).
    assert_eq!(
        h.define(spec("early", 1_000_000)).await.status,
        StatusCode::OK
    );
    // Nodes have 2000 millis; at ratio 1.5 a node may be promised 3000.
    h.enroll("n1", 512).await;
    h.settled().await;
    let head = h.head();
    let reply = h.define(spec("hungry", 3001)).await;
    let body = Harness::assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "unschedulable");
    assert_eq!(body["field"], "cpu_millis", "{body}");
    assert_eq!(body["value"], "3001", "{body}");
    assert!(body["message"].as_str().unwrap().contains("3000"), "{body}");
    assert_eq!(h.head(), head, "a refused spec appends nothing");
    assert_eq!(h.define(spec("fits", 3000)).await.status, StatusCode::OK);
    // A bigger node makes room; once it is revoked it offers nothing again.
    let mut facts = Harness::facts("n2", 512);
    facts["capacity"]["cpu_millis"] = json!(8000);
    let token = h.enrollment_token().await;
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"enrollment_token": token, "facts": facts})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    h.settled().await;
    assert_eq!(h.define(spec("hungry", 3001)).await.status, StatusCode::OK);
    assert_eq!(
        h.call("POST", "/v1/nodes/n2/revoke", Some(&h.admin), None)
            .await
            .status,
        StatusCode::OK
    );
    h.settled().await;
    let head = h.head();
    let reply = h.define(spec("hungrier", 3002)).await;
    Harness::assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, "unschedulable");
    assert_eq!(h.head(), head);
}

#[tokio::test]
async fn repeated_idempotency_key_returns_the_first_answer() {
    let h = harness().await;
    let send = |spec: Value| {
        Request::builder()
            .method("POST")
            .uri("/v1/services")
            .header("authorization", format!("Bearer {}", h.admin))
            .header("idempotency-key", "deploy-42")
            .body(Body::from(serde_json::to_vec(&spec).unwrap()))
            .unwrap()
    };
    let first = h.send(send(web(1, 10))).await;
    assert_eq!(first.status, StatusCode::OK);
    let head = h.head();
    let again = h.send(send(web(5, 10))).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["event_id"], first.json()["event_id"]);
    assert_eq!(again.json()["service"]["spec"]["replicas"], 1);
    assert_eq!(h.head(), head, "a repeated key appends nothing");
}

#[tokio::test]
async fn lagging_projections_fail_read_your_writes_clearly() {
    let h = harness_configured(ControlSettings {
        projection_wait: Duration::from_millis(300),
        ..settings()
    })
    .await;
    h.settled().await;
    h.control.projector.pause();
    let reply = h.define(web(1, 10)).await;
    let body = Harness::assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "projection_lagging",
    );
    assert_eq!(reply.headers.get("retry-after").unwrap(), "1");
    let event_id = h.head();
    assert_eq!(body["field"], "event_id");
    assert_eq!(body["value"], event_id.to_string());
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("reached event {}", event_id - 1))
    );
    h.control.projector.resume();
    eventually("the write shows once the projector runs", || async {
        h.call("GET", "/v1/services", Some(&h.admin), None)
            .await
            .json()
            .as_array()
            .is_some_and(|s| s.len() == 1)
    })
    .await;
}

#[tokio::test]
async fn change_feed_long_polls_filters_and_bookmarks() {
    let h = harness().await;
    let n1 = h.enroll("n1", 1024).await;
    let n2 = h.enroll("n2", 1024).await;
    h.settled().await;
    let plan = h.plan("n1", &n1).await;
    let changes =
        |cursor: String, wait: u32| format!("/v1/nodes/n1/changes?cursor={cursor}&wait={wait}");

    // Nothing new: the answer is an empty batch whose bookmark is the head.
    let reply = h
        .call("GET", &changes(plan.as_of.to_string(), 0), Some(&n1), None)
        .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.bytes)
    );
    let batch: ChangeBatch = serde_json::from_slice(&reply.bytes).unwrap();
    assert!(batch.events.is_empty());
    assert_eq!(batch.bookmark.event_id, h.head());

    // A waiting long-poll wakes when the node's allocation is placed.
    let router = h.router.clone();
    let (cursor, credential) = (batch.bookmark.to_string(), n1.clone());
    let waiting = tokio::spawn(async move {
        let request = Request::get(format!("/v1/nodes/n1/changes?cursor={cursor}&wait=30"))
            .header("authorization", format!("Bearer {credential}"))
            .body(Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap()
    });
    assert_eq!(h.define(web(2, 100)).await.status, StatusCode::OK);
    let bytes = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    let woken: ChangeBatch = serde_json::from_slice(&bytes).unwrap();
    assert!(
        woken
            .events
            .iter()
            .all(|e| matches!(&e.change, NodeChange::AllocationUpserted(a) if a.node_id == "n1"))
    );
    assert!(!woken.events.is_empty());

    // Postcard by negotiation.
    let request = Request::get(changes(plan.as_of.to_string(), 0))
        .header("authorization", format!("Bearer {n1}"))
        .header("accept", POSTCARD_CONTENT_TYPE)
        .header(WIRE_VERSION_HEADER, WIRE_VERSION.to_string())
        .body(Body::empty())
        .unwrap();
    let reply = h.send(request).await;
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        POSTCARD_CONTENT_TYPE
    );
    let batch: ChangeBatch =
        decode(Encoding::Postcard, &reply.bytes, 1 << 20, "change batch").unwrap();

    // Folding the feed onto the old plan gives the fresh plan.
    let mut folded = plan.clone();
    folded.fold_batch(&batch).unwrap();
    h.settled().await;
    let fresh = h.plan("n1", &n1).await;
    assert_eq!(folded.allocations, fresh.allocations);

    // n2 never sees n1's allocations.
    let plan2 = h.plan("n2", &n2).await;
    let reply = h
        .call(
            "GET",
            &format!(
                "/v1/nodes/n2/changes?cursor={}&wait=0",
                Cursor::new(plan.as_of.log_epoch, 0)
            ),
            Some(&n2),
            None,
        )
        .await;
    let batch2: ChangeBatch = serde_json::from_slice(&reply.bytes).unwrap();
    for event in &batch2.events {
        if let NodeChange::AllocationUpserted(allocation) = &event.change {
            assert_eq!(allocation.node_id, "n2");
        }
    }
    assert_eq!(plan2.allocations.len(), 1);

    // Bad cursors.
    let head = h.head();
    // Another epoch, or past the head (a control restored from an older copy, a replica
    // behind): 410 with the snapshot pointer, never a 400 the node cannot recover from.
    let future = Cursor::new(plan.as_of.log_epoch, head + 100);
    let other_epoch = Cursor::new(plan.as_of.log_epoch ^ 1, 1);
    for (cursor, reason) in [
        (
            future,
            format!("cursor event {} is past the log head {head}", head + 100),
        ),
        (
            other_epoch,
            format!("cursor is from log epoch {:016x}", other_epoch.log_epoch),
        ),
    ] {
        let reply = h
            .call("GET", &changes(cursor.to_string(), 0), Some(&n1), None)
            .await;
        assert_eq!(reply.status, StatusCode::GONE, "{cursor}");
        let gone: outpost_proto::feed::GoneBody = serde_json::from_slice(&reply.bytes).unwrap();
        assert_eq!(gone.error, "gone");
        assert_eq!(gone.snapshot, "/v1/nodes/n1/plan");
        assert_eq!(gone.log_epoch, plan.as_of.log_epoch);
        assert!(gone.message.contains(&reason), "{}", gone.message);
    }
    let body = Harness::assert_error(
        &h.call("GET", &changes("garbage".into(), 0), Some(&n1), None)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
    assert_eq!(body["field"], "cursor");
    Harness::assert_error(
        &h.call(
            "GET",
            &changes(plan.as_of.to_string(), 601),
            Some(&n1),
            None,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
    assert_eq!(h.head(), head);
}

use outpost_proto::Cursor;

#[tokio::test]
async fn rotating_the_epoch_makes_every_cursor_gone_and_plans_resume() {
    let h = harness().await;
    let n1 = h.enroll("n1", 512).await;
    h.settled().await;
    let plan = h.plan("n1", &n1).await;
    let reply = h
        .call("POST", "/v1/admin/rotate-epoch", Some(&h.admin), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let new_epoch = reply.json()["log_epoch"].as_u64().unwrap();
    assert_ne!(new_epoch, plan.as_of.log_epoch);
    let reply = h
        .call(
            "GET",
            &format!("/v1/nodes/n1/changes?cursor={}&wait=0", plan.as_of),
            Some(&n1),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::GONE);
    let fresh = h.plan("n1", &n1).await;
    assert_eq!(fresh.as_of.log_epoch, new_epoch);
    let reply = h
        .call(
            "GET",
            &format!("/v1/nodes/n1/changes?cursor={}&wait=0", fresh.as_of),
            Some(&n1),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn plan_requests_beyond_the_cap_get_429() {
    let h = harness_configured(ControlSettings {
        plan_requests_max: 1,
        ..settings()
    })
    .await;
    let n1 = h.enroll("n1", 512).await;
    h.settled().await;
    let held = Arc::clone(&h.control.plan_permits)
        .try_acquire_owned()
        .unwrap();
    let reply = h.call("GET", "/v1/nodes/n1/plan", Some(&n1), None).await;
    Harness::assert_error(&reply, StatusCode::TOO_MANY_REQUESTS, "too_many_requests");
    assert_eq!(reply.headers.get("retry-after").unwrap(), "1");
    drop(held);
    assert_eq!(
        h.call("GET", "/v1/nodes/n1/plan", Some(&n1), None)
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_bodies_are_clear_errors_and_leave_the_log_intact() {
    let h = harness().await;
    h.settled().await;
    let head = h.head();
    let oversized = vec![b' '; outpost_proto::limits::REQUEST_BODY_MAX_BYTES + 1];
    Harness::assert_error(
        &h.raw("POST", "/v1/services", &h.admin, oversized).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    Harness::assert_error(
        &h.raw("POST", "/v1/services", &h.admin, b"{not json".to_vec())
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    let body = Harness::assert_error(
        &h.raw(
            "POST",
            "/v1/services",
            &h.admin,
            br#"{"name":"web","command":"x","replicas":2,"memroy_bytes":5}"#.to_vec(),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
    assert_eq!(body["field"], "memroy_bytes");
    let body = Harness::assert_error(
        &h.raw(
            "POST",
            "/v1/services",
            &h.admin,
            br#"{"name":"web","command":"x","replicas":99999}"#.to_vec(),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
    assert_eq!(
        (body["field"].as_str(), body["value"].as_str()),
        (Some("replicas"), Some("99999"))
    );
    Harness::assert_error(
        &h.raw("POST", "/v1/nodes/register", &h.admin, b"[]".to_vec())
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    Harness::assert_error(
        &h.raw("POST", "/v1/services", &h.admin, vec![0xff, 0x00])
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    Harness::assert_error(
        &h.call("GET", "/v1/nope", None, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(h.head(), head);
}

#[tokio::test]
async fn orgs_and_scopes_bound_every_call() {
    let h = harness().await;
    assert_eq!(h.define(web(1, 10)).await.status, StatusCode::OK);
    let reply = h
        .call(
            "POST",
            "/v1/admin/tokens",
            Some(&h.admin),
            Some(json!({"org": "acme", "scopes": ["services:write", "read"]})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let acme = reply.json()["token"].as_str().unwrap().to_string();
    let acme_id = format!("opa.{}", reply.json()["token_id"].as_str().unwrap());
    let reader = h
        .call(
            "POST",
            "/v1/admin/tokens",
            Some(&h.admin),
            Some(json!({"org": "default", "scopes": ["read"]})),
        )
        .await;
    let reader_id = format!("opa.{}", reader.json()["token_id"].as_str().unwrap());
    let reader = reader.json()["token"].as_str().unwrap().to_string();
    h.settled().await;
    let head_before_refusals = h.head();
    // Another org's service is not found (404, P4): neither read nor deleted nor listed.
    for method in ["DELETE", "GET"] {
        let reply = h.call(method, "/v1/services/web", Some(&acme), None).await;
        Harness::assert_refused(&reply, StatusCode::NOT_FOUND, "not_found", "service", "web");
    }
    for path in ["/v1/services/web/releases", "/v1/services"] {
        let reply = h.call("GET", path, Some(&acme), None).await;
        if path == "/v1/services" {
            assert_eq!(reply.json(), json!([]));
        } else {
            Harness::assert_refused(&reply, StatusCode::NOT_FOUND, "not_found", "service", "web");
        }
    }
    // Missing scopes: 403 naming the token by its id.
    Harness::assert_refused(
        &h.call("POST", "/v1/services", Some(&reader), Some(web(1, 10)))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
        "authorization",
        &reader_id,
    );
    Harness::assert_refused(
        &h.call(
            "POST",
            "/v1/enrollment-tokens",
            Some(&acme),
            Some(json!({})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
        "authorization",
        &acme_id,
    );
    Harness::assert_refused(
        &h.call("POST", "/v1/admin/rotate-epoch", Some(&acme), None)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
        "authorization",
        &acme_id,
    );
    Harness::assert_refused(
        &h.call("GET", "/v1/events", Some(&reader), None).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        "authorization",
        &reader_id,
    );
    assert_eq!(h.head(), head_before_refusals);
    // The tenant's own `web` is another service: defining it leaves the default org's alone.
    let reply = h
        .call("POST", "/v1/services", Some(&acme), Some(web(3, 10)))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert_eq!(reply.json()["service"]["org"], "acme");
    let theirs = h
        .call("GET", "/v1/services/web", Some(&acme), None)
        .await
        .json();
    let ours = h
        .call("GET", "/v1/services/web", Some(&h.admin), None)
        .await
        .json();
    assert_eq!(
        (theirs["org"].clone(), theirs["spec"]["replicas"].clone()),
        (json!("acme"), json!(3))
    );
    assert_eq!(
        (ours["org"].clone(), ours["spec"]["replicas"].clone()),
        (json!("default"), json!(1))
    );
    // A tenant's admin is not the cluster's admin.
    let tenant_admin = h
        .call(
            "POST",
            "/v1/admin/tokens",
            Some(&h.admin),
            Some(json!({"org": "acme", "scopes": ["admin"]})),
        )
        .await
        .json();
    let tenant_admin_id = format!("opa.{}", tenant_admin["token_id"].as_str().unwrap());
    let tenant_admin = tenant_admin["token"].as_str().unwrap().to_string();
    h.settled().await;
    let head = h.head();
    for (method, path, body) in [
        ("GET", "/v1/events", None),
        ("POST", "/v1/admin/rotate-epoch", None),
        (
            "POST",
            "/v1/admin/tokens",
            Some(json!({"org": "default", "scopes": ["admin"]})),
        ),
        ("GET", "/v1/admin/aggregates/org/default/events", None),
        (
            "PUT",
            "/v1/bootstrap/profile",
            Some(json!({"apiVersion": "outpost/v1", "kind": "EnvironmentProfile"})),
        ),
    ] {
        let reply = h.call(method, path, Some(&tenant_admin), body).await;
        Harness::assert_refused(
            &reply,
            StatusCode::FORBIDDEN,
            "forbidden",
            "authorization",
            &tenant_admin_id,
        );
    }
    assert_eq!(h.head(), head);
    // Within its own org acme works.
    let mut acme_api = web(1, 10);
    acme_api["name"] = json!("acme-api");
    assert_eq!(
        h.call("POST", "/v1/services", Some(&acme), Some(acme_api))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn revoked_nodes_are_refused_and_their_allocations_move() {
    let h = harness().await;
    let n1 = h.enroll("n1", 1024).await;
    let n2 = h.enroll("n2", 1024).await;
    assert_eq!(h.define(web(2, 100)).await.status, StatusCode::OK);
    eventually("placed on both", || async {
        h.allocations_on("n1").await == 1 && h.allocations_on("n2").await == 1
    })
    .await;
    let reply = h
        .call("POST", "/v1/nodes/n1/revoke", Some(&h.admin), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert!(reply.json()["event_id"].is_u64());
    eventually("both replicas on n2", || async {
        h.allocations_on("n2").await == 2
    })
    .await;
    assert_eq!(h.allocations_on("n1").await, 0);
    let body = Harness::assert_error(
        &h.call("POST", "/v1/nodes/n1/heartbeat", Some(&n1), Some(json!({})))
            .await,
        StatusCode::FORBIDDEN,
        "node_revoked",
    );
    assert_eq!(body["value"], "n1");
    Harness::assert_error(
        &h.call("GET", "/v1/nodes/n1/plan", Some(&n1), None).await,
        StatusCode::FORBIDDEN,
        "node_revoked",
    );
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"node_credential": n1, "facts": Harness::facts("n1", 1024)})),
        )
        .await;
    Harness::assert_error(&reply, StatusCode::FORBIDDEN, "node_revoked");
    // A fresh enrollment token re-admits the node id with a new credential; the revoked one
    // stays refused.
    let token = h.enrollment_token().await;
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"enrollment_token": token, "facts": Harness::facts("n1", 1024)})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let fresh = reply.json()["node_credential"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(fresh, n1);
    assert_eq!(
        h.call("GET", "/v1/nodes/n1/plan", Some(&fresh), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.call("GET", "/v1/nodes/n1/plan", Some(&n1), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.call("GET", "/v1/nodes/n2/plan", Some(&n2), None)
            .await
            .status,
        StatusCode::OK
    );
    Harness::assert_error(
        &h.call("POST", "/v1/nodes/n9/revoke", Some(&h.admin), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn heartbeat_statuses_show_in_allocations() {
    let h = harness().await;
    let n1 = h.enroll("n1", 1024).await;
    assert_eq!(h.define(web(1, 100)).await.status, StatusCode::OK);
    eventually("placed", || async { h.allocations().await.len() == 1 }).await;
    let id = h.allocations().await[0]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = json!({"allocations": [{"allocation_id": id, "state": "running", "restarts": 2, "message": "ok"}]});
    assert_eq!(
        h.call("POST", "/v1/nodes/n1/heartbeat", Some(&n1), Some(status))
            .await
            .status,
        StatusCode::OK
    );
    let allocation = h.allocations().await[0].clone();
    assert_eq!(allocation["state"], "running");
    assert_eq!(allocation["restarts"], 2);
}

#[tokio::test]
async fn bootstrap_profile_status_and_events() {
    let h = harness().await;
    let n1 = h.enroll("n1", 256).await;
    let n2 = h.enroll("n2", 256).await;
    let profile = h
        .call("GET", "/v1/bootstrap/profile", Some(&n1), None)
        .await;
    assert_eq!(profile.status, StatusCode::OK);
    assert_eq!(profile.json()["metadata"]["name"], "minimal");

    let site = json!({"apiVersion": "outpost/v1", "kind": "EnvironmentProfile", "metadata": {"name": "site"},
        "spec": {"storage": {"buckets": [{"name": "media", "versioning": true}]}}});
    let reply = h
        .call(
            "PUT",
            "/v1/bootstrap/profile",
            Some(&h.admin),
            Some(site.clone()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let generation = reply.json()["generation"].as_str().unwrap().to_string();
    assert_eq!(generation.len(), 64);

    // A bad profile names the path and leaves the previous one in force.
    let head = h.head();
    let mut bad = site.clone();
    bad["spec"]["storage"]["buckets"][0]["versionning"] = json!(true);
    let body = Harness::assert_error(
        &h.call("PUT", "/v1/bootstrap/profile", Some(&h.admin), Some(bad))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
    assert_eq!(body["field"], "spec.storage.buckets[0].versionning");
    let mut invalid = site.clone();
    invalid["kind"] = json!("Plan");
    let body = Harness::assert_error(
        &h.call(
            "PUT",
            "/v1/bootstrap/profile",
            Some(&h.admin),
            Some(invalid),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
    assert_eq!(
        (body["field"].as_str(), body["value"].as_str()),
        (Some("kind"), Some("Plan"))
    );
    assert_eq!(h.head(), head);
    let current = h
        .call("GET", "/v1/bootstrap/profile", Some(&h.admin), None)
        .await
        .json();
    assert_eq!(current["metadata"]["name"], "site");
    Harness::assert_error(
        &h.call("PUT", "/v1/bootstrap/profile", Some(&n1), Some(site))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    let events = json!([
        {"node_id": "n1", "component": "storage", "action": "ensure_bucket", "status": "ok", "generation": generation},
        {"node_id": "n1", "component": "broker", "action": "declare", "status": "error", "message": "broker unreachable"},
    ]);
    let reply = h
        .call("POST", "/v1/bootstrap/events", Some(&n1), Some(events))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json()["accepted"], 2);
    let one_for_another_node =
        json!({"node_id": "n1", "component": "storage", "action": "x", "status": "ok"});
    Harness::assert_error(
        &h.call(
            "POST",
            "/v1/bootstrap/events",
            Some(&n2),
            Some(one_for_another_node),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    h.settled().await;
    let status = h
        .call("GET", "/v1/bootstrap/status?node_id=n1", Some(&n1), None)
        .await;
    assert_eq!(status.status, StatusCode::OK);
    let status = status.json();
    assert_eq!(status["applied"]["storage"], generation);
    assert!(
        status["errors"][0]
            .as_str()
            .unwrap()
            .contains("broker unreachable")
    );
    assert_eq!(
        h.call(
            "GET",
            "/v1/bootstrap/status?node_id=n1",
            Some(&h.admin),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    Harness::assert_error(
        &h.call("GET", "/v1/bootstrap/status?node_id=n1", Some(&n2), None)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    Harness::assert_error(
        &h.call("GET", "/v1/bootstrap/status", Some(&n1), None).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
    );
}

#[tokio::test]
async fn admin_feed_pages_by_cursor_and_aggregates_list_their_events() {
    let h = harness().await;
    h.enroll("n1", 256).await;
    let page = h
        .call("GET", "/v1/events?limit=2", Some(&h.admin), None)
        .await
        .json();
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["events"][0]["kind"], "ClusterInitialized");
    let bookmark: Cursor = serde_json::from_value(page["bookmark"].clone()).unwrap();
    assert_eq!(bookmark.event_id, 2);
    let next = h
        .call(
            "GET",
            &format!("/v1/events?cursor={bookmark}&limit=100"),
            Some(&h.admin),
            None,
        )
        .await
        .json();
    assert_eq!(next["events"][0]["event_id"], 3);
    let events = h
        .call(
            "GET",
            "/v1/admin/aggregates/node/n1/events",
            Some(&h.admin),
            None,
        )
        .await
        .json();
    assert_eq!(events[0]["kind"], "NodeRegistered");
    assert_eq!(events[0]["seq"], 1);
}

#[tokio::test]
async fn rebuilt_projections_equal_the_live_ones() {
    let h = harness().await;
    let n1 = h.enroll("n1", 1024).await;
    h.enroll("n2", 1024).await;
    assert_eq!(h.define(web(3, 100)).await.status, StatusCode::OK);
    let mut api = web(1, 50);
    api["name"] = json!("api");
    assert_eq!(h.define(api).await.status, StatusCode::OK);
    eventually("placed", || async { h.allocations().await.len() == 4 }).await;
    assert_eq!(
        h.call("POST", "/v1/nodes/n2/revoke", Some(&h.admin), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.call("DELETE", "/v1/services/api", Some(&h.admin), None)
            .await
            .status,
        StatusCode::OK
    );
    let events = json!({"node_id": "n1", "component": "storage", "action": "a", "status": "ok", "generation": "g1"});
    assert_eq!(
        h.call("POST", "/v1/bootstrap/events", Some(&n1), Some(events))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    eventually("settled after the revoke", || async {
        h.allocations().await.iter().all(|a| a["node_id"] == "n1")
            && h.allocations().await.len() == 3
    })
    .await;
    h.settled().await;
    let live = h.control.projector.views().clone();
    let rebuilt = crate::admin::rebuild_projections_in(h.control.store.as_ref()).unwrap();
    assert_eq!(rebuilt.checkpoint, live.checkpoint);
    let replayed = crate::projection::projector::replay(h.control.store.as_ref()).unwrap();
    assert_eq!(replayed, live);
}

/// Builds live state through the API on a redb store, stops control, runs the admin
/// `rebuild-projections` on the data dir, and checks the snapshot it saved — then a warm start
/// from it — against the live views.
#[test]
fn admin_rebuild_on_redb_saves_the_live_views_and_a_warm_start_serves_them() {
    use crate::projection::{VIEWS_PROJECTION, Views};
    let data_dir = tempfile::tempdir().unwrap();
    let store_path = data_dir.path().join(crate::server::STORE_FILE);
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let open = || -> Arc<dyn Store> {
        Arc::new(crate::store::redb::RedbStore::open(&store_path).unwrap())
    };
    // Live: nodes, services, a revocation, a deletion and a bootstrap report, settled.
    let live_runtime = runtime();
    let (live, live_api, admin) = live_runtime.block_on(async {
        let h = harness_with(open(), settings()).await;
        let n1 = h.enroll("n1", 1024).await;
        h.enroll("n2", 1024).await;
        assert_eq!(h.define(web(3, 100)).await.status, StatusCode::OK);
        let mut api = web(1, 50);
        api["name"] = json!("api");
        assert_eq!(h.define(api).await.status, StatusCode::OK);
        eventually("placed", || async { h.allocations().await.len() == 4 }).await;
        let revoke = h
            .call("POST", "/v1/nodes/n2/revoke", Some(&h.admin), None)
            .await;
        assert_eq!(revoke.status, StatusCode::OK);
        let delete = h
            .call("DELETE", "/v1/services/api", Some(&h.admin), None)
            .await;
        assert_eq!(delete.status, StatusCode::OK);
        let report = json!({"node_id": "n1", "component": "storage", "action": "a",
                            "status": "ok", "generation": "g1"});
        let reply = h
            .call("POST", "/v1/bootstrap/events", Some(&n1), Some(report))
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        eventually("the revoked node's replicas moved", || async {
            let allocations = h.allocations().await;
            allocations.len() == 3 && allocations.iter().all(|a| a["node_id"] == "n1")
        })
        .await;
        h.settled().await;
        let api = json!({
            "services": h.call("GET", "/v1/services", Some(&h.admin), None).await.json(),
            "allocations": h.allocations().await,
        });
        (h.control.projector.views().clone(), api, h.admin.clone())
    });
    // Stop control: every task and with them the store handle go with the runtime.
    drop(live_runtime);
    // A stale snapshot is what a rebuild must replace.
    open()
        .save_projection(VIEWS_PROJECTION, Views::new().to_snapshot())
        .unwrap();

    let report = crate::admin::rebuild_projections(data_dir.path()).unwrap();
    assert_eq!(
        (
            report.checkpoint,
            report.nodes,
            report.services,
            report.allocations
        ),
        (live.checkpoint, 2, 1, 3)
    );
    let store = open();
    let saved = store.load_projection(VIEWS_PROJECTION).unwrap().unwrap();
    assert_eq!(Views::from_snapshot(&saved).as_ref(), Some(&live));
    drop(store);

    // Warm start from the rebuilt snapshot: the views are the live ones before any replay, and
    // the API answers as it did, appending nothing.
    let warm_runtime = runtime();
    warm_runtime.block_on(async {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let started = Control::start(open(), settings(), clock.clone())
            .await
            .unwrap();
        assert!(
            started.admin_token.is_none(),
            "a warm start does not initialize"
        );
        assert_eq!(*started.control.projector.views(), live);
        let h = Harness {
            router: super::router(Arc::clone(&started.control)),
            control: started.control,
            admin,
            clock,
        };
        h.settled().await;
        let api = json!({
            "services": h.call("GET", "/v1/services", Some(&h.admin), None).await.json(),
            "allocations": h.allocations().await,
        });
        assert_eq!(api, live_api);
        assert_eq!(h.head(), live.checkpoint, "a warm start appends nothing");
        assert_eq!(*h.control.projector.views(), live);
    });
}

#[test]
fn cold_start_then_warm_start_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.redb");
    let run = |work: &dyn Fn(Arc<Control>, Option<String>) -> Value| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::redb::RedbStore::open(&path).unwrap());
        let value = runtime.block_on(async {
            let started = Control::start(
                store,
                settings(),
                Arc::new(ManualClock::new(1_800_000_000_000)),
            )
            .await
            .unwrap();
            let value = work(Arc::clone(&started.control), started.admin_token);
            let control = started.control;
            eventually("views at the head", || async {
                control.projector.checkpoint() == control.store.log_position().unwrap().head
            })
            .await;
            control.projector.save_now(control.store.as_ref());
            value
        });
        drop(runtime);
        value
    };
    let first = run(&|control, token| {
        assert!(token.is_some(), "an empty store is a cold start");
        json!({"cluster": control.identity.cluster_id, "fingerprint": control.identity.ca.fingerprint,
               "head": control.store.log_position().unwrap().head, "token": token,
               "epoch": control.store.log_position().unwrap().log_epoch})
    });
    let second = run(&|control, token| {
        assert!(token.is_none(), "a warm start does not initialize again");
        // The views come back from the saved snapshot, not from an empty replay.
        assert_eq!(
            control.projector.checkpoint(),
            control.store.log_position().unwrap().head
        );
        assert!(control.projector.views().orgs.contains("default"));
        json!({"cluster": control.identity.cluster_id, "fingerprint": control.identity.ca.fingerprint,
               "head": control.store.log_position().unwrap().head,
               "epoch": control.store.log_position().unwrap().log_epoch})
    });
    assert_eq!(first["cluster"], second["cluster"]);
    assert_eq!(first["fingerprint"], second["fingerprint"]);
    assert_eq!(
        first["head"], second["head"],
        "a warm start appends nothing"
    );
    assert_eq!(first["epoch"], second["epoch"]);
    // The admin token minted on the cold start still authenticates after the restart.
    let store = crate::secret::sealed_records::SealingStore::new(
        Arc::new(crate::store::redb::RedbStore::open(&path).unwrap()),
        test_master_keys(),
    );
    let token = first["token"].as_str().unwrap();
    let principal =
        crate::api::auth::authenticate(&store, Some(&format!("Bearer {token}"))).unwrap();
    assert_eq!(principal.org(), "default");
}

#[tokio::test]
async fn one_change_wakes_every_waiting_node_with_only_its_own_allocation() {
    let h = harness().await;
    let mut nodes = Vec::new();
    for index in 0..12 {
        let node_id = format!("n{index:02}");
        let credential = h.enroll(&node_id, 256).await;
        nodes.push((node_id, credential));
    }
    h.settled().await;
    let cursor = Cursor::new(h.control.hub.position().log_epoch, h.head());
    let mut waiting = Vec::new();
    for (node_id, credential) in &nodes {
        let router = h.router.clone();
        let request = Request::get(format!(
            "/v1/nodes/{node_id}/changes?cursor={cursor}&wait=60"
        ))
        .header("authorization", format!("Bearer {credential}"))
        .body(Body::empty())
        .unwrap();
        let node_id = node_id.clone();
        waiting.push(tokio::spawn(async move {
            let response = router.oneshot(request).await.unwrap();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (
                node_id,
                serde_json::from_slice::<ChangeBatch>(&bytes).unwrap(),
            )
        }));
    }
    // One replica per node: anti-affinity spreads them.
    assert_eq!(h.define(web(12, 100)).await.status, StatusCode::OK);
    for task in waiting {
        let (node_id, batch) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert!(
            !batch.events.is_empty(),
            "{node_id} was not woken with its change"
        );
        for event in &batch.events {
            let NodeChange::AllocationUpserted(allocation) = &event.change else {
                panic!("{node_id} got {:?}", event.change)
            };
            assert_eq!(allocation.node_id.as_str(), node_id);
        }
    }
}

#[tokio::test]
async fn plans_speak_postcard_only_with_the_same_wire_version() {
    let h = harness().await;
    let n1 = h.enroll("n1", 512).await;
    assert_eq!(h.define(web(1, 100)).await.status, StatusCode::OK);
    eventually("placed", || async { h.allocations().await.len() == 1 }).await;
    let get = |wire: &str| {
        Request::get("/v1/nodes/n1/plan")
            .header("authorization", format!("Bearer {n1}"))
            .header("accept", POSTCARD_CONTENT_TYPE)
            .header(WIRE_VERSION_HEADER, wire)
            .body(Body::empty())
            .unwrap()
    };
    let reply = h.send(get(&WIRE_VERSION.to_string())).await;
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        POSTCARD_CONTENT_TYPE
    );
    let plan: Plan = decode(Encoding::Postcard, &reply.bytes, 1 << 20, "plan").unwrap();
    assert_eq!(plan.allocations.len(), 1);
    // Another wire version gets JSON, which it can always read.
    let reply = h.send(get(&(WIRE_VERSION + 1).to_string())).await;
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        "application/json"
    );
    let json_plan: Plan = decode(Encoding::Json, &reply.bytes, 1 << 20, "plan").unwrap();
    assert_eq!(json_plan.allocations, plan.allocations);
}

#[tokio::test]
async fn an_unknown_credential_falls_back_to_an_enclosed_enrollment_token() {
    let h = harness().await;
    let token = h.enrollment_token().await;
    let request = json!({"node_credential": "opn.n1.from-a-lost-control", "enrollment_token": token,
                         "facts": Harness::facts("n1", 256)});
    let reply = h
        .call("POST", "/v1/nodes/register", None, Some(request))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let credential = reply.json()["node_credential"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(credential, "opn.n1.from-a-lost-control");
    // Without a token the unknown credential is simply refused.
    let request = json!({"node_credential": "opn.n1.from-a-lost-control", "facts": Harness::facts("n1", 256)});
    let reply = h
        .call("POST", "/v1/nodes/register", None, Some(request))
        .await;
    Harness::assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
}

/// The whole API path on PostgreSQL: the same logic on the other store adapter.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_runs_unchanged_on_postgresql() {
    let url = std::env::var("OUTPOST_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_string());
    let schema = format!("outpost_api_{:016x}", rand::random::<u64>());
    struct DropSchema(String, String);
    impl Drop for DropSchema {
        fn drop(&mut self) {
            let (url, schema) = (self.0.clone(), self.1.clone());
            // The sync client must not run on an async worker thread.
            let _ = std::thread::spawn(move || {
                if let Ok(mut client) = ::postgres::Client::connect(&url, ::postgres::NoTls) {
                    let _ =
                        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                }
            })
            .join();
        }
    }
    let _guard = DropSchema(url.clone(), schema.clone());
    let store = {
        let (url, schema) = (url.clone(), schema.clone());
        tokio::task::spawn_blocking(move || {
            crate::store::postgres::PostgresStore::open(&url, &schema).unwrap()
        })
        .await
        .unwrap()
    };
    let store: Arc<dyn Store> = Arc::new(store);
    let h = harness_with(Arc::clone(&store), settings()).await;
    let n1 = h.enroll("n1", 1024).await;
    h.enroll("n2", 1024).await;
    assert_eq!(h.define(web(2, 100)).await.status, StatusCode::OK);
    eventually("two replicas placed", || async {
        h.allocations().await.len() == 2
    })
    .await;
    let plan = h.plan("n1", &n1).await;
    assert_eq!(plan.allocations.len(), 1);
    let reply = h
        .call(
            "GET",
            &format!(
                "/v1/nodes/n1/changes?cursor={}&wait=0",
                Cursor::new(plan.as_of.log_epoch, 0)
            ),
            Some(&n1),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let store_for_replay = Arc::clone(&store);
    let head = tokio::task::spawn_blocking(move || store_for_replay.log_position().unwrap().head)
        .await
        .unwrap();
    eventually("views at the head", || async {
        h.control.projector.checkpoint() == head
    })
    .await;
    let live = h.control.projector.views().clone();
    let replayed = tokio::task::spawn_blocking(move || {
        crate::projection::projector::replay(store.as_ref()).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(replayed, live);
}

#[tokio::test]
async fn an_operator_sets_a_nodes_role_and_the_node_hears_it() {
    use outpost_proto::node::Role;
    let h = harness().await;
    let n1 = h.enroll("n1", 256).await;
    h.settled().await;
    let plan = h.plan("n1", &n1).await;
    assert_eq!(plan.role, Role::Worker);
    let reply = h
        .call(
            "POST",
            "/v1/nodes/n1/role",
            Some(&h.admin),
            Some(json!({"role": "proxy"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let reply = h
        .call(
            "GET",
            &format!("/v1/nodes/n1/changes?cursor={}&wait=5", plan.as_of),
            Some(&n1),
            None,
        )
        .await;
    let batch: ChangeBatch = serde_json::from_slice(&reply.bytes).unwrap();
    assert!(
        batch
            .events
            .iter()
            .any(|e| e.change == NodeChange::RoleChanged { role: Role::Proxy })
    );
    let mut folded = plan.clone();
    folded.fold_batch(&batch).unwrap();
    assert_eq!(folded.role, Role::Proxy);
    h.settled().await;
    assert_eq!(h.plan("n1", &n1).await.role, Role::Proxy);
    let heartbeat = h
        .call("POST", "/v1/nodes/n1/heartbeat", Some(&n1), Some(json!({})))
        .await;
    assert_eq!(heartbeat.json()["role"], "proxy");
    let head = h.head();
    let refusals = [
        (
            Some(h.admin.clone()),
            "n1",
            json!({"role": "king"}),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            Some(n1.clone()),
            "n1",
            json!({"role": "leader"}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            Some(h.admin.clone()),
            "n9",
            json!({"role": "leader"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (token, node, body, status, code) in refusals {
        let reply = h
            .call(
                "POST",
                &format!("/v1/nodes/{node}/role"),
                token.as_deref(),
                Some(body),
            )
            .await;
        Harness::assert_error(&reply, status, code);
    }
    assert_eq!(h.head(), head);
}

/// Two control cores sharing one store, as replicas share PostgreSQL: each follows the other's
/// appends, commands that race are refused by the store and run again, and the schedulers of
/// both never place a replica twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_a_store_converge() {
    use crate::store::Sharing;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::with_sharing(Sharing::SeveralWriters));
    let a = harness_with(Arc::clone(&store), settings()).await;
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let started = Control::start(Arc::clone(&store), settings(), clock.clone())
        .await
        .unwrap();
    assert!(
        started.admin_token.is_none(),
        "the second replica starts warm"
    );
    let b = Harness {
        router: super::router(Arc::clone(&started.control)),
        control: started.control,
        admin: a.admin.clone(),
        clock,
    };

    a.enroll("n1", 1024).await;
    b.enroll("n2", 1024).await;
    // Both replicas define services at once; one of them meets the other's append and retries.
    let mut api = web(2, 100);
    api["name"] = json!("api");
    let (from_a, from_b) = tokio::join!(a.define(web(2, 100)), b.define(api));
    assert_eq!(from_a.status, StatusCode::OK, "{}", from_a.json());
    assert_eq!(from_b.status, StatusCode::OK, "{}", from_b.json());
    for replica in [&a, &b] {
        eventually("four allocations seen by each replica", || async {
            replica.allocations().await.len() == 4
        })
        .await;
    }
    let head = store.log_position().unwrap().head;
    for replica in [&a, &b] {
        eventually("views at the shared head", || async {
            replica.control.projector.checkpoint() == head
        })
        .await;
    }
    let (views_a, views_b) = (
        a.control.projector.views().clone(),
        b.control.projector.views().clone(),
    );
    assert_eq!(views_a, views_b);
    for service in ["web", "api"] {
        let mut replicas: Vec<u32> = views_a
            .allocations
            .values()
            .filter(|x| x.service == service)
            .map(|x| x.replica)
            .collect();
        replicas.sort();
        assert_eq!(
            replicas,
            vec![0, 1],
            "{service} is placed exactly once per replica"
        );
    }
    let log = store.read_log(0, 10_000).unwrap();
    assert!(
        log.iter()
            .enumerate()
            .all(|(index, event)| event.event_id == index as u64 + 1)
    );
}

/// Two replicas on one PostgreSQL schema, each with its own connection.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgresql_converge() {
    let url = std::env::var("OUTPOST_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_string());
    let schema = format!("outpost_replicas_{:016x}", rand::random::<u64>());
    let open = |url: String, schema: String| async move {
        let store = tokio::task::spawn_blocking(move || {
            crate::store::postgres::PostgresStore::open(&url, &schema).unwrap()
        })
        .await
        .unwrap();
        Arc::new(store) as Arc<dyn Store>
    };
    let drop_schema = {
        let (url, schema) = (url.clone(), schema.clone());
        move || {
            let (url, schema) = (url.clone(), schema.clone());
            std::thread::spawn(move || {
                if let Ok(mut client) = ::postgres::Client::connect(&url, ::postgres::NoTls) {
                    let _ =
                        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                }
            })
            .join()
            .ok();
        }
    };
    struct OnDrop<F: FnMut()>(F);
    impl<F: FnMut()> Drop for OnDrop<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let _cleanup = OnDrop(drop_schema);
    let a = harness_with(open(url.clone(), schema.clone()).await, settings()).await;
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let started = Control::start(
        open(url.clone(), schema.clone()).await,
        settings(),
        clock.clone(),
    )
    .await
    .unwrap();
    assert!(
        started.admin_token.is_none(),
        "the second replica starts warm"
    );
    let b = Harness {
        router: super::router(Arc::clone(&started.control)),
        control: started.control,
        admin: a.admin.clone(),
        clock,
    };
    a.enroll("n1", 1024).await;
    b.enroll("n2", 1024).await;
    let mut api = web(2, 100);
    api["name"] = json!("api");
    let (from_a, from_b) = tokio::join!(a.define(web(2, 100)), b.define(api));
    assert_eq!(from_a.status, StatusCode::OK, "{}", from_a.json());
    assert_eq!(from_b.status, StatusCode::OK, "{}", from_b.json());
    for replica in [&a, &b] {
        eventually("four allocations seen by each replica", || async {
            replica.allocations().await.len() == 4
        })
        .await;
    }
    let services = a
        .call("GET", "/v1/services", Some(&a.admin), None)
        .await
        .json();
    assert_eq!(services.as_array().unwrap().len(), 2);
}

/// What the agent's profile reconcilers send (start, ok with the component generation, noop,
/// errors, the `profile` pseudo-component) becomes `applied[component] = generation` and the
/// current errors; an error keeps the last good generation; a success clears the error.
#[tokio::test]
async fn bootstrap_status_follows_the_reconcilers_reports() {
    let h = harness().await;
    let n1 = h.enroll("n1", 256).await;
    let report = |status: &str, component: &str, action: &str, generation: &str, message: &str| {
        json!({"node_id": "n1", "component": component, "action": action, "status": status,
               "generation": generation, "message": message})
    };
    let post = |events: Value| {
        let n1 = n1.clone();
        let h = &h;
        async move {
            let reply = h
                .call("POST", "/v1/bootstrap/events", Some(&n1), Some(events))
                .await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.json());
            h.settled().await;
            h.call(
                "GET",
                "/v1/bootstrap/status?node_id=n1",
                Some(&h.admin),
                None,
            )
            .await
            .json()
        }
    };
    let status = post(json!([
        report("start", "storage", "reconcile", "s1", ""),
        report("ok", "storage", "apply", "s1", "1 step(s) applied"),
        report("start", "broker", "reconcile", "b1", ""),
        report("error", "broker", "read_actual", "b1", "connection refused"),
        report(
            "error",
            "profile",
            "apply",
            "p1",
            "storage applied, broker failed, index blocked"
        ),
    ]))
    .await;
    assert_eq!(status["applied"], json!({"storage": "s1"}));
    let errors: Vec<&str> = status["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{status}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("broker read_actual") && e.contains("connection refused")),
        "{status}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("profile apply")),
        "{status}"
    );

    // The broker comes back: its error clears, every component shows its generation.
    let status = post(json!([
        report("start", "broker", "reconcile", "b1", ""),
        report("ok", "broker", "apply", "b1", "3 step(s) applied"),
        report("ok", "index", "apply", "i1", "1 step(s) applied"),
        report(
            "ok",
            "profile",
            "apply",
            "p1",
            "storage skipped, broker applied, index applied"
        ),
    ]))
    .await;
    assert_eq!(
        status,
        json!({"applied": {"storage": "s1", "broker": "b1", "index": "i1", "profile": "p1"}, "errors": []})
    );

    // A later check that finds nothing to do moves the generation; a start alone does not; an
    // error keeps the last good generation and shows the error.
    let status = post(json!([
        report("ok", "storage", "noop", "s2", ""),
        report("start", "index", "reconcile", "i2", ""),
        report(
            "error",
            "index",
            "add_property",
            "i2",
            "weaviate answered 500"
        ),
    ]))
    .await;
    assert_eq!(status["applied"]["storage"], "s2");
    assert_eq!(status["applied"]["index"], "i1");
    assert_eq!(status["errors"].as_array().unwrap().len(), 1, "{status}");
    assert!(
        status["errors"][0]
            .as_str()
            .unwrap()
            .contains("weaviate answered 500")
    );

    // Another node's status is its own.
    h.enroll("n2", 256).await;
    let other = h
        .call(
            "GET",
            "/v1/bootstrap/status?node_id=n2",
            Some(&h.admin),
            None,
        )
        .await
        .json();
    assert_eq!(other, json!({"applied": {}, "errors": []}));
}

/// SPEC issue 6: bad profiles — unknown fields, invalid names, negative TTL, oversized
/// documents — are refused with an error naming the field, and the previous profile stays.
#[tokio::test]
async fn bad_profiles_name_the_field_and_the_previous_profile_stays() {
    let h = harness().await;
    let good = json!({"apiVersion": "outpost/v1", "kind": "EnvironmentProfile", "metadata": {"name": "site"},
        "spec": {"storage": {"buckets": [{"name": "media"}]},
                 "broker": {"exchanges": [{"name": "events"}], "queues": [{"name": "thumbs", "message_ttl_ms": 60000}],
                            "bindings": [{"exchange": "events", "queue": "thumbs", "routing_key": "media.#"}]},
                 "index": {"classes": [{"name": "Article", "properties": [{"name": "title", "data_type": "text"}]}]}}});
    let reply = h
        .call(
            "PUT",
            "/v1/bootstrap/profile",
            Some(&h.admin),
            Some(good.clone()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let generation = reply.json()["generation"].clone();
    h.settled().await;
    let head = h.head();

    let with = |change: &dyn Fn(&mut Value)| {
        let mut profile = good.clone();
        change(&mut profile);
        profile
    };
    // (document, status, code, field, value seen)
    let cases: Vec<(Value, StatusCode, &str, &str, Option<&str>)> = vec![
        (
            with(&|p| p["spec"]["broker"]["queues"][0]["ttl"] = json!(5)),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "spec.broker.queues[0].ttl",
            None,
        ),
        (
            with(&|p| p["spec"]["storage"]["buckets"][0]["name"] = json!("Media Files!")),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "spec.storage.buckets[0].name",
            Some("Media Files!"),
        ),
        (
            with(&|p| p["spec"]["broker"]["exchanges"][0]["name"] = json!("x".repeat(64))),
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "spec.broker.exchanges[0].name",
            None,
        ),
        (
            with(&|p| p["spec"]["index"]["classes"][0]["name"] = json!("9lives")),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "spec.index.classes[0].name",
            Some("9lives"),
        ),
        (
            with(&|p| p["spec"]["broker"]["queues"][0]["message_ttl_ms"] = json!(-5)),
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "spec.broker.queues[0].message_ttl_ms",
            None,
        ),
        (
            with(&|p| p["spec"]["broker"]["queues"][0]["message_ttl_ms"] = json!(0)),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "spec.broker.queues[0].message_ttl_ms",
            Some("0"),
        ),
        (
            with(&|p| {
                p["spec"]["storage"]["buckets"] = json!(
                    (0..=outpost_proto::limits::PROFILE_LIST_MAX)
                        .map(|i| json!({"name": format!("bucket-{i}")}))
                        .collect::<Vec<_>>()
                )
            }),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "spec.storage.buckets",
            None,
        ),
    ];
    for (document, status, code, field, value) in cases {
        let reply = h
            .call(
                "PUT",
                "/v1/bootstrap/profile",
                Some(&h.admin),
                Some(document),
            )
            .await;
        let body = Harness::assert_error(&reply, status, code);
        assert_eq!(body["field"], field, "{body}");
        if let Some(value) = value {
            assert_eq!(body["value"], value, "{body}");
        }
        assert!(body["message"].as_str().unwrap().contains(field), "{body}");
    }

    // A document over the size limit is refused before it is parsed.
    let mut oversized = serde_json::to_vec(&good).unwrap();
    oversized.truncate(oversized.len() - 1);
    oversized.extend_from_slice(b",\"padding\":\"");
    oversized.resize(outpost_proto::limits::PROFILE_MAX_BYTES + 16, b'a');
    oversized.extend_from_slice(b"\"}");
    let body = Harness::assert_error(
        &h.raw("PUT", "/v1/bootstrap/profile", &h.admin, oversized)
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    assert_eq!(body["field"], "body");

    // A negative TTL in YAML is refused the same way.
    let yaml = "apiVersion: outpost/v1\nkind: EnvironmentProfile\nspec:\n  broker:\n    queues:\n      - name: thumbs\n        message_ttl_ms: -1\n";
    let request = Request::builder()
        .method("PUT")
        .uri("/v1/bootstrap/profile")
        .header("authorization", format!("Bearer {}", h.admin))
        .header("content-type", "application/yaml")
        .body(Body::from(yaml))
        .unwrap();
    let body = Harness::assert_error(
        &h.send(request).await,
        StatusCode::BAD_REQUEST,
        "invalid_body",
    );
    assert_eq!(body["field"], "spec.broker.queues[0].message_ttl_ms");

    assert_eq!(h.head(), head, "a refused profile appends nothing");
    let current = h
        .call("GET", "/v1/bootstrap/profile", Some(&h.admin), None)
        .await
        .json();
    let as_profile = |value: Value| {
        serde_json::from_value::<outpost_proto::profile::EnvironmentProfile>(value).unwrap()
    };
    assert_eq!(as_profile(current), as_profile(good.clone()));
    let reply = h
        .call("PUT", "/v1/bootstrap/profile", Some(&h.admin), Some(good))
        .await;
    assert_eq!(
        reply.json()["generation"],
        generation,
        "the same document, the same generation"
    );
}

/// Group commit (issue 10): commands waiting together go to the store as one batch, each keeps
/// its own answer, a refused command appends nothing and fails no neighbour, and a command
/// that read what a staged neighbour writes validates again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_waiting_together_commit_as_one_batch_with_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::redb::RedbStore::open(&dir.path().join("control.redb")).unwrap();
    let h = Arc::new(harness_with(Arc::new(store), settings()).await);
    let shared_token = h.enrollment_token().await;
    h.settled().await;
    let head_before = h.head();
    let batches_before = h
        .control
        .committer
        .batches_written
        .load(std::sync::atomic::Ordering::SeqCst);
    h.control.committer.pause();
    let mut issues = Vec::new();
    for _ in 0..16 {
        let h = Arc::clone(&h);
        issues.push(tokio::spawn(async move {
            h.call(
                "POST",
                "/v1/enrollment-tokens",
                Some(&h.admin),
                Some(json!({"ttl_secs": 600})),
            )
            .await
        }));
    }
    let register = |node: &str| {
        let (h, token, node) = (Arc::clone(&h), shared_token.clone(), node.to_string());
        tokio::spawn(async move {
            h.call(
                "POST",
                "/v1/nodes/register",
                None,
                Some(json!({"enrollment_token": token, "facts": Harness::facts(&node, 64)})),
            )
            .await
        })
    };
    let first = register("n1");
    eventually("17 commands staged", || async {
        h.control.committer.outstanding() == 17
    })
    .await;
    // The same one-time token again: it conflicts with the staged registration and waits.
    let second = register("n2");
    // Refused at validation: nothing staged, nothing appended, nobody else failed.
    let refused = h
        .call("DELETE", "/v1/services/missing", Some(&h.admin), None)
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(h.control.committer.outstanding(), 17);
    assert_eq!(
        h.head(),
        head_before,
        "nothing is durable while the writer waits"
    );
    h.control.committer.resume();
    let mut token_ids = std::collections::BTreeSet::new();
    for issue in issues {
        let reply = issue.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        token_ids.insert(reply.json()["token_id"].as_str().unwrap().to_string());
    }
    assert_eq!(token_ids.len(), 16, "each command keeps its own answer");
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK, "{}", first.json());
    let second = second.await.unwrap();
    assert_eq!(second.status, StatusCode::UNAUTHORIZED, "{}", second.json());
    assert_eq!(second.json()["error"], "enrollment_token_used");
    assert_eq!(
        h.control
            .committer
            .batches_written
            .load(std::sync::atomic::Ordering::SeqCst),
        batches_before + 1,
        "17 commands, one transaction"
    );
    // 16 tokens, and the registration's token use and node together, nothing else.
    let log = h.control.store.read_log(head_before, 100).unwrap();
    let kinds: Vec<&str> = log.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(log.len(), 18, "{kinds:?}");
    let issued = kinds
        .iter()
        .filter(|k| **k == "EnrollmentTokenIssued")
        .count();
    assert_eq!(issued, 16, "{kinds:?}");
    let used = kinds
        .iter()
        .position(|k| *k == "EnrollmentTokenUsed")
        .unwrap();
    assert_eq!(kinds[used + 1], "NodeRegistered", "{kinds:?}");
}

/// Status off the command path (issue 10): a heartbeat is answered while commands wait for
/// their batch, and a node that floods is refused by name without touching the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_never_wait_for_commands_and_a_flood_is_refused_by_name() {
    let h = Arc::new(harness().await);
    let n1 = h.enroll("n1", 64).await;
    let n2 = h.enroll("n2", 64).await;
    h.control.committer.pause();
    let waiting = {
        let h = Arc::clone(&h);
        tokio::spawn(async move { h.enrollment_token().await })
    };
    eventually("a command staged", || async {
        h.control.committer.outstanding() == 1
    })
    .await;
    let beat = |credential: &str, node: &str| {
        let (h, credential, node) = (Arc::clone(&h), credential.to_string(), node.to_string());
        async move {
            h.call(
                "POST",
                &format!("/v1/nodes/{node}/heartbeat"),
                Some(&credential),
                Some(json!({"allocations": []})),
            )
            .await
        }
    };
    let reply = beat(&n1, "n1").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "answered while a command waits"
    );
    let mut refused = None;
    for _ in 0..30 {
        let reply = beat(&n1, "n1").await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(reply);
            break;
        }
        assert_eq!(reply.status, StatusCode::OK);
    }
    let refused = refused.expect("a flood of heartbeats is refused");
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("node n1"),
        "{}",
        refused.json()
    );
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(
        beat(&n2, "n2").await.status,
        StatusCode::OK,
        "n2 is not affected"
    );
    h.control.committer.resume();
    waiting.await.unwrap();
    let nodes = h
        .call("GET", "/v1/nodes", Some(&h.admin), None)
        .await
        .json();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["last_heartbeat_unix_ms"].is_u64()),
        "{nodes}"
    );
}

// ------------------------------------------------------------------------------------------
// Routes and the edge feed (E1–E3)

fn web_with_port() -> Value {
    json!({"name": "web", "command": "/bin/sleep", "args": ["3600"], "replicas": 1,
           "memory_bytes": 64 * MIB, "ports": [{"name": "http", "port": 0}]})
}

fn shop_route(host: &str) -> Value {
    json!({"name": "shop", "hosts": [host], "service": "web", "port": "http"})
}

#[tokio::test]
async fn routes_are_checked_against_services_port_names_and_other_routes() {
    let h = harness().await;
    h.enroll("n1", 1024).await;
    assert_eq!(h.define(web_with_port()).await.status, StatusCode::OK);
    h.settled().await;
    let head = h.head();
    let post = |body: Value| h.call("POST", "/v1/routes", Some(&h.admin), Some(body));
    let mut unknown_service = shop_route("shop.test");
    unknown_service["service"] = json!("nope");
    Harness::assert_refused(
        &post(unknown_service).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "service",
        "nope",
    );
    let mut unknown_port = shop_route("shop.test");
    unknown_port["port"] = json!("grpc");
    Harness::assert_refused(
        &post(unknown_port).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "port",
        "grpc",
    );
    Harness::assert_refused(
        &post(shop_route("Shop..test")).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "hosts[0]",
        "Shop..test",
    );
    let mut out_of_range =
        json!({"name": "db", "listen_port": 70000, "service": "web", "port": "http"});
    Harness::assert_refused(
        &post(out_of_range.clone()).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "listen_port",
        "70000",
    );
    out_of_range["tls"] = json!("terminate");
    assert_eq!(post(out_of_range).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(h.head(), head, "refused routes append nothing");

    let reply = post(shop_route("shop.test")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert_eq!(reply.json()["route"]["name"], "shop");
    let mut copy = shop_route("shop.test");
    copy["name"] = json!("copy");
    let reply = post(copy).await;
    let body = Harness::assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_field");
    assert!(
        body["message"].as_str().unwrap().contains("route shop"),
        "{body}"
    );
    let listed = h.call("GET", "/v1/routes", Some(&h.admin), None).await;
    assert_eq!(listed.json().as_array().unwrap().len(), 1);
    let removed = h
        .call("DELETE", "/v1/routes/shop", Some(&h.admin), None)
        .await;
    assert_eq!(removed.status, StatusCode::OK);
    let gone = h
        .call("DELETE", "/v1/routes/shop", Some(&h.admin), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_edge_enrolls_and_follows_routes_and_backends_by_cursor() {
    let h = harness().await;
    let node = h.enroll("n1", 1024).await;
    assert_eq!(h.define(web_with_port()).await.status, StatusCode::OK);
    h.settled().await;
    let allocation = h.allocations().await[0]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let beat = h
        .call(
            "POST",
            "/v1/nodes/n1/heartbeat",
            Some(&node),
            Some(json!({"lan_address": "10.0.0.5", "allocations": [
                {"allocation_id": allocation, "state": "running", "ports": [{"name": "http", "port": 8080}]}
            ]})),
        )
        .await;
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.json());
    let applied = h
        .call(
            "POST",
            "/v1/routes",
            Some(&h.admin),
            Some(shop_route("shop.test")),
        )
        .await;
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.json());

    // Enrollment: one-time token, then a credential that only this edge may use.
    let token = h.enrollment_token().await;
    let register = json!({"edge_id": "e1", "enrollment_token": token});
    let reply = h
        .call("POST", "/v1/edges/register", None, Some(register.clone()))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let credential = reply.json()["edge_credential"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(credential.starts_with("ope.e1."));
    let reused = h
        .call("POST", "/v1/edges/register", None, Some(register))
        .await;
    assert_ne!(reused.status, StatusCode::OK, "a token enrolls once");
    // Another org's enrollment cannot take the edge id, and is not told whose it is (P4).
    let acme_admin = h.org_token("acme", json!(["admin"])).await;
    let acme_enrollment = h
        .call(
            "POST",
            "/v1/enrollment-tokens",
            Some(&acme_admin),
            Some(json!({"ttl_secs": 600})),
        )
        .await;
    assert_eq!(
        acme_enrollment.status,
        StatusCode::OK,
        "{}",
        acme_enrollment.json()
    );
    let taken = h
        .call(
            "POST",
            "/v1/edges/register",
            None,
            Some(json!({"edge_id": "e1", "enrollment_token": acme_enrollment.json()["token"]})),
        )
        .await;
    let body = Harness::assert_error(&taken, StatusCode::NOT_FOUND, "not_found");
    assert!(!body.to_string().contains("org"), "{body}");
    let audit = h
        .call("GET", "/v1/audit", Some(&h.admin), None)
        .await
        .json();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["act"] == "AccessRefused"
                && e["subject"] == "edge/e1"
                && e["actor"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("enrollment/"))),
        "the refused enrollment is in the audit: {audit}"
    );
    let wrong = h
        .call("GET", "/v1/edges/e1/routes", Some("ope.e1.s3cr3t"), None)
        .await;
    let body = Harness::assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(body["value"], "ope.e1", "{body}");
    assert!(
        !body.to_string().contains("s3cr3t"),
        "no secret in errors: {body}"
    );

    // Snapshot: the route and its backend at the node's LAN address and the reported port.
    let snapshot = h
        .call("GET", "/v1/edges/e1/routes", Some(&credential), None)
        .await;
    assert_eq!(snapshot.status, StatusCode::OK);
    let snapshot: outpost_proto::route::EdgeSnapshot =
        serde_json::from_slice(&snapshot.bytes).unwrap();
    assert_eq!(snapshot.routes.len(), 1);
    let backends = &snapshot.backends.routes["shop"];
    assert_eq!(
        (
            backends[0].address.as_str(),
            backends[0].port,
            backends[0].ready
        ),
        ("10.0.0.5", 8080, true)
    );

    // The feed: nothing new → an empty batch with a bookmark and no backends (same digest).
    let changes = |cursor: String, digest: String| {
        let h = &h;
        let credential = credential.clone();
        async move {
            h.call(
                "GET",
                &format!("/v1/edges/e1/changes?cursor={cursor}&wait=0&backends={digest}"),
                Some(&credential),
                None,
            )
            .await
        }
    };
    let quiet = changes(snapshot.as_of.to_string(), snapshot.backends.digest.clone()).await;
    assert_eq!(quiet.status, StatusCode::OK);
    let quiet: outpost_proto::route::EdgeBatch = serde_json::from_slice(&quiet.bytes).unwrap();
    assert!(
        quiet.events.is_empty() && quiet.backends.is_none(),
        "{quiet:?}"
    );
    // A route change comes as an event past the cursor; the fold serves it.
    let changed = h
        .call(
            "POST",
            "/v1/routes",
            Some(&h.admin),
            Some(shop_route("shop2.test")),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK);
    let batch = changes(snapshot.as_of.to_string(), snapshot.backends.digest.clone()).await;
    let batch: outpost_proto::route::EdgeBatch = serde_json::from_slice(&batch.bytes).unwrap();
    let table = outpost_proto::route::EdgeTable::from_snapshot(snapshot.clone()).folded(&batch);
    assert_eq!(table.routes["shop"].hosts, vec!["shop2.test".to_string()]);
    // Another epoch's cursor is 410 Gone pointing at the snapshot.
    let other_epoch = outpost_proto::Cursor::new(snapshot.as_of.log_epoch ^ 1, 1);
    let gone = changes(other_epoch.to_string(), String::new()).await;
    assert_eq!(gone.status, StatusCode::GONE);
    assert_eq!(gone.json()["snapshot"], "/v1/edges/e1/routes");

    // What the edge reports shows in `routes ls`.
    let report = json!({"cursor": table.as_of, "route_count": 1,
        "backends": [{"route": "shop", "address": "10.0.0.5", "port": 8080, "healthy": true}]});
    let reported = h
        .call(
            "POST",
            "/v1/edges/e1/report",
            Some(&credential),
            Some(report),
        )
        .await;
    assert_eq!(reported.status, StatusCode::NO_CONTENT);
    let listed = h
        .call("GET", "/v1/routes", Some(&h.admin), None)
        .await
        .json();
    assert_eq!(listed[0]["edges"][0]["edge_id"], "e1");
    assert_eq!(listed[0]["edges"][0]["healthy_backends"], 1);
}
#[path = "delivery_tests.rs"]
mod delivery;

mod placement;
mod secret_input;

mod at_rest;
mod audit;
mod tenancy;
