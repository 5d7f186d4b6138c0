//! The dashboard in process (the router called directly, no socket): login with CSRF, session
//! cookies (tampered, expired, revoked token), org scoping (another org's node is a 404), bad
//! query strings, and the live fragment.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::app::{Control, ControlSettings, Followers, ManualClock};
use crate::store::memory::MemoryStore;

struct Harness {
    control: Arc<Control>,
    api: Router,
    ui: Router,
    admin: String,
    clock: Arc<ManualClock>,
}

struct Page {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value a `Set-Cookie` header gives `name`.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                let first = v.split(';').next()?;
                let (key, value) = first.split_once('=')?;
                (key == name).then(|| value.to_string())
            })
    }

    fn set_cookie_line(&self, name: &str) -> String {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .unwrap_or("")
            .to_string()
    }
}

async fn send(router: &Router, request: Request<Body>) -> Page {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 16 << 20)
        .await
        .unwrap();
    Page {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).to_string(),
    }
}

impl Harness {
    async fn new() -> Self {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let settings = ControlSettings {
            projection_wait: Duration::from_secs(3),
            followers: Followers::LivenessOnDemand,
            ..ControlSettings::for_url("https://control.test:7443")
        };
        let started = Control::start(Arc::new(MemoryStore::new()), settings, clock.clone())
            .await
            .unwrap();
        Harness {
            api: crate::api::router(Arc::clone(&started.control)),
            ui: super::router(Arc::clone(&started.control)),
            control: started.control,
            admin: started.admin_token.unwrap(),
            clock,
        }
    }

    async fn api(&self, method: &str, path: &str, token: Option<&str>, body: Value) -> Value {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let page = send(
            &self.api,
            request
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        )
        .await;
        assert!(page.status.is_success(), "{path}: {}", page.body);
        serde_json::from_str(&page.body).unwrap()
    }

    async fn token(&self, org: &str, scopes: &[&str]) -> (String, String) {
        let reply = self
            .api(
                "POST",
                "/v1/admin/tokens",
                Some(&self.admin),
                json!({"org": org, "scopes": scopes}),
            )
            .await;
        (
            reply["token"].as_str().unwrap().to_string(),
            reply["token_id"].as_str().unwrap().to_string(),
        )
    }

    async fn enroll(&self, token: &str, node_id: &str) {
        let enrollment = self
            .api(
                "POST",
                "/v1/enrollment-tokens",
                Some(token),
                json!({"ttl_secs": 600}),
            )
            .await;
        self.api(
            "POST",
            "/v1/nodes/register",
            None,
            json!({"enrollment_token": enrollment["token"],
                   "facts": {"node_id": node_id, "hostname": format!("host-{node_id}"),
                             "arch": "aarch64",
                             "capacity": {"memory_bytes": 1u64 << 30, "cpu_millis": 2000}}}),
        )
        .await;
    }

    async fn get(&self, path: &str, session: Option<&str>) -> Page {
        let mut request = Request::builder().uri(path);
        if let Some(session) = session {
            request = request.header(header::COOKIE, format!("outpost_session={session}"));
        }
        send(&self.ui, request.body(Body::empty()).unwrap()).await
    }

    /// The login form's CSRF cookie and field value.
    async fn csrf(&self) -> String {
        let form = self.get("/ui/login", None).await;
        assert_eq!(form.status, StatusCode::OK);
        let csrf = form.cookie("outpost_csrf").unwrap();
        assert!(form.body.contains(&csrf), "the form echoes the csrf token");
        csrf
    }

    async fn login(&self, csrf_cookie: Option<&str>, csrf_field: &str, token: &str) -> Page {
        let body = serde_urlencoded::to_string([("csrf", csrf_field), ("token", token)]).unwrap();
        let mut request = Request::builder()
            .method("POST")
            .uri("/ui/login")
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(cookie) = csrf_cookie {
            request = request.header(header::COOKIE, format!("outpost_csrf={cookie}"));
        }
        send(&self.ui, request.body(Body::from(body)).unwrap()).await
    }

    async fn session(&self, token: &str) -> String {
        let csrf = self.csrf().await;
        let page = self.login(Some(&csrf), &csrf, token).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
        assert_eq!(page.location(), "/ui/");
        let line = page.set_cookie_line("outpost_session");
        for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/ui/"] {
            assert!(line.contains(attribute), "{line}");
        }
        page.cookie("outpost_session").unwrap()
    }

    async fn settled(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let head = self.control.store.log_position().unwrap().head;
            if self.control.committer.outstanding() == 0
                && self.control.projector.checkpoint() == head
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "views never settled"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn login_needs_a_valid_token_and_the_forms_csrf_token() {
    let h = Harness::new().await;
    let anonymous = h.get("/ui/", None).await;
    assert_eq!(anonymous.status, StatusCode::SEE_OTHER);
    assert_eq!(anonymous.location(), "/ui/login");

    let csrf = h.csrf().await;
    // A wrong token: the login page again, with an error naming the token id, never its secret.
    let wrong = h
        .login(Some(&csrf), &csrf, "opa.nosuchid.s3cr3tvalue")
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(
        wrong.body.contains("Wrong or expired operator token"),
        "{}",
        wrong.body
    );
    assert!(wrong.body.contains("opa.nosuchid"), "{}", wrong.body);
    assert!(!wrong.body.contains("s3cr3tvalue"), "{}", wrong.body);
    assert!(wrong.body.contains("role=\"alert\""));
    assert!(wrong.cookie("outpost_session").is_none());

    // Cross-site request forgery: no cookie, another form's token, a forged one.
    let other = h.csrf().await;
    for (cookie, field) in [
        (None, csrf.as_str()),
        (Some(csrf.as_str()), other.as_str()),
        (Some("00:ff"), "00:ff"),
    ] {
        let forged = h.login(cookie, field, &h.admin).await;
        assert_eq!(forged.status, StatusCode::FORBIDDEN, "{}", forged.body);
        assert!(forged.body.contains("CSRF check failed"));
        assert!(forged.cookie("outpost_session").is_none());
    }

    // An expired token.
    let issued = h
        .api(
            "POST",
            "/v1/admin/tokens",
            Some(&h.admin),
            json!({"org": "default", "scopes": ["read"], "ttl_secs": 60}),
        )
        .await;
    h.clock.advance(Duration::from_secs(120));
    let expired = h
        .login(Some(&csrf), &csrf, issued["token"].as_str().unwrap())
        .await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED, "{}", expired.body);

    // A token without the read scope.
    let (writer, _) = h.token("default", &["services:write"]).await;
    let scopeless = h.login(Some(&csrf), &csrf, &writer).await;
    assert_eq!(
        scopeless.status,
        StatusCode::FORBIDDEN,
        "{}",
        scopeless.body
    );
    assert!(
        scopeless.body.contains("lacks the scope read"),
        "{}",
        scopeless.body
    );

    let session = h.session(&h.admin).await;
    let fleet = h.get("/ui/", Some(&session)).await;
    assert_eq!(fleet.status, StatusCode::OK);
    assert!(fleet.body.contains("Fleet"));
    let csp = fleet.headers.get("content-security-policy").unwrap();
    assert!(csp.to_str().unwrap().contains("frame-ancestors 'none'"));
}

#[tokio::test]
async fn a_tampered_expired_or_revoked_session_goes_back_to_login() {
    let h = Harness::new().await;
    let (reader, reader_id) = h.token("default", &["read"]).await;
    let session = h.session(&reader).await;
    assert_eq!(h.get("/ui/", Some(&session)).await.status, StatusCode::OK);

    let tampered = session.replacen(&reader_id, &reader_id.replace('a', "b"), 1);
    let tampered = if tampered == session {
        format!("{session}0")
    } else {
        tampered
    };
    let refused = h.get("/ui/", Some(&tampered)).await;
    assert_eq!(refused.status, StatusCode::SEE_OTHER);
    assert_eq!(refused.location(), "/ui/login?reason=invalid");
    let login = h.get("/ui/login?reason=invalid", None).await;
    assert!(login.body.contains("was not valid"), "{}", login.body);
    // The live script gets a 401 rather than a redirect.
    let live = send(
        &h.ui,
        Request::builder()
            .uri("/ui/")
            .header(header::COOKIE, format!("outpost_session={tampered}"))
            .header("x-outpost-live", "1")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(live.status, StatusCode::UNAUTHORIZED);

    // Revoking the token ends its sessions at once.
    h.api(
        "POST",
        &format!("/v1/admin/tokens/{reader_id}/revoke"),
        Some(&h.admin),
        json!({}),
    )
    .await;
    h.settled().await;
    let revoked = h.get("/ui/", Some(&session)).await;
    assert_eq!(revoked.location(), "/ui/login?reason=token");

    // A session ends after its lifetime.
    let admin_session = h.session(&h.admin).await;
    h.clock
        .advance(Duration::from_secs(super::session::SESSION_TTL_SECS + 1));
    let expired = h.get("/ui/", Some(&admin_session)).await;
    assert_eq!(expired.location(), "/ui/login?reason=expired");
}

#[tokio::test]
async fn pages_show_only_the_sessions_org_and_refuse_bad_queries() {
    let h = Harness::new().await;
    let (acme, _) = h.token("acme", &["read", "enroll:write"]).await;
    h.enroll(&h.admin, "home-1").await;
    h.enroll(&acme, "acme-1").await;
    h.settled().await;

    let session = h.session(&h.admin).await;
    let fleet = h.get("/ui/", Some(&session)).await;
    assert_eq!(fleet.status, StatusCode::OK);
    assert!(fleet.body.contains("home-1"), "{}", fleet.body);
    assert!(
        !fleet.body.contains("acme-1"),
        "another org's node is not listed"
    );
    assert!(
        fleet.body.contains("id=\"count-ready\">1<"),
        "{}",
        fleet.body
    );
    assert!(fleet.body.contains("aarch64"));
    for component in ["allocations", "storage", "broker", "index", "overlay"] {
        assert!(fleet.body.contains(component), "{component}");
    }

    // Another org's node id in a URL is a 404, exactly like a node that does not exist.
    let foreign = h.get("/ui/nodes/acme-1", Some(&session)).await;
    let missing = h.get("/ui/nodes/nobody", Some(&session)).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(!foreign.body.contains("host-acme-1"));
    let own = h.get("/ui/nodes/home-1", Some(&session)).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    assert!(own.body.contains("NodeRegistered"), "{}", own.body);
    assert!(own.body.contains("Overlay peers"));

    let acme_session = h.session(&acme).await;
    let acme_fleet = h.get("/ui/", Some(&acme_session)).await;
    assert!(acme_fleet.body.contains("acme-1"));
    assert!(!acme_fleet.body.contains("home-1"));
    let acme_events = h.get("/ui/events", Some(&acme_session)).await;
    assert!(
        acme_events.body.contains("node/acme-1"),
        "{}",
        acme_events.body
    );
    assert!(
        !acme_events.body.contains("node/home-1"),
        "{}",
        acme_events.body
    );
    assert_eq!(
        h.get("/ui/nodes/home-1", Some(&acme_session)).await.status,
        StatusCode::NOT_FOUND
    );

    // Bad query strings: clear answers naming the parameter and the value.
    let long = format!("/ui/?q={}", "x".repeat(600));
    let too_long = h.get(&long, Some(&session)).await;
    assert_eq!(too_long.status, StatusCode::URI_TOO_LONG);
    assert!(too_long.body.contains("at most 512"), "{}", too_long.body);
    let unknown = h.get("/ui/?sort=name", Some(&session)).await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert!(unknown.body.contains("sort"));
    let page = h.get("/ui/?page=abc", Some(&session)).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(
        page.body.contains("&quot;abc&quot;") || page.body.contains("\"abc\""),
        "{}",
        page.body
    );
    let script = h.get("/ui/?q=%3Cscript%3E", Some(&session)).await;
    assert_eq!(script.status, StatusCode::OK);
    assert!(
        !script.body.contains("<script>"),
        "the search text is escaped"
    );

    // Filtering and the live fragment.
    let down = h.get("/ui/?state=down", Some(&session)).await;
    assert!(!down.body.contains("id=\"node-home-1\""));
    let live = send(
        &h.ui,
        Request::builder()
            .uri("/ui/")
            .header(header::COOKIE, format!("outpost_session={session}"))
            .header("x-outpost-live", "1")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(live.status, StatusCode::OK);
    assert!(live.body.contains("home-1"));
    assert!(!live.body.contains("<html"), "the live region alone");
}
