//! PostgreSQL for the store tests: a running Debian cluster, a `bulkhead_test` role with a
//! random password kept outside the repository, and no leftover `bulkhead_test_*` databases.
//!
//! The tests get `BULKHEAD_TEST_POSTGRES_URL=postgres://bulkhead_test:<pw>@127.0.0.1:<port>/postgres`
//! and create their own databases (`bulkhead_test_*` or `bh_test_*`) from there.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::step;
use crate::util::{capture, output, random_hex, run, show};

/// The role the tests log in as.
pub const ROLE: &str = "bulkhead_test";
/// Databases with these prefixes belong to the tests and are dropped by the next run:
/// `bulkhead_test_` (the agreed name) and `bh_test_` (what
/// `bulkhead_testkit::postgres::DB_PREFIX` uses today).
pub const DB_PREFIXES: &[&str] = &["bulkhead_test_", "bh_test_"];
/// The environment variable the tests read.
pub const URL_ENV: &str = "BULKHEAD_TEST_POSTGRES_URL";

/// One row of `pg_lsclusters`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cluster {
    version: String,
    name: String,
    port: u16,
    online: bool,
}

/// Parses `pg_lsclusters --no-header`: `Ver Cluster Port Status Owner Data Log`.
fn parse_clusters(text: &str) -> Vec<Cluster> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let version = f.next()?.to_owned();
            let name = f.next()?.to_owned();
            let port = f.next()?.parse().ok()?;
            let online = f.next()?.starts_with("online");
            Some(Cluster { version, name, port, online })
        })
        .collect()
}

fn clusters() -> Result<Vec<Cluster>> {
    Ok(parse_clusters(&capture(Command::new("pg_lsclusters").arg("--no-header"))?))
}

/// The newest installed server version (`/usr/lib/postgresql/<N>/bin/postgres`).
fn newest_server_version() -> Result<String> {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .context("reading /usr/lib/postgresql (is the postgresql package installed?)")?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("bin").join("postgres").exists())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    versions.sort_unstable();
    versions.last().map(u32::to_string).context("no PostgreSQL server under /usr/lib/postgresql")
}

/// Makes sure a cluster is running, prepares the role and returns the tests' URL.
///
/// The role's password is random, made on this machine, and kept in a root-only file
/// under the cache directory (never in the repository). It is reused while it still
/// logs in, so two overlapping runs (`cargo xtask env` in one shell, `cargo xtask test`
/// in another) do not pull the password from under each other; a new one is made only
/// when the file is missing or stale.
pub fn prepare() -> Result<String> {
    let cluster = running_cluster()?;
    let file = crate::util::cache_dir()?.join("postgres-test-password");
    let kept = std::fs::read_to_string(&file).ok().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty());
    let password = match kept {
        Some(p) if check_login(&cluster, &p).is_ok() => {
            step!("test", "postgres: role {ROLE} ready (password kept in {})", file.display());
            p
        }
        _ => {
            let password = random_hex(24)?;
            // Everything goes through psql's stdin: the password never shows up in `ps`.
            psql(
                &cluster,
                &format!(
                    "DO $$ BEGIN
                       IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN CREATE ROLE {ROLE}; END IF;
                     END $$;
                     ALTER ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}';"
                ),
            )
            .context("creating/updating the test role")?;
            write_private(&file, &password)?;
            step!("test", "postgres: role {ROLE} ready (new password, kept in {})", file.display());
            password
        }
    };
    drop_leftover_databases(&cluster)?;
    let url = format!("postgres://{ROLE}:{password}@127.0.0.1:{}/postgres", cluster.port);
    check_login(&cluster, &password)?;
    Ok(url)
}

/// Writes a file only its owner can read.
fn write_private(path: &std::path::Path, content: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// The cluster to use, started (and created if there is none).
fn running_cluster() -> Result<Cluster> {
    let mut all = clusters()?;
    if all.is_empty() {
        let version = newest_server_version()?;
        step!("test", "postgres: no cluster; creating {version}/main");
        run(Command::new("pg_createcluster").args([&version, "main"]))?;
        all = clusters()?;
    }
    // Prefer one that is already running, then the newest version.
    all.sort_by_key(|c| (c.online, c.version.parse::<u32>().unwrap_or(0)));
    let mut cluster = all.pop().context("pg_lsclusters lists no cluster")?;
    if cluster.online {
        step!("test", "postgres: {}/{} running on port {}", cluster.version, cluster.name, cluster.port);
        return Ok(cluster);
    }
    step!("test", "postgres: starting {}/{} on port {}…", cluster.version, cluster.name, cluster.port);
    run(Command::new("pg_ctlcluster").args(["--skip-systemctl-redirect", &cluster.version, &cluster.name, "start"]))?;
    let start = Instant::now();
    loop {
        let ready =
            output(Command::new("pg_isready").args(["-q", "-h", "127.0.0.1", "-p", &cluster.port.to_string()]))?;
        if ready.status.success() {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("PostgreSQL {}/{} not accepting connections after 30 s", cluster.version, cluster.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.online = true;
    Ok(cluster)
}

/// Runs SQL as the `postgres` superuser over the local socket; returns stdout.
fn psql(cluster: &Cluster, sql: &str) -> Result<String> {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", "postgres"])
        .args(["-p", &cluster.port.to_string()])
        // runuser keeps the cwd; postgres may not be allowed in ours.
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = show(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{shown}`"))?;
    child
        .stdin
        .take()
        .context("psql stdin")?
        .write_all(sql.as_bytes())
        .with_context(|| format!("writing SQL to `{shown}`"))?;
    let out = child.wait_with_output().with_context(|| format!("waiting for `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim_end());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `name` is one of ours and safe to splice into SQL.
fn is_test_database(name: &str) -> bool {
    DB_PREFIXES.iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    })
}

fn drop_leftover_databases(cluster: &Cluster) -> Result<()> {
    let listed = psql(cluster, "SELECT datname FROM pg_database;")?;
    let leftovers: Vec<&str> = listed.lines().map(str::trim).filter(|n| is_test_database(n)).collect();
    if leftovers.is_empty() {
        step!("test", "postgres: no leftover test databases ({}*)", DB_PREFIXES.join("*, "));
        return Ok(());
    }
    let mut dropped = 0;
    for name in &leftovers {
        // No FORCE: a database still in use belongs to a test running right now
        // (another checkout, another engineer); leave it alone.
        match psql(cluster, &format!("DROP DATABASE IF EXISTS \"{name}\";")) {
            Ok(_) => dropped += 1,
            Err(e) => step!("test", "postgres: kept {name} (in use?): {e:#}"),
        }
    }
    step!("test", "postgres: dropped {dropped} of {} leftover test databases", leftovers.len());
    Ok(())
}

/// Logs in over TCP the way the tests will, so a broken URL fails here, clearly.
fn check_login(cluster: &Cluster, password: &str) -> Result<()> {
    let out = output(
        Command::new("psql")
            .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-U", ROLE, "-d", "postgres", "-c", "SELECT 1"])
            .args(["-p", &cluster.port.to_string()])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10"),
    )?;
    if !out.status.success() || String::from_utf8_lossy(&out.stdout).trim() != "1" {
        bail!(
            "cannot log in as {ROLE} on 127.0.0.1:{} (pg_hba.conf?): {}",
            cluster.port,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pg_lsclusters() {
        let text = "15  main    5432 down   postgres /var/lib/postgresql/15/main /var/log/postgresql/postgresql-15-main.log\n\
                    16  test    5433 online,recovery postgres /d /l\n";
        assert_eq!(
            parse_clusters(text),
            vec![
                Cluster { version: "15".into(), name: "main".into(), port: 5432, online: false },
                Cluster { version: "16".into(), name: "test".into(), port: 5433, online: true },
            ]
        );
        assert!(parse_clusters("").is_empty());
    }

    #[test]
    fn only_our_databases_are_dropped() {
        assert!(is_test_database("bulkhead_test_0a1b"));
        assert!(is_test_database("bulkhead_test_store_case_3"));
        assert!(!is_test_database("bulkhead_test_"));
        assert!(!is_test_database("bulkhead_test"));
        assert!(!is_test_database("bulkhead"));
        assert!(!is_test_database("postgres"));
        assert!(!is_test_database("bulkhead_test_x\"; DROP"));
        assert!(!is_test_database("bulkhead_test_a-b"));
        assert!(is_test_database("bh_test_0f3a9c"));
        assert!(!is_test_database("bh_test_"));
    }
}
