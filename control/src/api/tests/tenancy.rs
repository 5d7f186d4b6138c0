//! In-process API tests of tenancy (P4): two orgs each run a `web` (service, route, secret)
//! on their own nodes, and neither can list, read or delete the other's objects — the answer
//! to another org's name is the 404 an unknown name gets.

use super::*;

/// Registers `node_id` into the org of `operator` (who issues the enrollment token).
async fn enroll_into(h: &Harness, operator: &str, node_id: &str) {
    let reply = h
        .call(
            "POST",
            "/v1/enrollment-tokens",
            Some(operator),
            Some(json!({"ttl_secs": 600})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let enrollment = reply.json()["token"].as_str().unwrap().to_string();
    let reply = h
        .call(
            "POST",
            "/v1/nodes/register",
            None,
            Some(json!({"enrollment_token": enrollment, "facts": Harness::facts(node_id, 1024)})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
}

/// Defines `web` (with a port and the secret `db`), the route `web` and the secret `db` in the
/// org of `operator`; `host` is the route's host.
async fn run_web(h: &Harness, operator: &str, replicas: u32, host: &str) {
    let reply = h
        .call(
            "PUT",
            "/v1/secrets/db",
            Some(operator),
            Some(json!({"values": {"password": format!("pw-{host}")}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let mut spec = web_with_port();
    spec["replicas"] = json!(replicas);
    spec["secrets"] = json!([{"name": "db", "env": {"DB_PASSWORD": "password"}}]);
    let reply = h
        .call("POST", "/v1/services", Some(operator), Some(spec))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let reply = h
        .call(
            "POST",
            "/v1/routes",
            Some(operator),
            Some(json!({"name": "web", "hosts": [host], "service": "web", "port": "http"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
}

fn names(listing: &Value, field: &str) -> Vec<String> {
    let mut names: Vec<String> = listing
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {listing}"))
        .iter()
        .map(|item| item[field].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn two_orgs_each_run_a_web_and_neither_sees_the_others() {
    let h = harness().await;
    let acme = h.org_token("acme", json!(["admin"])).await;
    let ours = h.admin.clone();
    enroll_into(&h, &ours, "n1").await;
    enroll_into(&h, &acme, "a1").await;
    run_web(&h, &ours, 1, "web.default.test").await;
    run_web(&h, &acme, 2, "web.acme.test").await;
    // Only the default org has `api`, only acme has `worker`.
    let mut api = web(1, 10);
    api["name"] = json!("api");
    assert_eq!(h.define(api).await.status, StatusCode::OK);
    let mut worker = web_with_port();
    worker["name"] = json!("worker");
    let reply = h
        .call("POST", "/v1/services", Some(&acme), Some(worker))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    h.settled().await;

    // Each org's `web` runs on its own org's node, with its own replica count.
    for (operator, org, node, replicas, others) in [
        (&ours, "default", "n1", 1, vec!["api", "web"]),
        (&acme, "acme", "a1", 2, vec!["web", "worker"]),
    ] {
        let web = h
            .call("GET", "/v1/services/web", Some(operator), None)
            .await
            .json();
        assert_eq!(
            (web["org"].clone(), web["spec"]["replicas"].clone()),
            (json!(org), json!(replicas)),
            "{web}"
        );
        let services = h.call("GET", "/v1/services", Some(operator), None).await;
        assert_eq!(names(&services.json(), "name"), others);
        let allocations = h
            .call("GET", "/v1/allocations", Some(operator), None)
            .await
            .json();
        let on: Vec<(String, String)> = allocations
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["service"].as_str().unwrap().to_string(),
                    a["node_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(
            !on.is_empty() && on.iter().all(|(_, n)| n == node),
            "{org} allocations: {allocations}"
        );
        let nodes = h.call("GET", "/v1/nodes", Some(operator), None).await;
        assert_eq!(names(&nodes.json(), "node_id"), vec![node.to_string()]);
        let routes = h.call("GET", "/v1/routes", Some(operator), None).await;
        assert_eq!(names(&routes.json(), "name"), vec!["web".to_string()]);
        let secrets = h.call("GET", "/v1/secrets", Some(operator), None).await;
        assert_eq!(names(&secrets.json(), "name"), vec!["db".to_string()]);
    }
    assert_eq!(
        h.call("GET", "/v1/services/web/releases", Some(&acme), None)
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // The other org's names are not found: no read, no delete, nothing appended.
    let head = h.head();
    for (operator, service, node) in [(&acme, "api", "n1"), (&ours, "worker", "a1")] {
        for (method, path, what, value) in [
            ("GET", format!("/v1/services/{service}"), "service", service),
            (
                "DELETE",
                format!("/v1/services/{service}"),
                "service",
                service,
            ),
            (
                "GET",
                format!("/v1/services/{service}/releases"),
                "service",
                service,
            ),
            (
                "POST",
                format!("/v1/services/{service}/rollback"),
                "service",
                service,
            ),
            ("POST", format!("/v1/nodes/{node}/labels"), "node", node),
            ("POST", format!("/v1/nodes/{node}/cordon"), "node", node),
            ("POST", format!("/v1/nodes/{node}/revoke"), "node", node),
        ] {
            let body = match (method, path.ends_with("/rollback")) {
                ("POST", true) => Some(json!({"to": 1})),
                ("POST", false) => Some(json!({"set": {"zone": "a"}})),
                _ => None,
            };
            let reply = h.call(method, &path, Some(operator), body).await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{method} {path}: {}",
                String::from_utf8_lossy(&reply.bytes)
            );
            let body = reply.json();
            assert_eq!(
                (body["field"].as_str(), body["value"].as_str()),
                (Some(what), Some(value)),
                "{method} {path}: {body}"
            );
        }
    }
    assert_eq!(h.head(), head, "a refused call appended nothing");

    // Deleting one org's `web` (service, route, secret) leaves the other's running.
    let reply = h.call("DELETE", "/v1/routes/web", Some(&acme), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let reply = h
        .call("DELETE", "/v1/services/web", Some(&acme), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let reply = h.call("DELETE", "/v1/secrets/db", Some(&acme), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    h.settled().await;
    let reply = h.call("GET", "/v1/services/web", Some(&acme), None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let web = h
        .call("GET", "/v1/services/web", Some(&ours), None)
        .await
        .json();
    assert_eq!(
        (web["org"].clone(), web["placed"].clone()),
        (json!("default"), json!(1))
    );
    let routes = h.call("GET", "/v1/routes", Some(&ours), None).await;
    assert_eq!(names(&routes.json(), "name"), vec!["web".to_string()]);
    let secrets = h.call("GET", "/v1/secrets", Some(&ours), None).await;
    assert_eq!(names(&secrets.json(), "name"), vec!["db".to_string()]);

    // A host is one namespace for the cluster: acme cannot claim ours, and is not told our
    // route's name.
    let reply = h
        .call(
            "POST",
            "/v1/routes",
            Some(&acme),
            Some(json!({"name": "shop", "hosts": ["web.default.test"], "service": "worker", "port": "http"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.json());
    assert!(!String::from_utf8_lossy(&reply.bytes).contains("route web"));
}
