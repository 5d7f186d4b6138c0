//! In-process API tests of liveness and placement (F1, F2): down without moving,
//! `reschedule_after_secs` and the handover, labels, selectors, `replicas: all`, cordon, drain,
//! a node back with less memory, and the refusals of bad placement input.

use super::*;

/// Registers a node with labels (and, with a credential, re-registers it); returns the
/// credential.
async fn register(
    h: &Harness,
    node_id: &str,
    memory_mib: u64,
    labels: Value,
    credential: Option<&str>,
) -> String {
    let mut facts = Harness::facts(node_id, memory_mib);
    facts["labels"] = labels;
    let body = match credential {
        Some(credential) => json!({"node_credential": credential, "facts": facts}),
        None => json!({"enrollment_token": h.enrollment_token().await, "facts": facts}),
    };
    let reply = h.call("POST", "/v1/nodes/register", None, Some(body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    reply.json()["node_credential"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Sets operator labels of a node.
async fn label(h: &Harness, node_id: &str, body: Value) -> Reply {
    h.call(
        "POST",
        &format!("/v1/nodes/{node_id}/labels"),
        Some(&h.admin),
        Some(body),
    )
    .await
}

/// One field of each allocation on a node, sorted.
async fn field_on(h: &Harness, node_id: &str, field: &str) -> Vec<String> {
    let mut values: Vec<String> = h
        .allocations()
        .await
        .iter()
        .filter(|a| a["node_id"] == node_id)
        .map(|a| a[field].as_str().unwrap().to_string())
        .collect();
    values.sort();
    values
}

/// The allocation ids on a node, sorted.
async fn ids_on(h: &Harness, node_id: &str) -> Vec<String> {
    field_on(h, node_id, "allocation_id").await
}

async fn node_view(h: &Harness, node_id: &str) -> Value {
    let nodes = h
        .call("GET", "/v1/nodes", Some(&h.admin), None)
        .await
        .json();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node_id)
        .unwrap()
        .clone()
}

/// A heartbeat reporting `running` allocations.
async fn heartbeat_running(h: &Harness, node_id: &str, credential: &str, running: &[String]) {
    let allocations: Vec<Value> = running
        .iter()
        .map(|id| json!({"allocation_id": id, "state": "running"}))
        .collect();
    let reply = h
        .call(
            "POST",
            &format!("/v1/nodes/{node_id}/heartbeat"),
            Some(credential),
            Some(json!({"allocations": allocations})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// Runs scheduler passes until the views are at the log head and a pass decides nothing.
async fn schedule_settled(h: &Harness) {
    eventually("the scheduler settled", || async {
        h.settled().await;
        h.control.run_scheduler_once().await.unwrap() == 0
    })
    .await;
    h.settled().await;
}

async fn node_events(h: &Harness, node_id: &str) -> Vec<String> {
    h.call(
        "GET",
        &format!("/v1/admin/aggregates/node/{node_id}/events"),
        Some(&h.admin),
        None,
    )
    .await
    .json()
    .as_array()
    .unwrap()
    .iter()
    .map(|e| e["kind"].as_str().unwrap().to_string())
    .collect()
}

#[tokio::test]
async fn a_silent_node_goes_down_keeps_its_instance_and_hands_it_over_only_after_reschedule_after()
{
    let h = harness().await;
    let n1 = h.enroll("n1", 1024).await;
    let n2 = h.enroll("n2", 1024).await;
    let mut web = web(1, 100);
    web["reschedule_after_secs"] = json!(60);
    assert_eq!(h.define(web).await.status, StatusCode::OK);
    schedule_settled(&h).await;
    // Equal nodes: the tie goes to the lower node id.
    let original = ids_on(&h, "n1").await;
    assert_eq!(original.len(), 1);
    let generation = h.plan("n1", &n1).await.generation();

    // n1 falls silent past the TTL (30 s): it is marked down, and nothing moves.
    h.clock.advance(Duration::from_secs(20));
    heartbeat_running(&h, "n2", &n2, &[]).await;
    h.clock.advance(Duration::from_secs(15));
    assert_eq!(h.control.check_liveness().await.unwrap(), 1);
    schedule_settled(&h).await;
    let down = node_view(&h, "n1").await;
    assert_eq!(down["state"], "down");
    assert!(down["down_since_unix_ms"].as_u64().is_some(), "{down}");
    assert_eq!(node_view(&h, "n2").await["state"], "ready");
    assert!(
        node_events(&h, "n1")
            .await
            .contains(&"NodeMarkedDown".to_string())
    );
    assert_eq!(ids_on(&h, "n1").await, original);
    assert!(ids_on(&h, "n2").await.is_empty());

    // It returns before reschedule_after_secs: same allocation, same plan generation.
    h.clock.advance(Duration::from_secs(50));
    heartbeat_running(&h, "n1", &n1, &original).await;
    schedule_settled(&h).await;
    assert_eq!(node_view(&h, "n1").await["state"], "ready");
    assert_eq!(node_view(&h, "n1").await["down_since_unix_ms"], Value::Null);
    assert_eq!(ids_on(&h, "n1").await, original);
    assert_eq!(h.plan("n1", &n1).await.generation(), generation);

    // Silent again, this time past reschedule_after_secs: the replacement comes first.
    h.clock.advance(Duration::from_secs(20));
    heartbeat_running(&h, "n2", &n2, &[]).await;
    h.clock.advance(Duration::from_secs(11));
    assert_eq!(h.control.check_liveness().await.unwrap(), 1);
    schedule_settled(&h).await;
    assert!(ids_on(&h, "n2").await.is_empty(), "60 s have not passed");
    h.clock.advance(Duration::from_secs(61));
    schedule_settled(&h).await;
    let replacement = ids_on(&h, "n2").await;
    assert_eq!(replacement.len(), 1);
    assert_eq!(
        ids_on(&h, "n1").await,
        original,
        "kept until the replacement runs"
    );
    // n1 comes back before the replacement runs: it keeps its copy.
    heartbeat_running(&h, "n1", &n1, &original).await;
    schedule_settled(&h).await;
    assert_eq!(ids_on(&h, "n1").await, original);
    // The replacement reports running: the returning box's copy leaves its plan.
    heartbeat_running(&h, "n2", &n2, &replacement).await;
    schedule_settled(&h).await;
    assert!(ids_on(&h, "n1").await.is_empty());
    assert_eq!(ids_on(&h, "n2").await, replacement);
    assert!(h.plan("n1", &n1).await.allocations.is_empty());
}

#[tokio::test]
async fn reschedule_never_keeps_the_instance_with_its_box() {
    let h = harness().await;
    h.enroll("n1", 1024).await;
    let n2 = h.enroll("n2", 1024).await;
    let mut web = web(1, 100);
    web["reschedule"] = json!("never");
    assert_eq!(h.define(web).await.status, StatusCode::OK);
    schedule_settled(&h).await;
    let original = ids_on(&h, "n1").await;
    heartbeat_running(&h, "n2", &n2, &[]).await;
    h.clock.advance(Duration::from_secs(31));
    heartbeat_running(&h, "n2", &n2, &[]).await;
    assert_eq!(h.control.check_liveness().await.unwrap(), 1);
    h.clock.advance(Duration::from_secs(7 * 24 * 3600));
    schedule_settled(&h).await;
    assert_eq!(ids_on(&h, "n1").await, original);
    assert!(ids_on(&h, "n2").await.is_empty());
}

#[tokio::test]
async fn labels_and_selectors_place_every_node_services_including_later_nodes() {
    let h = harness().await;
    let n1 = register(&h, "n1", 1024, json!({"site": "north"}), None).await;
    register(&h, "n2", 1024, json!({"site": "south"}), None).await;
    let agent = json!({"name": "agent", "command": "/bin/sleep", "args": ["3600"],
        "replicas": "all", "memory_bytes": MIB,
        "selector": {"labels": {"site": "north"}, "arch": ["x86_64"]}});
    let reply = h.define(agent).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    assert_eq!(reply.json()["service"]["spec"]["replicas"], "all");
    schedule_settled(&h).await;
    assert_eq!(ids_on(&h, "n1").await.len(), 1);
    assert!(ids_on(&h, "n2").await.is_empty());
    // A node that joins later with the label gets its own.
    register(&h, "n3", 1024, json!({"site": "north"}), None).await;
    schedule_settled(&h).await;
    assert_eq!(ids_on(&h, "n3").await.len(), 1);
    // The operator labels n2 into the selector, and n1 out of it.
    let reply = label(&h, "n2", json!({"set": {"site": "north"}})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
    let reply = label(&h, "n1", json!({"set": {"site": "west"}})).await;
    assert_eq!(reply.status, StatusCode::OK);
    schedule_settled(&h).await;
    assert_eq!(ids_on(&h, "n2").await.len(), 1);
    assert!(ids_on(&h, "n1").await.is_empty());
    let n2 = node_view(&h, "n2").await;
    assert_eq!(n2["labels"], json!({"site": "north"}));
    // The operator's label outlives a re-registration with the node's own.
    register(&h, "n1", 1024, json!({"site": "north"}), Some(&n1)).await;
    schedule_settled(&h).await;
    assert!(ids_on(&h, "n1").await.is_empty());
    let view = node_view(&h, "n1").await;
    assert_eq!(view["labels"], json!({"site": "west"}));
    // Removing the operator's label brings the node's own back.
    let reply = label(&h, "n1", json!({"remove": ["site"]})).await;
    assert_eq!(reply.status, StatusCode::OK);
    schedule_settled(&h).await;
    assert_eq!(
        node_view(&h, "n1").await["labels"],
        json!({"site": "north"})
    );
    assert_eq!(ids_on(&h, "n1").await.len(), 1);
}

#[tokio::test]
async fn cordon_drain_and_uncordon() {
    let h = harness().await;
    h.enroll("n1", 1024).await;
    let n2 = h.enroll("n2", 1024).await;
    assert_eq!(h.define(web(1, 100)).await.status, StatusCode::OK);
    schedule_settled(&h).await;
    let on_n1 = ids_on(&h, "n1").await;
    assert_eq!(on_n1.len(), 1);
    // Cordoned: keeps what it runs, gets nothing new.
    let cordon = h
        .call("POST", "/v1/nodes/n1/cordon", Some(&h.admin), None)
        .await;
    assert_eq!(cordon.status, StatusCode::OK, "{}", cordon.json());
    assert_eq!(node_view(&h, "n1").await["scheduling"], "cordoned");
    assert_eq!(h.define(web(3, 100)).await.status, StatusCode::OK);
    schedule_settled(&h).await;
    assert_eq!(ids_on(&h, "n1").await, on_n1);
    assert_eq!(ids_on(&h, "n2").await.len(), 2);
    // Drain: the replacement first, the old copy once it runs.
    let drain = h
        .call("POST", "/v1/nodes/n1/drain", Some(&h.admin), None)
        .await;
    assert_eq!(drain.status, StatusCode::OK);
    schedule_settled(&h).await;
    assert_eq!(ids_on(&h, "n1").await, on_n1);
    let on_n2 = ids_on(&h, "n2").await;
    assert_eq!(on_n2.len(), 3);
    heartbeat_running(&h, "n2", &n2, &on_n2).await;
    schedule_settled(&h).await;
    assert!(ids_on(&h, "n1").await.is_empty());
    assert_eq!(node_view(&h, "n1").await["scheduling"], "draining");
    // Draining again, or an unknown node, is refused by name.
    let again = h
        .call("POST", "/v1/nodes/n1/drain", Some(&h.admin), None)
        .await;
    Harness::assert_refused(
        &again,
        StatusCode::CONFLICT,
        "node_already_draining",
        "node_id",
        "n1",
    );
    let unknown = h
        .call("POST", "/v1/nodes/nope/drain", Some(&h.admin), None)
        .await;
    Harness::assert_refused(&unknown, StatusCode::NOT_FOUND, "not_found", "node", "nope");
    let uncordon = h
        .call("POST", "/v1/nodes/n1/uncordon", Some(&h.admin), None)
        .await;
    assert_eq!(uncordon.status, StatusCode::OK);
    assert_eq!(node_view(&h, "n1").await["scheduling"], "schedulable");
    assert_eq!(h.define(web(4, 100)).await.status, StatusCode::OK);
    schedule_settled(&h).await;
    assert_eq!(
        ids_on(&h, "n1").await.len(),
        1,
        "uncordoned, it takes new work"
    );
}

#[tokio::test]
async fn a_node_back_with_less_memory_has_the_excess_moved() {
    let h = harness().await;
    let n1 = register(&h, "n1", 1024, json!({}), None).await;
    for (name, wave, memory_mib) in [("base", 0, 300), ("big", 1, 400), ("top", 2, 200)] {
        let spec = json!({"name": name, "command": "/bin/sleep", "args": ["3600"],
            "wave": wave, "memory_bytes": memory_mib * MIB});
        assert_eq!(h.define(spec).await.status, StatusCode::OK);
    }
    schedule_settled(&h).await;
    assert_eq!(ids_on(&h, "n1").await.len(), 3);
    h.enroll("n2", 4096).await;
    register(&h, "n1", 500, json!({}), Some(&n1)).await;
    schedule_settled(&h).await;
    assert_eq!(field_on(&h, "n1", "service").await, vec!["base"]);
    assert_eq!(field_on(&h, "n2", "service").await, vec!["big", "top"]);
}

#[tokio::test]
async fn bad_placement_input_is_refused_by_name_and_loses_nothing() {
    let h = harness().await;
    h.enroll("n1", 1024).await;
    assert_eq!(h.define(web(1, 100)).await.status, StatusCode::OK);
    let reply = label(&h, "n1", json!({"set": {"site": "north"}})).await;
    assert_eq!(reply.status, StatusCode::OK);
    let before = h
        .call("GET", "/v1/services", Some(&h.admin), None)
        .await
        .json();
    let with = |field: &str, value: Value| {
        let mut spec = web(2, 100);
        spec[field] = value;
        spec
    };
    let cases = [
        (
            with("selector", json!({"labels": {"site": "North Side"}})),
            "selector.labels.site",
            "North Side",
        ),
        (
            with("selector", json!({"labels": {"Site": "north"}})),
            "selector.labels",
            "Site",
        ),
        (
            with("selector", json!({"arch": ["X86 64"]})),
            "selector.arch[0]",
            "X86 64",
        ),
        (
            with("reschedule_after_secs", json!(604_801)),
            "reschedule_after_secs",
            "604801",
        ),
    ];
    for (spec, field, value) in cases {
        let reply = h.define(spec).await;
        Harness::assert_refused(
            &reply,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            field,
            value,
        );
    }
    let mut never_and_after = with("reschedule", json!("never"));
    never_and_after["reschedule_after_secs"] = json!(30);
    Harness::assert_refused(
        &h.define(never_and_after).await,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "reschedule_after_secs",
        "30",
    );
    // `replicas: all` together with a count is not a replica count.
    for replicas in [json!("all 3"), json!(["all", 3]), json!({"all": 3})] {
        let reply = h.define(with("replicas", replicas.clone())).await;
        let body = Harness::assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_body");
        assert_eq!(body["field"], "replicas", "{replicas}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("count or `all`"),
            "{body}"
        );
    }
    // Node labels: a bad key, a bad value, an unknown node.
    for (body, field, value) in [
        (json!({"set": {"Bad Key": "x"}}), "set", "Bad Key"),
        (json!({"set": {"site": "a b"}}), "set.site", "a b"),
        (json!({"remove": ["-x"]}), "remove[0]", "-x"),
    ] {
        let reply = label(&h, "n1", body).await;
        Harness::assert_refused(
            &reply,
            StatusCode::BAD_REQUEST,
            "invalid_field",
            field,
            value,
        );
    }
    let reply = label(&h, "ghost", json!({"set": {"a": "b"}})).await;
    Harness::assert_refused(&reply, StatusCode::NOT_FOUND, "not_found", "node", "ghost");
    // Nothing applied was lost.
    assert_eq!(
        h.call("GET", "/v1/services", Some(&h.admin), None)
            .await
            .json(),
        before
    );
    assert_eq!(
        node_view(&h, "n1").await["labels"],
        json!({"site": "north"})
    );
}
