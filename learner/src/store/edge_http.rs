//! HTTP (L7) facts per service-graph edge (migration 0009): written in the ingest
//! transaction of the batch that carried them, read for synthesis.
//!
//! A batch's L7 observations are few (only ingress flows of plaintext HTTP servers
//! carry any, each at most 64 (method, path) pairs), so the writer favours clarity over
//! the statement-class machinery of the flow path. Per batch with L7 data, in order:
//! 1. upsert each edge's `edge_http_stats` row with the collector's opaque / overflow
//!    counts — on PostgreSQL this row lock (taken in key order) serializes concurrent
//!    ingests of the same edge, so step 3 cannot overshoot the per-edge bound;
//! 2. read which of the batch's (method, path) pairs each edge already has;
//! 3. upsert the known pairs and as many new ones as the bound
//!    ([`MAX_HTTP_PATHS_PER_EDGE`]) leaves room for, most requested first;
//! 4. count the requests of the pairs that did not fit as the edge's overflow.
//!
//! Methods and paths are validated on the wire (`bulkhead_model::proto`) and always
//! bound as parameters; the SQL text only ever contains fixed fragments.

use std::collections::{HashMap, HashSet};

use bulkhead_model::{EdgeHttp, EdgeHttpRequest, EdgeKey, MAX_HTTP_PATHS_PER_EDGE};
use sqlx::{PgConnection, Postgres, QueryBuilder, Sqlite, SqliteConnection};

use super::StoreError;
use super::decode::{counter, identity, port};
use super::postgres::PgStore;
use super::prepare::{EdgeHttpAgg, protocol_from_db, sat};
use super::sqlite::SqliteStore;

/// Edges per statement (4 parameters each in the key lookups, 8 in the stats upsert).
const EDGES_PER_STATEMENT: usize = 500;
/// (method, path) rows per upsert statement (9 parameters each).
const ROWS_PER_STATEMENT: usize = 1000;

const STATS_COLUMNS: &str = "INSERT INTO edge_http_stats (src_identity, dst_identity, dst_port, protocol, \
     opaque_connections, opaque_last_seen_unix_ms, overflow_requests, overflow_last_seen_unix_ms) ";

const HTTP_COLUMNS: &str = "INSERT INTO edge_http (src_identity, dst_identity, dst_port, protocol, method, path, \
     requests, first_seen_unix_ms, last_seen_unix_ms) ";

const SELECT_REQUESTS: &str = "SELECT src_identity, dst_identity, dst_port, protocol, method, path, requests, \
     first_seen_unix_ms, last_seen_unix_ms FROM edge_http WHERE last_seen_unix_ms >= $1 \
     ORDER BY src_identity, dst_identity, dst_port, protocol, method, path";

const SELECT_STATS: &str = "SELECT src_identity, dst_identity, dst_port, protocol, opaque_connections, \
     opaque_last_seen_unix_ms, overflow_requests, overflow_last_seen_unix_ms FROM edge_http_stats \
     ORDER BY src_identity, dst_identity, dst_port, protocol";

/// The two functions the backends spell differently: two-argument minimum / maximum
/// (SQLite's `min`/`max` are scalar with two arguments; PostgreSQL has LEAST/GREATEST).
struct Dialect {
    least: &'static str,
    greatest: &'static str,
}

const SQLITE: Dialect = Dialect { least: "min", greatest: "max" };
const POSTGRES: Dialect = Dialect { least: "LEAST", greatest: "GREATEST" };

impl Dialect {
    /// `col = col + excluded.col`, saturating at i64::MAX like every stored counter.
    fn add(&self, table: &str, col: &str) -> String {
        format!("{col} = {}({table}.{col}, 9223372036854775807 - excluded.{col}) + excluded.{col}", self.least)
    }

    /// `col = max(col, excluded.col)` where either may be NULL (SQLite's `max` is NULL
    /// if any argument is).
    fn latest(&self, table: &str, col: &str) -> String {
        format!(
            "{col} = {}(COALESCE({table}.{col}, excluded.{col}), COALESCE(excluded.{col}, {table}.{col}))",
            self.greatest
        )
    }

    fn stats_conflict(&self) -> String {
        let t = "edge_http_stats";
        format!(
            " ON CONFLICT (src_identity, dst_identity, dst_port, protocol) DO UPDATE SET {}, {}, {}, {}",
            self.add(t, "opaque_connections"),
            self.latest(t, "opaque_last_seen_unix_ms"),
            self.add(t, "overflow_requests"),
            self.latest(t, "overflow_last_seen_unix_ms"),
        )
    }

    fn http_conflict(&self) -> String {
        let t = "edge_http";
        format!(
            " ON CONFLICT (src_identity, dst_identity, dst_port, protocol, method, path) DO UPDATE SET {}, \
             first_seen_unix_ms = {}({t}.first_seen_unix_ms, excluded.first_seen_unix_ms), \
             last_seen_unix_ms = {}({t}.last_seen_unix_ms, excluded.last_seen_unix_ms)",
            self.add(t, "requests"),
            self.least,
            self.greatest,
        )
    }
}

/// An edge key as stored.
type RawKey = (i64, i64, i32, i32);
/// (method, path) of one request shape.
type MethodPath = (String, String);
/// (requests, first seen, last seen) of one request shape in a batch.
type Seen = (u64, i64, i64);

fn raw_key(k: &EdgeKey) -> RawKey {
    (i64::from(k.src.0), i64::from(k.dst.0), i32::from(k.dst_port), i32::from(k.protocol.number()))
}

/// One (method, path) row to upsert.
struct Row<'a> {
    key: RawKey,
    method: &'a str,
    path: &'a str,
    requests: i64,
    first: i64,
    last: i64,
}

/// Step 3's decision for one batch: the rows to upsert and, per edge, the requests and
/// latest sighting of the pairs that did not fit.
fn admit<'a>(
    http: &'a [(EdgeKey, EdgeHttpAgg)],
    existing: &HashMap<RawKey, HashSet<(String, String)>>,
) -> (Vec<Row<'a>>, Vec<(RawKey, i64, i64)>) {
    let mut rows = Vec::new();
    let mut overflow = Vec::new();
    for (k, h) in http {
        let key = raw_key(k);
        let known = existing.get(&key);
        let mut room = MAX_HTTP_PATHS_PER_EDGE.saturating_sub(known.map_or(0, HashSet::len));
        let mut fresh: Vec<(&MethodPath, &Seen)> = Vec::new();
        for (mp, v) in &h.requests {
            if known.is_some_and(|s| s.contains(mp)) {
                rows.push(row(key, mp, v));
            } else {
                fresh.push((mp, v));
            }
        }
        // Most requested first, then by name: deterministic whatever the batch order.
        fresh.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(b.0)));
        let (mut dropped, mut last) = (0u64, None::<i64>);
        for (mp, v) in fresh {
            if room > 0 {
                room -= 1;
                rows.push(row(key, mp, v));
            } else {
                dropped = dropped.saturating_add(v.0);
                last = last.max(Some(v.2));
            }
        }
        if let Some(last) = last {
            overflow.push((key, sat(dropped), last));
        }
    }
    (rows, overflow)
}

fn row<'a>(key: RawKey, (method, path): &'a MethodPath, &(requests, first, last): &Seen) -> Row<'a> {
    Row { key, method, path, requests: sat(requests), first, last }
}

/// Writes a batch's L7 observations inside the caller's transaction (see the module
/// doc for the steps). One copy per backend: the statements are built the same way,
/// only the connection type and two SQL function names differ.
macro_rules! writer {
    ($name:ident, $db:ty, $conn:ty, $dialect:expr) => {
        pub(crate) async fn $name(conn: &mut $conn, http: &[(EdgeKey, EdgeHttpAgg)]) -> Result<(), sqlx::Error> {
            if http.is_empty() {
                return Ok(());
            }
            let d = &$dialect;
            // 1. Stats rows first: the lock order (and, on PostgreSQL, the serialization).
            let conflict = d.stats_conflict();
            for chunk in http.chunks(EDGES_PER_STATEMENT) {
                let mut b = QueryBuilder::<$db>::new(STATS_COLUMNS);
                b.push_values(chunk, |mut r, (k, h)| {
                    let (src, dst, port, proto) = raw_key(k);
                    r.push_bind(src)
                        .push_bind(dst)
                        .push_bind(port)
                        .push_bind(proto)
                        .push_bind(sat(h.opaque_connections))
                        .push_bind(h.opaque_last_seen_unix_ms)
                        .push_bind(sat(h.overflow_requests))
                        .push_bind(h.overflow_last_seen_unix_ms);
                });
                b.push(&conflict);
                b.build().persistent(false).execute(&mut *conn).await?;
            }

            // 2. The pairs the edges already have.
            let with_requests: Vec<RawKey> =
                http.iter().filter(|(_, h)| !h.requests.is_empty()).map(|(k, _)| raw_key(k)).collect();
            let mut existing: HashMap<RawKey, HashSet<(String, String)>> = HashMap::new();
            for chunk in with_requests.chunks(EDGES_PER_STATEMENT) {
                let mut b = QueryBuilder::<$db>::new(
                    "SELECT src_identity, dst_identity, dst_port, protocol, method, path FROM edge_http WHERE ",
                );
                for (i, (src, dst, port, proto)) in chunk.iter().enumerate() {
                    b.push(if i == 0 { "(src_identity = " } else { " OR (src_identity = " });
                    b.push_bind(*src).push(" AND dst_identity = ").push_bind(*dst);
                    b.push(" AND dst_port = ").push_bind(*port).push(" AND protocol = ").push_bind(*proto).push(")");
                }
                let found: Vec<(i64, i64, i32, i32, String, String)> =
                    b.build_query_as().persistent(false).fetch_all(&mut *conn).await?;
                for (src, dst, port, proto, method, path) in found {
                    existing.entry((src, dst, port, proto)).or_default().insert((method, path));
                }
            }

            // 3. Known pairs and what fits of the new ones.
            let (rows, overflow) = admit(http, &existing);
            let conflict = d.http_conflict();
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut b = QueryBuilder::<$db>::new(HTTP_COLUMNS);
                b.push_values(chunk, |mut r, row| {
                    r.push_bind(row.key.0)
                        .push_bind(row.key.1)
                        .push_bind(row.key.2)
                        .push_bind(row.key.3)
                        .push_bind(row.method)
                        .push_bind(row.path)
                        .push_bind(row.requests)
                        .push_bind(row.first)
                        .push_bind(row.last);
                });
                b.push(&conflict);
                b.build().persistent(false).execute(&mut *conn).await?;
            }

            // 4. The rest is overflow (rare: an edge past its bound).
            for ((src, dst, port, proto), requests, last) in overflow {
                let mut b = QueryBuilder::<$db>::new("UPDATE edge_http_stats SET overflow_requests = ");
                b.push(d.least).push("(overflow_requests, 9223372036854775807 - ").push_bind(requests);
                b.push(") + ").push_bind(requests);
                b.push(", overflow_last_seen_unix_ms = ")
                    .push(d.greatest)
                    .push("(COALESCE(overflow_last_seen_unix_ms, ");
                b.push_bind(last).push("), ").push_bind(last).push(")");
                b.push(" WHERE src_identity = ").push_bind(src).push(" AND dst_identity = ").push_bind(dst);
                b.push(" AND dst_port = ").push_bind(port).push(" AND protocol = ").push_bind(proto);
                b.build().persistent(false).execute(&mut *conn).await?;
            }
            Ok(())
        }
    };
}

writer!(write_sqlite, Sqlite, SqliteConnection, SQLITE);
writer!(write_postgres, Postgres, PgConnection, POSTGRES);

// === reads ===

type RawRequest = (i64, i64, i32, i32, String, String, i64, i64, i64);
type RawStats = (i64, i64, i32, i32, i64, Option<i64>, i64, Option<i64>);

const T: &str = "edge_http";

fn edge_key(table: &'static str, (src, dst, p, proto): RawKey) -> Result<EdgeKey, StoreError> {
    Ok(EdgeKey {
        src: identity(table, "src_identity", src)?,
        dst: identity(table, "dst_identity", dst)?,
        dst_port: port(table, "dst_port", p)?,
        protocol: protocol_from_db(table, proto)?,
    })
}

/// Joins the two tables' rows (both sorted by key) into one [`EdgeHttp`] per edge.
fn assemble(requests: Vec<RawRequest>, stats: Vec<RawStats>) -> Result<Vec<EdgeHttp>, StoreError> {
    let mut out: std::collections::BTreeMap<EdgeKey, EdgeHttp> = std::collections::BTreeMap::new();
    let empty = |key| EdgeHttp {
        key,
        requests: Vec::new(),
        opaque_connections: 0,
        opaque_last_seen_unix_ms: None,
        overflow_requests: 0,
        overflow_last_seen_unix_ms: None,
    };
    for (src, dst, p, proto, opaque, opaque_last, overflow, overflow_last) in stats {
        let key = edge_key("edge_http_stats", (src, dst, p, proto))?;
        let e = out.entry(key).or_insert_with(|| empty(key));
        e.opaque_connections = counter("edge_http_stats", "opaque_connections", opaque)?;
        e.opaque_last_seen_unix_ms = opaque_last;
        e.overflow_requests = counter("edge_http_stats", "overflow_requests", overflow)?;
        e.overflow_last_seen_unix_ms = overflow_last;
    }
    for (src, dst, p, proto, method, path, requests, first, last) in requests {
        let key = edge_key(T, (src, dst, p, proto))?;
        out.entry(key).or_insert_with(|| empty(key)).requests.push(EdgeHttpRequest {
            method,
            path,
            requests: counter(T, "requests", requests)?,
            first_seen_unix_ms: first,
            last_seen_unix_ms: last,
        });
    }
    Ok(out.into_values().collect())
}

impl SqliteStore {
    pub async fn edge_http(&self, since_unix_ms: i64) -> Result<Vec<EdgeHttp>, StoreError> {
        const OP: &str = "edge_http";
        let requests: Vec<RawRequest> = sqlx::query_as(SELECT_REQUESTS)
            .bind(since_unix_ms)
            .fetch_all(&self.reader)
            .await
            .map_err(StoreError::db(OP))?;
        let stats: Vec<RawStats> =
            sqlx::query_as(SELECT_STATS).fetch_all(&self.reader).await.map_err(StoreError::db(OP))?;
        assemble(requests, stats)
    }
}

impl PgStore {
    pub async fn edge_http(&self, since_unix_ms: i64) -> Result<Vec<EdgeHttp>, StoreError> {
        const OP: &str = "edge_http";
        // One snapshot for both reads: a concurrent ingest must not show up in one only.
        let mut tx = self.pool.begin().await.map_err(StoreError::db(OP))?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let requests: Vec<RawRequest> = sqlx::query_as(SELECT_REQUESTS)
            .bind(since_unix_ms)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let stats: Vec<RawStats> =
            sqlx::query_as(SELECT_STATS).fetch_all(&mut *tx).await.map_err(StoreError::db(OP))?;
        tx.commit().await.map_err(StoreError::db(OP))?;
        assemble(requests, stats)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bulkhead_model::{Identity, Protocol};

    use super::*;

    fn agg(pairs: &[(&str, &str, u64)]) -> EdgeHttpAgg {
        EdgeHttpAgg {
            requests: pairs
                .iter()
                .map(|(m, p, n)| (((*m).to_owned(), (*p).to_owned()), (*n, 1, 2)))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    #[test]
    fn admission_keeps_known_pairs_and_fills_the_bound_most_requested_first() {
        let key = EdgeKey { src: Identity(300), dst: Identity(301), dst_port: 80, protocol: Protocol::Tcp };
        let mut existing = HashMap::new();
        let known: HashSet<(String, String)> =
            (0..MAX_HTTP_PATHS_PER_EDGE - 1).map(|i| ("GET".to_owned(), format!("/{i}"))).collect();
        existing.insert(raw_key(&key), known);
        let http = vec![(key, agg(&[("GET", "/0", 5), ("GET", "/rare", 1), ("POST", "/busy", 9), ("GET", "/x", 1)]))];
        let (rows, overflow) = admit(&http, &existing);
        let kept: Vec<(&str, &str)> = rows.iter().map(|r| (r.method, r.path)).collect();
        assert_eq!(kept, vec![("GET", "/0"), ("POST", "/busy")], "the known pair and the one that fits");
        assert_eq!(overflow, vec![(raw_key(&key), 2, 2)], "two requests of two pairs did not fit");
    }
}
