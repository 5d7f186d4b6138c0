//! In-process API tests of the bad input for secrets (P11): each is a 4xx naming the
//! field and the value (or its size, never a secret value), and nothing is stored.

use super::*;

#[tokio::test]
async fn bad_secret_input_is_refused_naming_the_field_and_stores_nothing() {
    let h = harness().await;
    let head = h.head();
    let oversized = "s".repeat(outpost_proto::secret::SECRET_VALUE_MAX_BYTES + 1);
    let cases = [
        (
            json!({"values": {"password": oversized}}),
            "values.password",
            format!(
                "({} bytes)",
                outpost_proto::secret::SECRET_VALUE_MAX_BYTES + 1
            ),
        ),
        (
            json!({"values": {"bad key": "v4lue-hidden"}}),
            "values",
            "bad key".to_string(),
        ),
        (
            json!({"values": {"password": "nul\u{0}v4lue-hidden"}}),
            "values.password",
            "(value hidden)".to_string(),
        ),
    ];
    for (body, field, value) in cases {
        let reply = h
            .call("PUT", "/v1/secrets/db", Some(&h.admin), Some(body))
            .await;
        assert!(reply.status.is_client_error(), "{}", reply.json());
        let error = reply.json();
        assert_eq!(error["field"], field, "{error}");
        assert_eq!(error["value"], value.as_str(), "{error}");
        let text = error.to_string();
        assert!(
            !text.contains("v4lue-hidden") && !text.contains("sssssss"),
            "{text}"
        );
    }
    // A wrong token, and another org's secret name: refused without storing anything.
    let reply = h
        .call(
            "PUT",
            "/v1/secrets/db",
            Some("opa.0000000000000000.xyzzy-secret-part"),
            Some(json!({"values": {"password": "v4lue-hidden"}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["field"], "authorization");
    assert!(
        !reply.json().to_string().contains("xyzzy"),
        "{}",
        reply.json()
    );
    assert_eq!(h.head(), head, "a refused secret write appended to the log");
    let listed = h.call("GET", "/v1/secrets", Some(&h.admin), None).await;
    assert_eq!(listed.json(), json!([]));
}
