//! Enrollment with the site join secret (D2): a node with no one-time token proves it holds the
//! secret with a `JoinProof` (`opj1.NODE_ID.UNIX_SECS.HMAC`, sent as `enrollment_token`), and a
//! node of the site asks for the read token its standby copy of the log needs
//! (`POST /v1/site/standby-token`). docs/api.md and docs/election.md give the exact scheme.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use outpost_proto::node::RegisterRequest;
use outpost_proto::site::JoinProof;
use serde::{Deserialize, Serialize};

use crate::api::auth::{
    NODE_CREDENTIAL_PREFIX, NodeCredentialSecret, Scope, node_credential_key, random_hex,
    read_node_credential, sha256_hex,
};
use crate::api::error::ApiError;
use crate::app::{Control, blocking};
use crate::init::{DEFAULT_ORG, mint_operator_token, operator_token_commit};
use crate::log::{Event, RegisteredWith};
use crate::store::Commit;

/// Lifetime of a standby read token.
pub const STANDBY_TOKEN_TTL_SECS: u64 = 3600;

/// Path of the standby-token endpoint.
pub const PATH_STANDBY_TOKEN: &str = "/v1/site/standby-token";

/// 401 for a join proof sent as `field`, naming the proof without its HMAC (within its window
/// the proof itself is a credential).
fn refused<'a>(
    field: &'static str,
    text: &'a str,
) -> impl Fn(outpost_proto::site::JoinProofError) -> ApiError + 'a {
    move |error| {
        let shown = match JoinProof::parse(text) {
            Ok(proof) => format!(
                "{}{}.{}",
                outpost_proto::site::JOIN_PROOF_PREFIX,
                proof.node_id,
                proof.at_unix
            ),
            Err(_) => "(malformed join proof)".into(),
        };
        ApiError::unauthorized(field, shown, error.to_string())
    }
}

/// Checks a join proof's text, sent as `field`, for `node_id` against this control's join
/// secret and clock.
pub fn check_join_proof(
    control: &Control,
    field: &'static str,
    text: &str,
    node_id: &str,
) -> Result<(), ApiError> {
    let proof = JoinProof::parse(text).map_err(refused(field, text))?;
    proof
        .verify(
            control.settings.site.join_secret.as_deref(),
            node_id,
            control.clock.now_unix_secs(),
        )
        .map_err(refused(field, text))
}

/// The credential and the commit that register a node proven with the join secret. The node
/// joins the `default` org; a revoked node stays revoked.
pub async fn join_commit(
    control: &Control,
    request: &RegisterRequest,
    proof_text: &str,
) -> Result<(String, Commit), ApiError> {
    let node_id = request.facts.node_id.to_string();
    check_join_proof(control, "enrollment_token", proof_text, &node_id)?;
    let store = Arc::clone(&control.store);
    let id = node_id.clone();
    let stored = blocking(move || read_node_credential(store.as_ref(), &id)).await?;
    if let Some(existing) = &stored {
        if existing.revoked {
            return Err(ApiError::NodeRevoked { node_id });
        }
        if existing.org != DEFAULT_ORG {
            return Err(ApiError::forbidden(
                "node_id",
                node_id.as_str(),
                format!(
                    "node {node_id} belongs to org {}, not to the site",
                    existing.org
                ),
            ));
        }
    }
    let secret = random_hex(32);
    let credential = format!("{NODE_CREDENTIAL_PREFIX}.{node_id}.{secret}");
    let event = Event::NodeRegistered {
        node_id: node_id.clone(),
        org: DEFAULT_ORG.to_string(),
        facts: request.facts.clone(),
        with: RegisteredWith::JoinSecret,
    };
    let node_secret = NodeCredentialSecret {
        org: DEFAULT_ORG.to_string(),
        secret_sha256: sha256_hex(&secret),
        revoked: false,
    };
    let commit = Commit {
        events: vec![event.to_new_event()],
        config_writes: vec![Control::config_put(
            node_credential_key(&node_id),
            &node_secret,
        )],
        ..Commit::default()
    };
    Ok((credential, commit))
}

/// `POST /v1/site/standby-token` body.
#[derive(Debug, Deserialize)]
pub struct StandbyTokenRequest {
    pub join_proof: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StandbyTokenAnswer {
    pub token: String,
    pub token_id: String,
}

/// Hands a node of the site a `default`-org token with scope `events:read`, so it can keep a
/// standby copy of the log (`GET /v1/events`).
pub async fn standby_token(
    State(control): State<Arc<Control>>,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|error| ApiError::InvalidBody {
            reason: format!("cannot read the body: {error}"),
            field: None,
        })?;
    let request: StandbyTokenRequest =
        serde_json::from_slice(&bytes).map_err(|error| ApiError::InvalidBody {
            reason: format!("expected {{\"join_proof\": \"opj1....\"}}: {error}"),
            field: None,
        })?;
    let proof = JoinProof::parse(&request.join_proof)
        .map_err(refused("join_proof", &request.join_proof))?;
    check_join_proof(&control, "join_proof", &request.join_proof, &proof.node_id)?;
    // Read-only and short-lived: the standby asks for a fresh one with a new proof when it
    // is refused (agent/src/election/site.rs drops its token on any error).
    let mut minted = mint_operator_token(DEFAULT_ORG, vec![Scope::EventsRead]);
    minted.stored.expires_at_unix = Some(
        control
            .clock
            .now_unix_secs()
            .saturating_add(STANDBY_TOKEN_TTL_SECS),
    );
    let (event, write) = operator_token_commit(&minted);
    let guard = control.lock_commands().await;
    control
        .commit(
            guard,
            Commit {
                events: vec![event.to_new_event()],
                config_writes: vec![write],
                ..Commit::default()
            },
        )
        .await?;
    Ok(Json(StandbyTokenAnswer {
        token: minted.token,
        token_id: minted.token_id,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{Request, StatusCode};
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;
    use crate::app::{ControlSettings, Followers, ManualClock};
    use crate::discovery::SiteSettings;
    use crate::store::memory::MemoryStore;

    const NOW_MS: u64 = 1_800_000_000_000;
    const SECRET: &str = "site-secret-0123456789";

    async fn router_with(join_secret: Option<&str>) -> axum::Router {
        let settings = ControlSettings {
            projection_wait: Duration::from_secs(3),
            followers: Followers::LivenessOnDemand,
            site: SiteSettings {
                join_secret: join_secret.map(str::to_string),
                leader_epoch: Some(7),
            },
            ..ControlSettings::for_url("https://control.test:7443")
        };
        let started = Control::start(
            Arc::new(MemoryStore::new()),
            settings,
            Arc::new(ManualClock::new(NOW_MS)),
        )
        .await
        .unwrap();
        crate::api::router(started.control)
    }

    async fn post(router: &axum::Router, path: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn register_body(proof: &str, node_id: &str) -> Value {
        json!({"enrollment_token": proof, "facts": {"node_id": node_id, "hostname": "h",
            "arch": "x86_64", "capacity": {"memory_bytes": 1u64 << 30, "cpu_millis": 1000}}})
    }

    #[tokio::test]
    async fn a_join_proof_enrolls_with_the_right_secret_only() {
        let router = router_with(Some(SECRET)).await;
        let now = NOW_MS / 1000;
        let good = JoinProof::new(SECRET, "edge-1", now).to_text();
        let (status, answer) = post(
            &router,
            "/v1/nodes/register",
            register_body(&good, "edge-1"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(
            answer["node_credential"]
                .as_str()
                .unwrap()
                .starts_with("opn.edge-1.")
        );
        assert_eq!(answer["epoch"], 7, "the leadership epoch is the site's");
        // A join proof can be presented again (it is not one-time): same node, new credential.
        let again = JoinProof::new(SECRET, "edge-1", now + 1).to_text();
        let (status, _) = post(
            &router,
            "/v1/nodes/register",
            register_body(&again, "edge-1"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);

        let wrong = JoinProof::new("another-secret-000000", "edge-2", now).to_text();
        let (status, answer) = post(
            &router,
            "/v1/nodes/register",
            register_body(&wrong, "edge-2"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            answer["message"].as_str().unwrap().contains("wrong secret"),
            "{answer}"
        );
        // The body names the proof by node and time, never its HMAC.
        assert_eq!(answer["field"], "enrollment_token", "{answer}");
        assert_eq!(answer["value"], format!("opj1.edge-2.{now}"), "{answer}");
        let stale = JoinProof::new(SECRET, "edge-2", now - 3600).to_text();
        let (status, answer) = post(
            &router,
            "/v1/nodes/register",
            register_body(&stale, "edge-2"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            answer["message"].as_str().unwrap().contains("clock"),
            "{answer}"
        );
        let other = JoinProof::new(SECRET, "edge-3", now).to_text();
        let (status, _) = post(
            &router,
            "/v1/nodes/register",
            register_body(&other, "edge-2"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn without_a_secret_no_join_proof_is_accepted() {
        let router = router_with(None).await;
        let proof = JoinProof::new(SECRET, "edge-1", NOW_MS / 1000).to_text();
        let (status, answer) = post(
            &router,
            "/v1/nodes/register",
            register_body(&proof, "edge-1"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("without a site join secret"),
            "{answer}"
        );
        let (status, answer) =
            post(&router, PATH_STANDBY_TOKEN, json!({ "join_proof": proof })).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer["field"], "join_proof", "{answer}");
        assert_eq!(answer["value"], format!("opj1.edge-1.{}", NOW_MS / 1000));
    }

    #[tokio::test]
    async fn the_standby_token_reads_events_and_nothing_else() {
        let router = router_with(Some(SECRET)).await;
        let proof = JoinProof::new(SECRET, "edge-1", NOW_MS / 1000).to_text();
        let (status, answer) =
            post(&router, PATH_STANDBY_TOKEN, json!({ "join_proof": proof })).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let token = answer["token"].as_str().unwrap().to_string();
        let get = |path: &str| {
            Request::builder()
                .uri(path)
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap()
        };
        let events = router.clone().oneshot(get("/v1/events")).await.unwrap();
        assert_eq!(events.status(), StatusCode::OK);
        let services = router.clone().oneshot(get("/v1/services")).await.unwrap();
        assert_eq!(services.status(), StatusCode::FORBIDDEN);
        let (status, _) = post(&router, PATH_STANDBY_TOKEN, json!({"join_proof": "opj1.x"})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}
