//! Throwaway PostgreSQL databases: [`fresh_database`] creates one with a unique name per
//! call, and dropping the [`PgTestDb`] drops the database (best effort).
//!
//! The server comes from the admin URL in [`URL_ENV`] (a role with `CREATEDB`), which
//! `cargo xtask test` sets after starting PostgreSQL and creating a role with a fresh
//! random password. Without it the fixture panics: a store test that cannot reach
//! PostgreSQL fails loudly, it never skips and passes.

use std::fmt;
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};

/// Environment variable holding the admin URL, e.g.
/// `postgres://bulkhead_test:<password>@127.0.0.1:5432/postgres`.
pub const URL_ENV: &str = "BULKHEAD_TEST_POSTGRES_URL";

/// Prefix of every database this fixture creates (so leftovers of killed runs are
/// recognisable: `SELECT datname FROM pg_database WHERE datname LIKE 'bh_test_%'`).
pub const DB_PREFIX: &str = "bh_test_";

/// The admin URL from [`URL_ENV`]; panics with instructions when it is not set.
pub fn require_admin_url() -> String {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "{URL_ENV} is not set: the PostgreSQL store tests need a server. Run them with \
             `cargo xtask test`, which starts the local PostgreSQL, creates a test role with a \
             random password and exports {URL_ENV}; or export it yourself as \
             postgres://ROLE:PASSWORD@127.0.0.1:5432/postgres for a role with CREATEDB. \
             These tests fail rather than skip."
        ),
    }
}

/// A database that exists for one test. Dropping it drops the database, terminating
/// connections still open to it; failures are reported on stderr and otherwise ignored
/// (the name prefix lets an operator clean up).
pub struct PgTestDb {
    name: String,
    url: String,
    admin_url: String,
}

impl fmt::Debug for PgTestDb {
    // The URLs carry a password: show the database name only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTestDb").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PgTestDb {
    /// Connection URL of this database (same server, role and password as the admin URL).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Creates an empty database with a unique name on the server named by [`URL_ENV`].
///
/// Panics if the variable is unset or the server refuses: see the module docs.
pub async fn fresh_database() -> PgTestDb {
    let admin_url = require_admin_url();
    // Generated from hex only, so it can be spliced into DDL (which takes no parameters).
    let name = format!("{DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let mut url = url::Url::parse(&admin_url).unwrap_or_else(|e| {
        panic!("{URL_ENV} is not a valid URL ({e}); expected postgres://ROLE:PASSWORD@HOST:PORT/DB")
    });
    url.set_path(&format!("/{name}"));

    let mut admin = connect(&admin_url).await;
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("could not create test database {name} (does the role have CREATEDB?): {e}"));
    let _ = admin.close().await;
    PgTestDb { name, url: url.into(), admin_url }
}

/// [`fresh_database`] for tests without an async runtime of their own (the fault
/// tests drive real binaries from plain threads).
pub fn fresh_database_blocking() -> PgTestDb {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("a runtime for creating the test database: {e}"));
    rt.block_on(fresh_database())
}

/// The admin URL the database was created with (a role that owns it: it may lock it
/// out and let it back in).
impl PgTestDb {
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }
}

async fn connect(admin_url: &str) -> PgConnection {
    let options = PgConnectOptions::from_str(admin_url)
        .unwrap_or_else(|e| panic!("{URL_ENV} is not a valid PostgreSQL URL: {e}"))
        .application_name("bulkhead-testkit");
    options.connect().await.unwrap_or_else(|e| {
        panic!(
            "could not connect to PostgreSQL at {URL_ENV}: {e}; is the server running \
             (`pg_ctlcluster --skip-systemctl-redirect 15 main start`, or use `cargo xtask test`)?"
        )
    })
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let (name, admin_url) = (self.name.clone(), self.admin_url.clone());
        // Drop runs inside the test's async runtime, where blocking on a future is not
        // allowed; a short-lived thread with its own runtime sidesteps that.
        let outcome = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async {
                let options = PgConnectOptions::from_str(&admin_url).map_err(|e| e.to_string())?;
                let mut admin = options.connect().await.map_err(|e| e.to_string())?;
                // FORCE (PostgreSQL 13+) terminates pools the test left open.
                sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")))
                    .execute(&mut admin)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok::<(), String>(())
            })
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("testkit: could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("testkit: dropping test database {} panicked", self.name),
        }
    }
}
