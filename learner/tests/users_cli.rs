//! `bulkhead-learner user …` (the real binary on a SQLite file): the first admin gets a
//! printed one-time password that logs in and is stored only as an argon2id hash; the
//! other user commands change what the store says.

use std::path::Path;
use std::process::Output;

use bulkhead_learner::auth::Role;
use bulkhead_learner::store::{AuditQuery, Store, StoreError};

async fn learner(db: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-learner"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("BULKHEAD_DB")
        .env("USER", "operator")
        .env_remove("SUDO_USER")
        .output()
        .await
        .expect("run bulkhead-learner")
}

fn ok(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Everything on disk for this database (the file and any WAL), as lossy text.
fn on_disk(path: &Path) -> String {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", path.display());
        if let Ok(bytes) = std::fs::read(&p) {
            all.extend(bytes);
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_commands_on_the_real_binary() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state").join("learner.db");
    let db = format!("sqlite://{}", path.display());

    // The first admin: one line on stdout, the one-time password.
    let out = ok(&learner(&db, &["user", "add", "Admin", "--role", "admin"]).await, "user add");
    let password = out.trim().to_owned();
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert!(password.len() >= 20, "{password:?}");
    assert!(!on_disk(&path).contains(&password), "the one-time password is not stored in clear");
    assert!(on_disk(&path).contains("$argon2id$"), "its argon2id hash is");

    // Adding the same name again fails and prints no password.
    let again = learner(&db, &["user", "add", "admin", "--role", "viewer"]).await;
    assert!(!again.status.success() && again.stdout.is_empty());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    // An unknown role is refused by argument parsing.
    assert!(!learner(&db, &["user", "add", "bob", "--role", "root"]).await.status.success());

    let store = Store::open(&db).await.expect("open");
    let session = store.login("admin", &password, 3_600_000, 1).await.expect("the printed password logs in");
    assert_eq!(session.user.role, Role::Admin);
    assert!(session.user.must_change_password, "a one-time password must be changed");
    assert!(matches!(store.login("admin", "wrong password!", 3_600_000, 1).await, Err(StoreError::InvalidCredentials)));
    store.close().await;

    // list, set-role, reset-password, token, disable.
    ok(&learner(&db, &["user", "add", "bob", "--role", "viewer"]).await, "add bob");
    let listed = ok(&learner(&db, &["user", "list"]).await, "list");
    let users: Vec<serde_json::Value> = listed.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(users.iter().map(|u| u["username"].as_str().expect("name")).collect::<Vec<_>>(), ["Admin", "bob"]);
    assert!(!listed.contains("argon2"), "listing never shows hashes");

    ok(&learner(&db, &["user", "set-role", "bob", "approver"]).await, "set-role");
    let reset = ok(&learner(&db, &["user", "reset-password", "BOB"]).await, "reset");
    let bob_password = reset.trim().to_owned();
    let token = ok(&learner(&db, &["user", "token", "bob", "--token-name", "ci"]).await, "token").trim().to_owned();
    assert!(token.starts_with("bht_"), "{token:?}");
    assert!(!on_disk(&path).contains(&token) && !on_disk(&path).contains(&bob_password));

    let store = Store::open(&db).await.expect("open");
    let bob = store.login("bob", &bob_password, 3_600_000, 2).await.expect("reset password logs in");
    assert_eq!(bob.user.role, Role::Approver);
    let acting = store.api_token(&token, 3).await.expect("token").expect("live");
    assert_eq!((acting.username.as_str(), acting.role), ("bob", Role::Approver));
    store.close().await;

    ok(&learner(&db, &["user", "disable", "bob"]).await, "disable");
    let store = Store::open(&db).await.expect("open");
    assert!(matches!(store.login("bob", &bob_password, 3_600_000, 4).await, Err(StoreError::InvalidCredentials)));
    assert_eq!(store.api_token(&token, 4).await.expect("token"), None);
    assert!(!learner(&db, &["user", "disable", "nobody"]).await.status.success());

    // Each change is audited as the local account that ran the CLI.
    let audit = store.audit(&AuditQuery { limit: 100, ..AuditQuery::default() }).await.expect("audit");
    let actions: Vec<(&str, &str)> = audit.iter().rev().map(|r| (r.actor.as_str(), r.action.as_str())).collect();
    assert_eq!(
        actions,
        [
            ("cli:operator", "user.create"),
            ("Admin", "session.login"),
            ("cli:operator", "user.create"),
            ("cli:operator", "user.role"),
            ("cli:operator", "user.password"),
            ("cli:operator", "token.create"),
            ("bob", "session.login"),
            ("cli:operator", "user.disable"),
        ]
    );
    store.verify_audit_chain().await.expect("chain");
    store.close().await;
}
