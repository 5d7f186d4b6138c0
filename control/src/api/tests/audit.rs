//! In-process API tests of the audit trail (P11): each security-relevant act appears in
//! `GET /v1/audit` with its actor; refused attempts on another org's objects are coalesced.

use super::*;
use crate::api::auth::credential_public_part;

fn acts(audit: &Value) -> Vec<(String, String, String)> {
    audit
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {audit}"))
        .iter()
        .map(|e| {
            (
                e["act"].as_str().unwrap().to_string(),
                e["actor"].as_str().unwrap().to_string(),
                e["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn has(audit: &[(String, String, String)], act: &str, actor: &str, subject: &str) -> bool {
    audit
        .iter()
        .any(|(a, b, c)| a == act && b == actor && c == subject)
}

#[tokio::test]
async fn the_audit_shows_each_act_with_its_actor() {
    let h = harness().await;
    let admin = credential_public_part(&h.admin);
    let reply = h
        .call(
            "POST",
            "/v1/admin/tokens",
            Some(&h.admin),
            Some(json!({"org": "acme", "scopes": ["admin"]})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let acme_token = reply.json()["token"].as_str().unwrap().to_string();
    let acme_token_id = reply.json()["token_id"].as_str().unwrap().to_string();
    let acme = credential_public_part(&acme_token);
    // acme: an enrollment token, a node, a secret, a service and a route.
    let enrollment = h
        .call(
            "POST",
            "/v1/enrollment-tokens",
            Some(&acme_token),
            Some(json!({"ttl_secs": 600})),
        )
        .await
        .json();
    let enrollment_id = enrollment["token_id"].as_str().unwrap().to_string();
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"enrollment_token": enrollment["token"], "facts": Harness::facts("a1", 1024)})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let reply = h
        .call(
            "PUT",
            "/v1/secrets/db",
            Some(&acme_token),
            Some(json!({"values": {"password": "audit-test-value"}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let reply = h
        .call(
            "POST",
            "/v1/services",
            Some(&acme_token),
            Some(web_with_port()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let reply = h
        .call(
            "POST",
            "/v1/routes",
            Some(&acme_token),
            Some(json!({"name": "shop", "hosts": ["shop.acme.test"], "service": "web", "port": "http"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    // The default org's `api`, probed three times by acme: one coalesced refusal.
    let mut api = web(1, 10);
    api["name"] = json!("api");
    assert_eq!(h.define(api).await.status, StatusCode::OK);
    for _ in 0..3 {
        let reply = h
            .call("GET", "/v1/services/api", Some(&acme_token), None)
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
    }
    // A name no org has is not a refusal of another org's object.
    let reply = h
        .call("GET", "/v1/services/nobody", Some(&acme_token), None)
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // The admin revokes acme's node and token.
    let reply = h
        .call(
            "POST",
            "/v1/nodes/a1/revoke",
            Some(&h.admin),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::NOT_FOUND,
        "the default org's admin does not name acme's node either"
    );
    let reply = h
        .call(
            "POST",
            "/v1/nodes/a1/revoke",
            Some(&acme_token),
            Some(json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    h.settled().await;
    let reply = h
        .call(
            "POST",
            &format!("/v1/admin/tokens/{acme_token_id}/revoke"),
            Some(&h.admin),
            Some(json!({})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    h.settled().await;

    let reply = h.call("GET", "/v1/audit", Some(&h.admin), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let audit = acts(&reply.json());
    let token_aggregate = format!("operator-token/{acme_token_id}");
    for (act, actor, subject) in [
        (
            "OperatorTokenIssued",
            admin.as_str(),
            token_aggregate.as_str(),
        ),
        (
            "EnrollmentTokenIssued",
            acme.as_str(),
            &format!("enrollment-token/{enrollment_id}"),
        ),
        ("NodeRegistered", "opn.a1", "node/a1"),
        ("SecretVersionSet", acme.as_str(), "secret/acme/db"),
        ("RouteDefined", acme.as_str(), "route/acme/shop"),
        ("AccessRefused", acme.as_str(), "service/api"),
        ("AccessRefused", admin.as_str(), "node/a1"),
        ("NodeRevoked", acme.as_str(), "node/a1"),
        (
            "OperatorTokenRevoked",
            admin.as_str(),
            token_aggregate.as_str(),
        ),
    ] {
        assert!(
            has(&audit, act, actor, subject),
            "{act} by {actor} on {subject} missing from {audit:#?}"
        );
    }
    let refusal = reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["act"] == "AccessRefused" && e["subject"] == "service/api")
        .cloned()
        .unwrap();
    assert_eq!(refusal["count"], 3, "{refusal}");
    assert!(
        !audit.iter().any(|(_, _, s)| s == "service/nobody"),
        "{audit:?}"
    );
    // Control's own acts name the system and the reason; no value is ever shown.
    assert!(
        !String::from_utf8_lossy(&reply.bytes).contains("audit-test-value"),
        "a secret value in the audit"
    );
    let events = h
        .call("GET", "/v1/events", Some(&h.admin), None)
        .await
        .json();
    let placed = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "AllocationPlaced")
        .cloned()
        .unwrap_or_default();
    assert_eq!(placed["data"]["actor"], "system: scheduler", "{placed}");

    // `--since` leaves older acts out; a tenant with audit:read sees its own org only.
    let later = h.control.clock.now_unix_ms() + 60_000;
    let reply = h
        .call(
            "GET",
            &format!("/v1/audit?since_unix_ms={later}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(reply.json(), json!([]));
    let auditor = h.org_token("acme", json!(["audit:read"])).await;
    let reply = h.call("GET", "/v1/audit", Some(&auditor), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let theirs = reply.json();
    assert!(
        theirs
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["org"] == "acme"),
        "{theirs:#}"
    );
    assert!(has(
        &acts(&theirs),
        "SecretVersionSet",
        &acme,
        "secret/acme/db"
    ));
    let reply = h
        .call("GET", "/v1/audit?since_unix_ms=soon", Some(&auditor), None)
        .await;
    Harness::assert_refused(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "since_unix_ms",
        "soon",
    );
}

/// Every path that answers 404 for another org's object records the refusal: a node's plan and
/// bootstrap status, a service's rollout, an edge's routes, an artifact's download and removal
/// (as well as the service, route, secret and node paths above).
#[tokio::test]
async fn every_path_refusing_another_orgs_object_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings();
    settings.artifacts = crate::artifact::ArtifactConfig {
        store: crate::artifact::BlobStoreConfig::Directory(dir.path().to_path_buf()),
        max_bytes: 1 << 20,
    };
    let h = harness_configured(settings).await;
    let acme_token = h.org_token("acme", json!(["admin"])).await;
    let acme = credential_public_part(&acme_token);
    // The default org's node, service and artifact.
    h.enroll("n1", 1024).await;
    assert_eq!(h.define(web(1, 10)).await.status, StatusCode::OK);
    let bytes = b"the default org's artifact".to_vec();
    let sha256 = outpost_proto::hash::sha256_hex(&bytes);
    let reply = h
        .raw(
            "PUT",
            &format!("/v1/artifacts/{sha256}?name=app.tar"),
            &h.admin,
            bytes,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    h.settled().await;
    let probes = [
        ("GET", "/v1/nodes/n1/plan".to_string(), "node/n1"),
        (
            "GET",
            "/v1/bootstrap/status?node_id=n1".to_string(),
            "node/n1",
        ),
        ("GET", "/v1/services/web/rollout".to_string(), "service/web"),
        ("GET", format!("/v1/artifacts/{sha256}"), "artifact"),
        ("DELETE", format!("/v1/artifacts/{sha256}"), "artifact"),
    ];
    for (method, path, subject) in &probes {
        let reply = h.call(method, path, Some(&acme_token), None).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            String::from_utf8_lossy(&reply.bytes)
        );
        let subject = if *subject == "artifact" {
            format!("artifact/{sha256}")
        } else {
            subject.to_string()
        };
        let audit = acts(
            &h.call("GET", "/v1/audit", Some(&h.admin), None)
                .await
                .json(),
        );
        assert!(
            has(&audit, "AccessRefused", &acme, &subject),
            "{method} {path} left no refusal of {subject} in {audit:?}"
        );
    }
    // A service of acme that refers to the default org's secret or artifact is refused as if
    // neither existed, and the attempt is recorded.
    let reply = h
        .call(
            "PUT",
            "/v1/secrets/db",
            Some(&h.admin),
            Some(json!({"values": {"password": "the-default-orgs-value"}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    h.settled().await;
    let mut borrows_secret = web(1, 10);
    borrows_secret["name"] = json!("borrower");
    borrows_secret["secrets"] = json!([{"name": "db", "env": {"DB_PASSWORD": "password"}}]);
    let mut borrows_artifact = web(1, 10);
    borrows_artifact["name"] = json!("borrower");
    borrows_artifact["artifact"] = json!({"sha256": sha256});
    for (spec, subject, field) in [
        (borrows_secret, "secret/db".to_string(), "secrets[0].name"),
        (
            borrows_artifact,
            format!("artifact/{sha256}"),
            "artifact.sha256",
        ),
    ] {
        let reply = h
            .call("POST", "/v1/services", Some(&acme_token), Some(spec))
            .await;
        let body = String::from_utf8_lossy(&reply.bytes).into_owned();
        assert!(reply.status.is_client_error(), "{body}");
        assert!(body.contains(field), "{body}");
        assert!(
            !body.contains("the-default-orgs-value")
                && !body.contains("another org")
                && !body.contains("default"),
            "{body}"
        );
        let audit = acts(
            &h.call("GET", "/v1/audit", Some(&h.admin), None)
                .await
                .json(),
        );
        assert!(
            has(&audit, "AccessRefused", &acme, &subject),
            "no refusal of {subject} in {audit:?}"
        );
    }
    // The artifact is still the default org's.
    let reply = h
        .call(
            "GET",
            &format!("/v1/artifacts/{sha256}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// An enrollment token of one org naming a node id another org holds is refused as unknown,
/// and the attempt is in the audit with the enrollment token as its actor.
#[tokio::test]
async fn registering_another_orgs_node_id_is_refused_and_recorded() {
    let h = harness().await;
    h.enroll("n1", 1024).await;
    let acme_token = h.org_token("acme", json!(["admin"])).await;
    let enrollment = h
        .call(
            "POST",
            "/v1/enrollment-tokens",
            Some(&acme_token),
            Some(json!({"ttl_secs": 600})),
        )
        .await;
    assert_eq!(enrollment.status, StatusCode::OK, "{}", enrollment.json());
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"enrollment_token": enrollment.json()["token"], "facts": Harness::facts("n1", 1024)})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.json());
    let audit = h
        .call("GET", "/v1/audit", Some(&h.admin), None)
        .await
        .json();
    assert!(
        acts(&audit)
            .iter()
            .any(|(act, actor, subject)| act == "AccessRefused"
                && actor.starts_with("enrollment/")
                && subject == "node/n1"),
        "{audit}"
    );
}
