//! Users, UI sessions and API tokens, checked identically on SQLite (a temp file) and
//! PostgreSQL (a throwaway database) with the shared fixture (`tests/common`): each case
//! is an async fn over a [`Fixture`], `store_cases!` generates one test per backend, and
//! the PostgreSQL tests fail, not skip, without `BULKHEAD_TEST_POSTGRES_URL`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use bulkhead_learner::auth::{self, PasswordHash, Role};
use bulkhead_learner::store::{AuditQuery, AuditRow, Backend, Store, StoreError, TOUCH_EVERY_MS, user_actions};
use common::{Fixture, store_cases};
use sqlx::{Connection, PgConnection, SqliteConnection};

store_cases!(
    create_login_and_verify,
    usernames_are_unique_case_insensitively,
    hostile_and_unicode_usernames_are_data,
    wrong_password_and_unknown_user_are_the_same_refusal,
    disabled_users_sessions_and_tokens_are_refused,
    expired_sessions_are_refused_and_pruned,
    secrets_are_hashed_at_rest,
    csrf_secret_belongs_to_the_session,
    role_and_password_changes,
    api_tokens_lifecycle,
    every_change_is_audited_and_the_chain_verifies,
);

const PASSWORD: &str = "correct horse battery staple";
const T0: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

/// One hash for the whole binary: argon2 is slow unoptimised.
fn hash() -> &'static PasswordHash {
    static H: LazyLock<PasswordHash> = LazyLock::new(|| auth::hash_password(PASSWORD).expect("hash"));
    &H
}

/// Usernames a hostile admin form or CLI caller could send; each is a valid name.
const NASTY: [&str; 6] = [
    "'); DROP TABLE users;--",
    "x'); DELETE FROM sessions;--",
    "\" OR 1=1 --",
    "it's \"quoted\" `twice`",
    "back\\slash $1 ? ?1 :name @p %_",
    "ünïcödé 🚀 用户",
];

async fn add(store: &Store, name: &str, role: Role) -> bulkhead_learner::store::UserRow {
    store.create_user(name, role, hash(), false, "root", T0).await.unwrap_or_else(|e| panic!("create {name:?}: {e}"))
}

async fn audit_of(store: &Store, prefix: &str) -> Vec<AuditRow> {
    let q = AuditQuery { action_prefix: Some(prefix.into()), limit: 1000, ..AuditQuery::default() };
    store.audit(&q).await.expect("audit")
}

// === cases ===

async fn create_login_and_verify(f: &Fixture) {
    let s = &f.store;
    let u = s.create_user("alice", Role::Analyst, hash(), true, "root", T0).await.expect("create");
    assert_eq!(
        (u.username.as_str(), u.role, u.disabled, u.must_change_password),
        ("alice", Role::Analyst, false, true)
    );
    assert_eq!((u.created_unix_ms, u.updated_unix_ms), (T0, T0));
    assert_eq!(s.user_by_name("alice").await.expect("by name"), Some(u.clone()));
    assert_eq!(s.user_by_name("ALICE").await.expect("by name"), Some(u.clone()), "case-insensitive");
    assert_eq!(s.user_by_name("bob").await.expect("by name"), None);
    assert_eq!(s.user_by_name("").await.expect("invalid name is nobody"), None);
    assert_eq!(s.users().await.expect("users"), vec![u.clone()]);

    let new = s.login("Alice", PASSWORD, HOUR, T0 + 1).await.expect("login");
    assert_eq!(new.user.user_id, u.id);
    assert_eq!((new.user.username.as_str(), new.user.role), ("alice", Role::Analyst));
    assert!(new.user.must_change_password);
    assert_eq!(new.user.expires_unix_ms, T0 + 1 + HOUR);

    let got = s.session(new.token.expose(), T0 + 2).await.expect("session").expect("live");
    assert_eq!(got, new.user);
    assert_eq!(s.session("not a token", T0 + 2).await.expect("session"), None);
    assert_eq!(s.session("", T0 + 2).await.expect("session"), None);

    // A second login is a second session; logging one out leaves the other.
    let other = s.login("alice", PASSWORD, HOUR, T0 + 3).await.expect("login 2");
    assert_ne!(other.token.expose(), new.token.expose());
    assert!(s.delete_session(new.token.expose()).await.expect("logout"));
    assert!(!s.delete_session(new.token.expose()).await.expect("logout twice"));
    assert_eq!(s.session(new.token.expose(), T0 + 4).await.expect("session"), None);
    assert!(s.session(other.token.expose(), T0 + 4).await.expect("session").is_some());
    assert_eq!(s.delete_sessions_of(u.id).await.expect("logout everywhere"), 1);
    assert_eq!(s.session(other.token.expose(), T0 + 5).await.expect("session"), None);

    // No such user id: no session.
    assert!(matches!(s.create_session(u.id + 1000, HOUR, T0).await, Err(StoreError::InvalidCredentials)));
}

async fn usernames_are_unique_case_insensitively(f: &Fixture) {
    let s = &f.store;
    add(s, "Alice", Role::Viewer).await;
    for dup in ["Alice", "alice", "ALICE", "aLiCe"] {
        match s.create_user(dup, Role::Admin, hash(), false, "root", T0).await {
            Err(StoreError::UserExists { username }) => assert_eq!(username, dup),
            other => panic!("{dup:?}: {other:?}"),
        }
    }
    // Folding beyond ASCII: ß/SS, final sigma.
    add(s, "straße", Role::Viewer).await;
    assert!(matches!(
        s.create_user("STRASSE", Role::Viewer, hash(), false, "root", T0).await,
        Err(StoreError::UserExists { .. })
    ));
    add(s, "ΣΊΣΥΦΟΣ", Role::Viewer).await;
    assert!(matches!(
        s.create_user("σίσυφος", Role::Viewer, hash(), false, "root", T0).await,
        Err(StoreError::UserExists { .. })
    ));
    let names: Vec<String> = s.users().await.expect("users").into_iter().map(|u| u.username).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(s.login("ALICE", PASSWORD, HOUR, T0).await.is_ok(), "login is case-insensitive too");

    // Invalid names never reach the database.
    for bad in ["", " alice", "a\0b", "a\nb", "adm\u{202e}nimda", &"x".repeat(65)] {
        assert!(
            matches!(
                s.create_user(bad, Role::Viewer, hash(), false, "root", T0).await,
                Err(StoreError::InvalidUsername { .. })
            ),
            "{bad:?}"
        );
    }
    // A blank actor is refused: an audit entry nobody can attribute is worthless.
    assert!(matches!(
        s.create_user("carol", Role::Viewer, hash(), false, " ", T0).await,
        Err(StoreError::MissingField { field: "actor" })
    ));
    assert_eq!(s.user_by_name("carol").await.expect("by name"), None, "nothing written");
}

async fn hostile_and_unicode_usernames_are_data(f: &Fixture) {
    let s = &f.store;
    for (i, name) in NASTY.iter().enumerate() {
        let role = Role::ALL[i % 4];
        let u = add(s, name, role).await;
        assert_eq!(u.username, *name);
        let session = s.login(name, PASSWORD, HOUR, T0).await.unwrap_or_else(|e| panic!("login {name:?}: {e}"));
        assert_eq!(session.user.username, *name);
        assert_eq!(session.user.role, role);
        let (token, row) = s.create_api_token(name, name, None, name, T0).await.expect("token named hostilely");
        assert_eq!((row.username.as_str(), row.name.as_str()), (*name, *name));
        assert_eq!(s.api_token(token.expose(), T0).await.expect("token").expect("live").username, *name);
    }
    let names: BTreeSet<String> = s.users().await.expect("users").into_iter().map(|u| u.username).collect();
    assert_eq!(names, NASTY.iter().map(|n| n.to_string()).collect());
    // The tables are all still there.
    for table in ["SELECT 1 FROM users", "SELECT 1 FROM sessions", "SELECT 1 FROM api_tokens"] {
        f.raw_sql(table).await.unwrap_or_else(|e| panic!("{table}: {e}"));
    }
    let audited = audit_of(s, "user.create").await;
    assert_eq!(audited.len(), NASTY.len());
    s.verify_audit_chain().await.expect("chain");
}

async fn wrong_password_and_unknown_user_are_the_same_refusal(f: &Fixture) {
    let s = &f.store;
    add(s, "alice", Role::Admin).await;
    for (name, password) in [
        ("alice", "correct horse battery stapl"),
        ("alice", ""),
        ("alice", &*"x".repeat(5000)),
        ("nobody", PASSWORD),
        ("", PASSWORD),
        ("a\0b", PASSWORD),
    ] {
        match s.login(name, password, HOUR, T0).await {
            Err(StoreError::InvalidCredentials) => {}
            other => panic!("{name:?}: {other:?}"),
        }
    }
    assert!(audit_of(s, "session.").await.is_empty(), "refused logins write no audit entry");
    // A stored value that is not a hash of ours verifies nothing, and does not panic.
    assert!(
        f.raw_sql(
            "UPDATE users SET password_hash = '$argon2id$v=19$m=4294967295,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo'"
        )
        .await
        .is_ok()
    );
    assert!(matches!(s.login("alice", PASSWORD, HOUR, T0).await, Err(StoreError::InvalidCredentials)));
    // The schema refuses anything but an argon2id PHC string.
    assert!(f.raw_sql("UPDATE users SET password_hash = 'plaintext'").await.is_err());
}

async fn disabled_users_sessions_and_tokens_are_refused(f: &Fixture) {
    let s = &f.store;
    add(s, "alice", Role::Approver).await;
    let session = s.login("alice", PASSWORD, HOUR, T0).await.expect("login");
    let (token, _) = s.create_api_token("alice", "cli", None, "root", T0).await.expect("token");

    // Disabled behind the store's back (raw SQL): the session and token stop at once,
    // because every look-up reads the user.
    f.raw_sql("UPDATE users SET disabled = TRUE").await.expect("raw disable");
    assert_eq!(s.session(session.token.expose(), T0 + 1).await.expect("session"), None);
    assert_eq!(s.api_token(token.expose(), T0 + 1).await.expect("token"), None);
    f.raw_sql("UPDATE users SET disabled = FALSE").await.expect("raw enable");
    assert!(s.session(session.token.expose(), T0 + 2).await.expect("session").is_some());

    // Through the store: sessions are deleted as well.
    let u = s.set_disabled("alice", true, "root", T0 + 3).await.expect("disable");
    assert!(u.disabled);
    assert_eq!(s.session(session.token.expose(), T0 + 4).await.expect("session"), None);
    assert_eq!(s.api_token(token.expose(), T0 + 4).await.expect("token"), None);
    assert!(matches!(s.login("alice", PASSWORD, HOUR, T0 + 5).await, Err(StoreError::InvalidCredentials)));
    assert!(matches!(s.create_session(u.id, HOUR, T0 + 5).await, Err(StoreError::InvalidCredentials)));

    // Re-enabled: the password works again, the old session stays gone, the token is back.
    s.set_disabled("alice", false, "root", T0 + 6).await.expect("enable");
    assert_eq!(s.session(session.token.expose(), T0 + 7).await.expect("session"), None);
    assert!(s.api_token(token.expose(), T0 + 7).await.expect("token").is_some());
    assert!(s.login("alice", PASSWORD, HOUR, T0 + 8).await.is_ok());
    assert!(matches!(s.set_disabled("nobody", true, "root", T0).await, Err(StoreError::UserNotFound { .. })));
}

async fn expired_sessions_are_refused_and_pruned(f: &Fixture) {
    let s = &f.store;
    add(s, "alice", Role::Viewer).await;
    let short = s.login("alice", PASSWORD, 1_000, T0).await.expect("short");
    let long = s.login("alice", PASSWORD, HOUR, T0).await.expect("long");
    assert!(s.session(short.token.expose(), T0 + 999).await.expect("session").is_some());
    assert_eq!(s.session(short.token.expose(), T0 + 1_000).await.expect("session"), None, "expiry is exclusive");
    assert!(s.session(long.token.expose(), T0 + 1_000).await.expect("session").is_some());

    assert_eq!(s.prune_expired_sessions(T0 + 1_000).await.expect("prune"), 1);
    assert_eq!(s.prune_expired_sessions(T0 + 1_000).await.expect("prune again"), 0);
    assert!(s.session(long.token.expose(), T0 + 2_000).await.expect("session").is_some());
    assert_eq!(s.prune_expired_sessions(T0 + HOUR).await.expect("prune"), 1);
    let left: i64 = count(f, "SELECT count(*) FROM sessions").await;
    assert_eq!(left, 0);

    // last_seen moves, at most once per TOUCH_EVERY_MS.
    let session = s.login("alice", PASSWORD, 10 * HOUR, T0).await.expect("login");
    s.session(session.token.expose(), T0 + 10).await.expect("touch (too soon)");
    assert_eq!(count(f, "SELECT last_seen_unix_ms FROM sessions").await, T0);
    s.session(session.token.expose(), T0 + TOUCH_EVERY_MS).await.expect("touch");
    assert_eq!(count(f, "SELECT last_seen_unix_ms FROM sessions").await, T0 + TOUCH_EVERY_MS);
}

async fn secrets_are_hashed_at_rest(f: &Fixture) {
    let s = &f.store;
    let password = auth::one_time_password().expect("otp");
    let h = auth::hash_password(&password).expect("hash");
    s.create_user("alice", Role::Admin, &h, true, "root", T0).await.expect("create");
    let session = s.login("alice", &password, HOUR, T0).await.expect("login");
    let (token, _) = s.create_api_token("alice", "cli", None, "root", T0).await.expect("token");

    let dump = dump(f).await;
    for secret in [password.as_str(), session.token.expose(), token.expose()] {
        assert!(!dump.contains(secret), "{secret:?} is stored in clear");
    }
    assert!(dump.contains("$argon2id$v=19$m=19456,t=2,p=1$"), "the argon2id PHC string is stored");
    assert!(dump.contains(&hex(&session.token.digest())), "the session is keyed by the token's SHA-256");
    assert!(dump.contains(&hex(&token.digest())), "the API token is stored as its SHA-256");
    // Knowing the hash does not help: it is not a token.
    assert_eq!(s.session(&hex(&session.token.digest()), T0).await.expect("session"), None);
}

async fn csrf_secret_belongs_to_the_session(f: &Fixture) {
    let s = &f.store;
    add(s, "alice", Role::Analyst).await;
    let a = s.login("alice", PASSWORD, HOUR, T0).await.expect("a");
    let b = s.login("alice", PASSWORD, HOUR, T0).await.expect("b");
    assert_ne!(a.user.csrf, b.user.csrf, "one secret per session");
    let form_token = a.user.csrf.token().expect("csrf token");
    // What the next request reads back checks the form's token…
    let again = s.session(a.token.expose(), T0 + 1).await.expect("session").expect("live");
    assert!(again.csrf.verify(&form_token));
    // …and refuses another session's, the session token itself, and junk.
    let other = s.session(b.token.expose(), T0 + 1).await.expect("session").expect("live");
    assert!(!other.csrf.verify(&form_token));
    for bad in [a.token.expose(), "", "x", &b.user.csrf.token().expect("token")] {
        assert!(!again.csrf.verify(bad), "{bad:?}");
    }
}

async fn role_and_password_changes(f: &Fixture) {
    let s = &f.store;
    add(s, "alice", Role::Viewer).await;
    let session = s.login("alice", PASSWORD, HOUR, T0).await.expect("login");
    let u = s.set_role("ALICE", Role::Approver, "root", T0 + 1).await.expect("role");
    assert_eq!((u.role, u.updated_unix_ms), (Role::Approver, T0 + 1));
    let live = s.session(session.token.expose(), T0 + 2).await.expect("session").expect("live");
    assert_eq!(live.role, Role::Approver, "a new role applies to existing sessions at once");
    assert!(matches!(s.set_role("nobody", Role::Admin, "root", T0).await, Err(StoreError::UserNotFound { .. })));

    // An admin reset: a one-time password to change, every session ends.
    let otp = auth::one_time_password().expect("otp");
    let u =
        s.set_password("alice", &auth::hash_password(&otp).expect("hash"), true, "root", T0 + 3).await.expect("reset");
    assert!(u.must_change_password);
    assert_eq!(s.session(session.token.expose(), T0 + 4).await.expect("session"), None);
    assert!(matches!(s.login("alice", PASSWORD, HOUR, T0 + 4).await, Err(StoreError::InvalidCredentials)));
    let with_otp = s.login("alice", &otp, HOUR, T0 + 4).await.expect("otp login");
    assert!(with_otp.user.must_change_password);

    // The user chooses one: the flag clears.
    let u = s.set_password("alice", hash(), false, "alice", T0 + 5).await.expect("change");
    assert!(!u.must_change_password);
    let session = s.login("alice", PASSWORD, HOUR, T0 + 6).await.expect("login");
    assert!(!session.user.must_change_password);
    assert!(!s.user_by_name("alice").await.expect("by name").expect("user").must_change_password);
}

async fn api_tokens_lifecycle(f: &Fixture) {
    let s = &f.store;
    let alice = add(s, "alice", Role::Analyst).await;
    add(s, "bob", Role::Viewer).await;
    let (cli, row) = s.create_api_token("alice", "cli", None, "root", T0).await.expect("token");
    assert_eq!(
        (row.user_id, row.name.as_str(), row.expires_unix_ms, row.revoked_unix_ms),
        (alice.id, "cli", None, None)
    );
    assert!(cli.expose().starts_with(auth::API_TOKEN_PREFIX));
    let who = s.api_token(cli.expose(), T0 + 1).await.expect("token").expect("live");
    assert_eq!(
        (who.user_id, who.username.as_str(), who.role, who.token_id),
        (alice.id, "alice", Role::Analyst, row.id)
    );
    // A session token is not an API token, nor the other way round.
    assert_eq!(s.session(cli.expose(), T0).await.expect("session"), None);

    // Names are unique per user among live tokens.
    assert!(matches!(
        s.create_api_token("alice", "cli", None, "root", T0).await,
        Err(StoreError::TokenNameTaken { .. })
    ));
    s.create_api_token("bob", "cli", None, "root", T0).await.expect("same name, other user");
    for bad in ["", "   ", "a\nb", &"x".repeat(65)] {
        assert!(
            matches!(s.create_api_token("alice", bad, None, "root", T0).await, Err(StoreError::InvalidTokenName)),
            "{bad:?}"
        );
    }
    assert!(matches!(
        s.create_api_token("nobody", "cli", None, "root", T0).await,
        Err(StoreError::UserNotFound { .. })
    ));

    // Expiring tokens.
    let (ci, _) = s.create_api_token("alice", "ci", Some(T0 + 1_000), "root", T0).await.expect("expiring");
    assert!(s.api_token(ci.expose(), T0 + 999).await.expect("token").is_some());
    assert_eq!(s.api_token(ci.expose(), T0 + 1_000).await.expect("token"), None);

    // last_used is recorded.
    let listed = s.api_tokens("alice").await.expect("list");
    assert_eq!(listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["cli", "ci"]);
    assert_eq!(listed[0].last_used_unix_ms, Some(T0 + 1));

    // Revoked: refused, kept in the list, the name is free again, revoking twice fails.
    let revoked = s.revoke_api_token(row.id, "alice", T0 + 2).await.expect("revoke");
    assert_eq!(revoked.revoked_unix_ms, Some(T0 + 2));
    assert_eq!(s.api_token(cli.expose(), T0 + 3).await.expect("token"), None);
    assert!(matches!(s.revoke_api_token(row.id, "alice", T0 + 3).await, Err(StoreError::ApiTokenNotFound { .. })));
    assert!(matches!(s.revoke_api_token(9_999, "alice", T0 + 3).await, Err(StoreError::ApiTokenNotFound { .. })));
    s.create_api_token("alice", "cli", None, "root", T0 + 4).await.expect("name reusable after revoke");
    assert_eq!(s.api_tokens("alice").await.expect("list").len(), 3);
    assert_eq!(s.api_token("", T0).await.expect("empty"), None);
    assert_eq!(s.api_token(&"a".repeat(10_000), T0).await.expect("long"), None);
}

async fn every_change_is_audited_and_the_chain_verifies(f: &Fixture) {
    let s = &f.store;
    s.create_user("alice", Role::Viewer, hash(), true, "root", T0).await.expect("create");
    s.set_role("alice", Role::Admin, "root", T0 + 1).await.expect("role");
    s.set_password("alice", hash(), false, "alice", T0 + 2).await.expect("password");
    s.login("alice", PASSWORD, HOUR, T0 + 3).await.expect("login");
    let (_, token) = s.create_api_token("alice", "cli", None, "alice", T0 + 4).await.expect("token");
    s.revoke_api_token(token.id, "alice", T0 + 5).await.expect("revoke");
    s.set_disabled("alice", true, "root", T0 + 6).await.expect("disable");
    s.set_disabled("alice", false, "root", T0 + 7).await.expect("enable");

    let all = s.audit(&AuditQuery { limit: 100, ..AuditQuery::default() }).await.expect("audit");
    let got: Vec<(&str, &str, &str, i64)> =
        all.iter().rev().map(|r| (r.actor.as_str(), r.action.as_str(), r.subject.as_str(), r.at_unix_ms)).collect();
    assert_eq!(
        got,
        [
            ("root", user_actions::USER_CREATE, "user:alice", T0),
            ("root", user_actions::USER_ROLE, "user:alice", T0 + 1),
            ("alice", user_actions::USER_PASSWORD, "user:alice", T0 + 2),
            ("alice", user_actions::SESSION_LOGIN, "user:alice", T0 + 3),
            ("alice", user_actions::TOKEN_CREATE, "user:alice", T0 + 4),
            ("alice", user_actions::TOKEN_REVOKE, "user:alice", T0 + 5),
            ("root", user_actions::USER_DISABLE, "user:alice", T0 + 6),
            ("root", user_actions::USER_ENABLE, "user:alice", T0 + 7),
        ]
    );
    let by_action: BTreeMap<&str, &serde_json::Value> = all.iter().map(|r| (r.action.as_str(), &r.detail)).collect();
    assert_eq!(by_action["user.create"]["role"], "viewer");
    assert_eq!(by_action["user.create"]["must_change_password"], true);
    assert_eq!((&by_action["user.role"]["from"], &by_action["user.role"]["to"]), (&"viewer".into(), &"admin".into()));
    assert_eq!(by_action["user.password"]["must_change_password"], false);
    assert_eq!(by_action["token.create"]["name"], "cli");
    assert_eq!(by_action["user.disable"]["sessions_ended"], 1);
    // No secret in any entry.
    let text = serde_json::to_string(&all).expect("json");
    assert!(!text.contains("argon2") && !text.contains(PASSWORD));
    assert_eq!(s.verify_audit_chain().await.expect("chain"), 8);

    // A failed change writes neither the change nor its entry.
    assert!(s.create_user("ALICE", Role::Admin, hash(), false, "root", T0 + 8).await.is_err());
    assert!(s.set_role("nobody", Role::Admin, "root", T0 + 8).await.is_err());
    assert_eq!(s.verify_audit_chain().await.expect("chain"), 8);
}

// === helpers (raw SQL, bypassing the store) ===

async fn count(f: &Fixture, sql: &'static str) -> i64 {
    match f.store.backend() {
        Backend::Sqlite => {
            let mut c = SqliteConnection::connect(&f.url).await.expect("sqlite");
            sqlx::query_scalar(sql).fetch_one(&mut c).await.expect("scalar")
        }
        Backend::Postgres => {
            let mut c = PgConnection::connect(&f.url).await.expect("postgres");
            sqlx::query_scalar(sql).fetch_one(&mut c).await.expect("scalar")
        }
    }
}

/// Every column of the three tables as text (bytes as hex): what a stolen copy holds.
async fn dump(f: &Fixture) -> String {
    const SQL: [&str; 3] = [
        "SELECT username || '|' || username_key || '|' || password_hash FROM users",
        "SELECT HEX_TOKEN || '|' || HEX_CSRF FROM sessions",
        "SELECT HEX_TOKEN || '|' || name FROM api_tokens",
    ];
    let mut out = String::new();
    match f.store.backend() {
        Backend::Sqlite => {
            let mut c = SqliteConnection::connect(&f.url).await.expect("sqlite");
            for q in SQL {
                let q = q.replace("HEX_TOKEN", "lower(hex(token_hash))").replace("HEX_CSRF", "lower(hex(csrf_secret))");
                let rows: Vec<String> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(q)).fetch_all(&mut c).await.expect("dump");
                out.extend(rows.into_iter().map(|r| r + "\n"));
            }
        }
        Backend::Postgres => {
            let mut c = PgConnection::connect(&f.url).await.expect("postgres");
            for q in SQL {
                let q = q
                    .replace("HEX_TOKEN", "encode(token_hash, 'hex')")
                    .replace("HEX_CSRF", "encode(csrf_secret, 'hex')");
                let rows: Vec<String> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(q)).fetch_all(&mut c).await.expect("dump");
                out.extend(rows.into_iter().map(|r| r + "\n"));
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// === schema lockstep (both backends at once) ===

/// Tables migration 0005 creates.
const USER_TABLES: [&str; 3] = ["users", "sessions", "api_tokens"];

/// Per table: columns with nullability, and non-constraint indexes with their columns.
type TableShape = (BTreeSet<(String, bool)>, BTreeMap<String, Vec<String>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_0005_builds_the_same_tables_and_indexes_on_both_backends() {
    let sqlite = Fixture::sqlite().await;
    let postgres = Fixture::postgres().await;

    let mut lite: BTreeMap<String, TableShape> = BTreeMap::new();
    let mut conn = SqliteConnection::connect(&sqlite.url).await.expect("sqlite");
    for t in USER_TABLES {
        let cols: Vec<(String, i64, i64)> = sqlx::query_as("SELECT name, \"notnull\", pk FROM pragma_table_info($1)")
            .bind(t)
            .fetch_all(&mut conn)
            .await
            .expect("sqlite columns");
        let cols = cols.into_iter().map(|(c, not_null, pk)| (c, not_null == 0 && pk == 0)).collect();
        // Explicit CREATE INDEX only (UNIQUE constraints' autoindexes have no SQL).
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL",
        )
        .bind(t)
        .fetch_all(&mut conn)
        .await
        .expect("sqlite indexes");
        let mut indexes = BTreeMap::new();
        for name in names {
            let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_index_info($1) ORDER BY seqno")
                .bind(&name)
                .fetch_all(&mut conn)
                .await
                .expect("sqlite index columns");
            indexes.insert(name, cols);
        }
        lite.insert(t.to_owned(), (cols, indexes));
    }
    conn.close().await.expect("close");

    let mut pg: BTreeMap<String, TableShape> = BTreeMap::new();
    let mut conn = PgConnection::connect(&postgres.url).await.expect("postgres");
    for t in USER_TABLES {
        let cols: Vec<(String, bool)> = sqlx::query_as(
            "SELECT column_name::text, is_nullable = 'YES' FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1",
        )
        .bind(t)
        .fetch_all(&mut conn)
        .await
        .expect("postgres columns");
        // Explicit indexes only: not the primary key's nor a UNIQUE constraint's.
        let idx: Vec<(String, String)> = sqlx::query_as(
            "SELECT ic.relname::text, a.attname::text FROM pg_index i \
             JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class tc ON tc.oid = i.indrelid \
             JOIN pg_attribute a ON a.attrelid = ic.oid \
             WHERE tc.relname = $1 AND NOT i.indisprimary \
             AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) \
             ORDER BY ic.relname, a.attnum",
        )
        .bind(t)
        .fetch_all(&mut conn)
        .await
        .expect("postgres indexes");
        let mut indexes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, col) in idx {
            indexes.entry(name).or_default().push(col);
        }
        pg.insert(t.to_owned(), (cols.into_iter().collect(), indexes));
    }
    conn.close().await.expect("close");

    assert_eq!(lite, pg);
    for t in USER_TABLES {
        assert!(!lite[t].0.is_empty(), "{t} missing");
    }
    assert_eq!(lite["sessions"].1.len(), 2, "the user and expiry indexes");
    assert_eq!(lite["api_tokens"].1.len(), 1, "the live-name index");

    // Both refuse the same hostile rows directly (CHECKs), whoever writes them; the
    // first row, valid, shows the statements themselves are fine.
    const INSERT: &str = "INSERT INTO users (username, username_key, password_hash, role, must_change_password, \
                          created_unix_ms, updated_unix_ms) VALUES ";
    const ROWS: [(&str, &str, bool); 5] = [
        // (SQLite, PostgreSQL, accepted)
        (
            "('ok', 'ok', '$argon2id$x', 'admin', FALSE, 0, 0)",
            "('ok', 'ok', '$argon2id$x', 'admin', FALSE, 0, 0)",
            true,
        ),
        ("('a', 'a', '$argon2id$x', 'root', FALSE, 0, 0)", "('a', 'a', '$argon2id$x', 'root', FALSE, 0, 0)", false),
        ("('b', 'b', 'plain', 'admin', FALSE, 0, 0)", "('b', 'b', 'plain', 'admin', FALSE, 0, 0)", false),
        ("('', 'c', '$argon2id$x', 'admin', FALSE, 0, 0)", "('', 'c', '$argon2id$x', 'admin', FALSE, 0, 0)", false),
        (
            "('d' || char(10) || 'e', 'd', '$argon2id$x', 'admin', FALSE, 0, 0)",
            "('d' || chr(10) || 'e', 'd', '$argon2id$x', 'admin', FALSE, 0, 0)",
            false,
        ),
    ];
    for f in [&sqlite, &postgres] {
        for (lite_row, pg_row, accepted) in ROWS {
            let row = if f.store.backend() == Backend::Sqlite { lite_row } else { pg_row };
            let sql = format!("{INSERT}{row}");
            let r = match f.store.backend() {
                Backend::Sqlite => {
                    let mut c = SqliteConnection::connect(&f.url).await.expect("sqlite");
                    sqlx::query(sqlx::AssertSqlSafe(sql.clone())).execute(&mut c).await.map(|_| ())
                }
                Backend::Postgres => {
                    let mut c = PgConnection::connect(&f.url).await.expect("postgres");
                    sqlx::query(sqlx::AssertSqlSafe(sql.clone())).execute(&mut c).await.map(|_| ())
                }
            };
            assert_eq!(r.is_ok(), accepted, "{:?}: {sql}: {r:?}", f.store.backend());
        }
    }
    sqlite.store.close().await;
    postgres.store.close().await;
}
