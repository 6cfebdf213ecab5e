//! Authentication, roles and CSRF on every route, through the real router (`oneshot`)
//! over a SQLite store: who gets 401, 403 or through; login, logout, throttling, the
//! forced password change, cookie flags and security headers.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use bulkhead_learner::auth::{self, Role};
use bulkhead_learner::store::Store;
use bulkhead_learner::web::{AppState, CONTENT_SECURITY_POLICY, router};
use http_body_util::BodyExt;
use tower::ServiceExt;

const PASSWORD: &str = "correct horse battery staple";

struct Fixture {
    store: Store,
    state: AppState,
    /// API tokens by role.
    tokens: HashMap<Role, String>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&format!("sqlite://{}", dir.path().join("auth.db").display())).await.expect("store");
        let mut tokens = HashMap::new();
        for role in Role::ALL {
            let (t, _) = store.create_token_user(role.as_str(), role, "t", "test", 1).await.expect("token user");
            tokens.insert(role, t.expose().to_owned());
        }
        let state = AppState::for_store(store.clone());
        Self { store, state, tokens, _dir: dir }
    }

    /// A user with [`PASSWORD`] (not a one-time one) and an open session for them:
    /// the session cookie and a CSRF token for their forms.
    async fn session(&self, name: &str, role: Role) -> (String, String) {
        let hash = auth::hash_password(PASSWORD).expect("hash");
        let user = self.store.create_user(name, role, &hash, false, "test", 1).await.expect("user");
        let s = self.store.create_session(user.id, 3_600_000, now()).await.expect("session");
        (format!("bulkhead_session={}", s.token.expose()), s.user.csrf.token().expect("csrf"))
    }

    async fn send(&self, req: Request<Body>) -> Response<Body> {
        router(self.state.clone()).oneshot(req).await.expect("response")
    }
}

fn now() -> i64 {
    bulkhead_learner::grpc::ingest::unix_ms()
}

async fn body_text(resp: Response<Body>) -> String {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn bearer(method: &str, uri: &str, token: &str, json: Option<&str>) -> Request<Body> {
    let b = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {token}"));
    match json {
        Some(j) => b.header("content-type", "application/json").body(Body::from(j.to_owned())),
        None => b.body(Body::empty()),
    }
    .expect("request")
}

/// Every API route with a body that passes extraction, and the least role it needs.
const API_ROUTES: &[(&str, &str, Option<&str>, Role)] = &[
    ("GET", "/api/v1/edges", None, Role::Viewer),
    ("GET", "/api/v1/flows", None, Role::Viewer),
    ("GET", "/api/v1/identities", None, Role::Viewer),
    ("GET", "/api/v1/endpoints", None, Role::Viewer),
    ("GET", "/api/v1/agents", None, Role::Viewer),
    ("GET", "/api/v1/dns", None, Role::Viewer),
    ("GET", "/api/v1/proposals", None, Role::Viewer),
    ("GET", "/api/v1/proposals/1", None, Role::Viewer),
    ("GET", "/api/v1/proposals/1/diff", None, Role::Viewer),
    ("GET", "/api/v1/export", None, Role::Viewer),
    ("GET", "/api/v1/audit", None, Role::Viewer),
    ("GET", "/api/v1/cluster-policies", None, Role::Viewer),
    ("GET", "/api/v1/rollout", None, Role::Viewer),
    ("GET", "/api/v1/enforcers", None, Role::Viewer),
    ("GET", "/api/v1/verdicts", None, Role::Viewer),
    ("GET", "/api/v1/graph", None, Role::Viewer),
    ("POST", "/api/v1/proposals/synthesize", Some("{}"), Role::Analyst),
    ("POST", "/api/v1/simulate", Some(r#"{"from_unix_ms":0,"to_unix_ms":1}"#), Role::Analyst),
    ("POST", "/api/v1/proposals/1/reject", Some(r#"{"comment":"no"}"#), Role::Analyst),
    ("POST", "/api/v1/proposals/1/approve", Some("{}"), Role::Approver),
    ("POST", "/api/v1/rollout", Some(r#"{"namespace":"none","mode":"monitor"}"#), Role::Analyst),
];

#[tokio::test]
async fn every_api_route_needs_credentials_and_its_role() {
    let f = Fixture::new().await;
    for &(method, uri, json, needed) in API_ROUTES {
        let req = Request::builder().method(method).uri(uri).body(Body::empty()).expect("request");
        let resp = f.send(req).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {uri} without credentials");
        assert!(resp.headers().contains_key("www-authenticate"));
        for role in Role::ALL {
            let resp = f.send(bearer(method, uri, &f.tokens[&role], json)).await;
            let status = resp.status();
            let body = body_text(resp).await;
            if role.allows(needed) {
                assert_ne!(status, StatusCode::FORBIDDEN, "{method} {uri} as {role:?}: {body}");
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {uri} as {role:?}: {body}");
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri} as {role:?}: {body}");
                assert!(body.contains(needed.as_str()), "the refusal names the role needed: {body}");
            }
            assert!(!status.is_server_error(), "{method} {uri} as {role:?}: {status} {body}");
        }
    }
}

#[tokio::test]
async fn pages_need_a_login_and_users_need_an_admin() {
    let f = Fixture::new().await;
    for path in ["/", "/flows", "/graph", "/workloads", "/proposals", "/rollout", "/audit", "/users"] {
        let resp = f.send(Request::get(path).body(Body::empty()).expect("request")).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path} without a session");
        let location = resp.headers()["location"].to_str().expect("location");
        assert!(location.starts_with("/login"), "{path} → {location}");
    }
    let wanted = f.send(Request::get("/flows?port=80").body(Body::empty()).expect("request")).await;
    assert_eq!(wanted.headers()["location"], "/login?next=/flows%3Fport%3D80");

    let (approver, _) = f.session("paula", Role::Approver).await;
    let (admin, _) = f.session("ada", Role::Admin).await;
    let get =
        |cookie: &str, path: &str| Request::get(path).header("cookie", cookie).body(Body::empty()).expect("request");
    assert_eq!(f.send(get(&approver, "/users")).await.status(), StatusCode::FORBIDDEN);
    assert_ne!(f.send(get(&admin, "/users")).await.status(), StatusCode::FORBIDDEN);
    let page = body_text(f.send(get(&approver, "/account/password")).await).await;
    assert!(page.contains("paula") && page.contains("approver"), "the chrome names who is logged in");
    assert!(!page.contains("href=\"/users\""), "no Users link for an approver");
    let page = body_text(f.send(get(&admin, "/account/password")).await).await;
    assert!(page.contains("href=\"/users\""), "admins see the Users link");
}

#[tokio::test]
async fn session_writes_need_a_csrf_token_and_same_origin() {
    let f = Fixture::new().await;
    let (cookie, csrf) = f.session("ana", Role::Analyst).await;
    let post = |headers: &[(&str, &str)]| {
        let mut b = Request::post("/api/v1/proposals/synthesize")
            .header("cookie", &cookie)
            .header("host", "127.0.0.1:7480")
            .header("content-type", "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from("{}")).expect("request")
    };
    let resp = f.send(post(&[])).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no token");
    assert!(body_text(resp).await.contains("CSRF"));
    assert_eq!(f.send(post(&[("x-csrf-token", "bogus")])).await.status(), StatusCode::FORBIDDEN);
    let other = f.session("eve", Role::Analyst).await.1;
    assert_eq!(
        f.send(post(&[("x-csrf-token", &other)])).await.status(),
        StatusCode::FORBIDDEN,
        "another session's token"
    );
    assert_eq!(
        f.send(post(&[("x-csrf-token", &csrf), ("origin", "http://evil.example")])).await.status(),
        StatusCode::FORBIDDEN,
        "cross-origin"
    );
    assert_eq!(
        f.send(post(&[("x-csrf-token", &csrf), ("origin", "http://127.0.0.1:7480")])).await.status(),
        StatusCode::OK
    );
    assert_eq!(f.send(post(&[("x-csrf-token", &csrf)])).await.status(), StatusCode::OK);

    // Forms: the token rides in the body; the handler still gets the whole form.
    let logout = |body: String| {
        Request::post("/logout")
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .expect("request")
    };
    let resp = f.send(logout(String::new())).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "a form without a token is refused, not a 500");
    assert!(body_text(resp).await.contains("CSRF"), "shown as a page that says why");
    let resp = f.send(logout(format!("csrf={csrf}"))).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(resp.headers()["set-cookie"].to_str().expect("cookie").contains("Max-Age=0"));
    let after = f.send(Request::get("/api/v1/edges").header("cookie", &cookie).body(Body::empty()).expect("r")).await;
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED, "the session ended");

    // Bearer callers are not subject to CSRF (browsers never add the header).
    let resp = f.send(bearer("POST", "/api/v1/proposals/synthesize", &f.tokens[&Role::Analyst], Some("{}"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// GET /login: the form's token and the matching cookie.
async fn login_form(f: &Fixture) -> (String, String) {
    let resp = f.send(Request::get("/login?next=/audit").body(Body::empty()).expect("request")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cookie = resp.headers()["set-cookie"].to_str().expect("cookie").split(';').next().expect("pair").to_owned();
    let html = body_text(resp).await;
    let token = html.split("name=\"form_token\" value=\"").nth(1).and_then(|r| r.split('"').next()).expect("token");
    assert!(html.contains("name=\"next\" value=\"/audit\""), "{html}");
    (cookie, token.to_owned())
}

fn login_post(cookie: &str, body: &str) -> Request<Body> {
    Request::post("/login")
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body.to_owned()))
        .expect("request")
}

#[tokio::test]
async fn login_sets_a_hardened_session_cookie() {
    let f = Fixture::new().await;
    let hash = auth::hash_password(PASSWORD).expect("hash");
    f.store.create_user("vera", Role::Viewer, &hash, false, "test", 1).await.expect("user");
    let (cookie, token) = login_form(&f).await;
    let pw = PASSWORD.replace(' ', "+");

    let resp = f.send(login_post("", &format!("username=vera&password={pw}&form_token={token}"))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "login CSRF: the form token must match the cookie");
    let resp = f.send(login_post(&cookie, &format!("username=vera&password=wrong&form_token={token}"))).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(body_text(resp).await.contains("Invalid username or password"));
    let resp = f.send(login_post(&cookie, &format!("username=nobody&password={pw}&form_token={token}"))).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "unknown users look the same");

    let resp =
        f.send(login_post(&cookie, &format!("username=VERA&password={pw}&form_token={token}&next=%2Faudit"))).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/audit", "back where the user wanted to go");
    let set = resp.headers()["set-cookie"].to_str().expect("cookie").to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(set.contains(flag), "{set} lacks {flag}");
    }
    let session = set.split(';').next().expect("pair");
    let resp = f.send(Request::get("/api/v1/edges").header("cookie", session).body(Body::empty()).expect("r")).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // `next` cannot send people elsewhere.
    let resp = f
        .send(login_post(&cookie, &format!("username=vera&password={pw}&form_token={token}&next=%2F%2Fevil.example")))
        .await;
    assert_eq!(resp.headers()["location"], "/");

    let audit = f.store.audit(&Default::default()).await.expect("audit");
    assert!(audit.iter().any(|e| e.action == "session.login" && e.actor == "vera"), "logins are audited");
}

#[tokio::test]
async fn repeated_login_attempts_are_throttled() {
    let f = Fixture::new().await;
    let (cookie, token) = login_form(&f).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let resp = f.send(login_post(&cookie, &format!("username=viewer&password=guess&form_token={token}"))).await;
        statuses.push(resp.status());
    }
    assert!(statuses[..5].iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
}

#[tokio::test]
async fn a_one_time_password_must_be_replaced_first() {
    let f = Fixture::new().await;
    let otp = auth::one_time_password().expect("otp");
    let hash = auth::hash_password(&otp).expect("hash");
    f.store.create_user("newbie", Role::Analyst, &hash, true, "admin", 1).await.expect("user");
    let (cookie, token) = login_form(&f).await;
    let resp = f.send(login_post(&cookie, &format!("username=newbie&password={otp}&form_token={token}"))).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/account/password");
    let session = resp.headers()["set-cookie"].to_str().expect("c").split(';').next().expect("pair").to_owned();

    let get = |path: &str| Request::get(path).header("cookie", &session).body(Body::empty()).expect("request");
    let resp = f.send(get("/api/v1/edges")).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(body_text(resp).await.contains("new password"));
    let resp = f.send(get("/proposals")).await;
    assert_eq!(
        (resp.status(), &resp.headers()["location"]),
        (StatusCode::SEE_OTHER, &"/account/password".parse().expect("v"))
    );
    let page = body_text(f.send(get("/account/password")).await).await;
    let csrf = page.split("name=\"csrf\" value=\"").nth(2).and_then(|r| r.split('"').next()).expect("form csrf");

    let change = |body: String| {
        Request::post("/account/password")
            .header("cookie", &session)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .expect("request")
    };
    let new = "a much better passphrase";
    let enc = new.replace(' ', "+");
    let resp = f.send(change(format!("csrf={csrf}&current={otp}&new={enc}&confirm=different+one+here"))).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = f.send(change(format!("csrf={csrf}&current={otp}&new=short&confirm=short"))).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = f.send(change(format!("csrf={csrf}&current=wrong+password+here&new={enc}&confirm={enc}"))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = f.send(change(format!("csrf={csrf}&current={otp}&new={enc}&confirm={enc}"))).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let fresh = resp.headers()["set-cookie"].to_str().expect("c").split(';').next().expect("pair").to_owned();
    assert_eq!(f.send(get("/api/v1/edges")).await.status(), StatusCode::UNAUTHORIZED, "old sessions ended");
    let resp = f.send(Request::get("/api/v1/edges").header("cookie", &fresh).body(Body::empty()).expect("r")).await;
    assert_eq!(resp.status(), StatusCode::OK, "the new session works without a forced change");
    assert!(f.store.check_password("newbie", new).await.is_ok());
    assert!(f.store.check_password("newbie", &otp).await.is_err());
}

#[tokio::test]
async fn credentials_that_stop_being_valid_are_refused() {
    let f = Fixture::new().await;
    let token = f.tokens[&Role::Viewer].clone();
    let (cookie, _) = f.session("sam", Role::Viewer).await;
    // A bad bearer token does not fall back to the cookie.
    let req = Request::get("/api/v1/edges")
        .header("cookie", &cookie)
        .header("authorization", "Bearer bht_forged")
        .body(Body::empty())
        .expect("request");
    assert_eq!(f.send(req).await.status(), StatusCode::UNAUTHORIZED);
    f.store.set_disabled("viewer", true, "admin", now()).await.expect("disable");
    assert_eq!(f.send(bearer("GET", "/api/v1/edges", &token, None)).await.status(), StatusCode::UNAUTHORIZED);
    f.store.set_disabled("sam", true, "admin", now()).await.expect("disable");
    let req = Request::get("/api/v1/edges").header("cookie", &cookie).body(Body::empty()).expect("request");
    assert_eq!(f.send(req).await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let f = Fixture::new().await;
    let (cookie, _) = f.session("hedy", Role::Viewer).await;
    let requests = [
        Request::get("/login").body(Body::empty()),
        Request::get("/healthz").body(Body::empty()),
        Request::get("/static/app.css").body(Body::empty()),
        Request::get("/api/v1/edges").body(Body::empty()),
        Request::get("/api/v1/edges").header("cookie", &cookie).body(Body::empty()),
        Request::get("/account/password").header("cookie", &cookie).body(Body::empty()),
        Request::get("/users").header("cookie", &cookie).body(Body::empty()),
    ];
    for req in requests {
        let req = req.expect("request");
        let uri = req.uri().clone();
        let resp = f.send(req).await;
        let h = resp.headers();
        assert_eq!(h["content-security-policy"], CONTENT_SECURITY_POLICY, "{uri}");
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-inline"));
        assert_eq!(h["x-content-type-options"], "nosniff", "{uri}");
        assert_eq!(h["x-frame-options"], "DENY", "{uri}");
        assert!(h.contains_key("referrer-policy"), "{uri}");
    }
    let resp =
        f.send(Request::get("/account/password").header("cookie", &cookie).body(Body::empty()).expect("r")).await;
    assert_eq!(resp.headers()["cache-control"], "no-store", "personal pages are not cached");
    let resp = f.send(Request::get("/static/app.css").body(Body::empty()).expect("r")).await;
    assert!(resp.headers()["content-type"].to_str().expect("ct").starts_with("text/css"));
    let etag = resp.headers()["etag"].clone();
    let again =
        f.send(Request::get("/static/app.css").header("if-none-match", etag).body(Body::empty()).expect("r")).await;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    let missing = f.send(Request::get("/static/../Cargo.toml").body(Body::empty()).expect("r")).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}
