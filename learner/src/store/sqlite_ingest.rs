//! SQLite ingest: one batch in as few statements (and driver round trips) as possible.
//!
//! sqlx runs each SQLite connection on its own thread and every `execute` is a round
//! trip to it: on a small, busy machine a trip costs tens of microseconds, more than
//! SQLite needs to insert a hundred flows. So a batch is written by a handful of
//! multi-statement scripts whose text never changes (and so stays prepared):
//!
//! 1. `BEGIN IMMEDIATE` (the transaction);
//! 2. the dedupe record, one statement (`RECORD_BATCH`); a duplicate stops here;
//! 3. agent and boot upserts plus the first flow chunk (`Scripts::flows_first`);
//! 4. the `flow_blocks` row plus the first edge chunk (`Scripts::edges_first`);
//! 5. DNS answers, endpoints and any further chunks of a very large batch;
//! 6. `COMMIT`.
//!
//! A multi-row INSERT is prepared for a fixed number of rows, a power of two from 8 (a
//! "class"), and the rows a batch does not fill are left unbound: sqlx clears a
//! statement's bindings before each execution and binds only the arguments it is given,
//! SQLite reads an unbound parameter as NULL, and `WHERE column1 IS NOT NULL` drops
//! those rows. So a batch of any size uses one of a few statement texts per table, each
//! prepared once per connection, and less than half of a statement's rows are padding
//! (beyond the smallest class). The padded statement is always the last of its script:
//! sqlx hands arguments to the statements of a script in order, so the missing ones must
//! be the last. (Should a later sqlx refuse missing arguments, every store test with an
//! odd batch size fails.)
//!
//! Every parameter in these scripts is an anonymous `?`, bound in order, even where a
//! value repeats: SQLite looks a parameter's name up by a linear search, and sqlx asks
//! for the name of every parameter it binds, so a statement with thousands of numbered
//! (`?NNN`) parameters binds in quadratic time (measured: 0.4 s per 1000-flow batch).

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use sqlx::sqlite::SqliteArguments;
use sqlx::{Arguments as _, SqliteConnection};

use super::IngestOutcome;
use super::prepare::{FlowColumns, PreparedBatch};

/// Smallest statement class (rows).
const MIN_CLASS: usize = 8;
/// Largest classes: 1024 flow rows of [`FLOW_COLS`] values stay below [`MAX_PARAMS`]
/// with room for the script's other parameters.
const MAX_FLOW_ROWS: usize = 1024;
const MAX_EDGE_ROWS: usize = 1024;
const MAX_DNS_ROWS: usize = 512;

pub(crate) const FLOW_COLS: usize = 19;
const EDGE_COLS: usize = 10;
const DNS_COLS: usize = 7;

/// SQLite's default limit on parameters per statement (SQLITE_MAX_VARIABLE_NUMBER, the
/// bundled build keeps it); every script's statements stay below it.
const MAX_PARAMS: usize = 32_766;
const _: () = assert!(AGENT_AND_BOOT_ARGS + MAX_FLOW_ROWS * FLOW_COLS <= MAX_PARAMS);
const _: () = assert!(BLOCK_ARGS + MAX_EDGE_ROWS * EDGE_COLS <= MAX_PARAMS);
const _: () = assert!(MAX_DNS_ROWS * DNS_COLS <= MAX_PARAMS);

pub(crate) const FLOW_COLUMNS: &str = "src_identity, dst_identity, src_addr, src_port, dst_addr, dst_port, \
     protocol, direction, netns_ino, cgroup_id, pid, comm, connections, bytes_sent, bytes_received, packets, \
     verdict, first_seen_unix_ms, last_seen_unix_ms";

const EDGE_COLUMNS: &str = "src_identity, dst_identity, dst_port, protocol, first_seen_unix_ms, \
     last_seen_unix_ms, connections_egress, bytes_egress, connections_ingress, bytes_ingress";

const DNS_COLUMNS: &str = "node_id, netns_ino, name, addr, ttl_seconds, first_seen_unix_ms, last_seen_unix_ms";

/// Dedupe: records the batch unless it was stored before (same key) or its seq is at or
/// below what was pruned for its boot. One row affected = new batch.
pub(crate) const RECORD_BATCH: &str = "INSERT INTO ingested_batches \
     (node_id, boot_id, seq, received_unix_ms, flows) SELECT $1, $2, $3, $4, $5 \
     WHERE NOT EXISTS (SELECT 1 FROM agent_boots WHERE node_id = $1 AND boot_id = $2 AND pruned_through_seq >= $3) \
     ON CONFLICT (node_id, boot_id, seq) DO NOTHING";

/// Node, boot, received (twice).
const UPSERT_AGENT: &str = "INSERT INTO agents \
     (node_id, boot_id, first_seen_unix_ms, last_seen_unix_ms, batches_stored) VALUES (?, ?, ?, ?, 1) \
     ON CONFLICT (node_id) DO UPDATE SET \
     boot_id = COALESCE(agents.boot_id, excluded.boot_id), \
     first_seen_unix_ms = COALESCE(agents.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = max(COALESCE(agents.last_seen_unix_ms, excluded.last_seen_unix_ms), excluded.last_seen_unix_ms), \
     batches_stored = agents.batches_stored + 1";

/// Node, boot, received (twice), seq, the five loss counters.
const UPSERT_BOOT: &str = "INSERT INTO agent_boots (node_id, boot_id, first_seen_unix_ms, \
     last_seen_unix_ms, stored_through_seq, batches_stored, loss_ringbuf_dropped, loss_queue_dropped, \
     loss_spool_evicted_batches, loss_spool_evicted_flows, loss_rejected_batches) \
     VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?) \
     ON CONFLICT (node_id, boot_id) DO UPDATE SET \
     last_seen_unix_ms = max(agent_boots.last_seen_unix_ms, excluded.last_seen_unix_ms), \
     stored_through_seq = max(agent_boots.stored_through_seq, excluded.stored_through_seq), \
     batches_stored = agent_boots.batches_stored + 1, \
     loss_ringbuf_dropped = max(agent_boots.loss_ringbuf_dropped, excluded.loss_ringbuf_dropped), \
     loss_queue_dropped = max(agent_boots.loss_queue_dropped, excluded.loss_queue_dropped), \
     loss_spool_evicted_batches = max(agent_boots.loss_spool_evicted_batches, excluded.loss_spool_evicted_batches), \
     loss_spool_evicted_flows = max(agent_boots.loss_spool_evicted_flows, excluded.loss_spool_evicted_flows), \
     loss_rejected_batches = max(agent_boots.loss_rejected_batches, excluded.loss_rejected_batches)";
/// Arguments of [`UPSERT_AGENT`] and [`UPSERT_BOOT`] together.
const AGENT_AND_BOOT_ARGS: usize = 14;

/// The batch's block: one writer, one transaction and AUTOINCREMENT make its flows the
/// contiguous id range that ends at the last inserted rowid. Flow count, node, received,
/// identities, oldest and newest last_seen.
const INSERT_BLOCK: &str = "INSERT INTO flow_blocks (first_flow_id, last_flow_id, node_id, received_unix_ms, \
     identities, min_last_seen_unix_ms, max_last_seen_unix_ms) \
     VALUES (last_insert_rowid() - ? + 1, last_insert_rowid(), ?, ?, ?, ?, ?)";
const BLOCK_ARGS: usize = 6;

const UPSERT_EDGES: &str = " ON CONFLICT (src_identity, dst_identity, dst_port, protocol) DO UPDATE SET \
     first_seen_unix_ms = min(edges.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = max(edges.last_seen_unix_ms, excluded.last_seen_unix_ms), \
     connections_egress = min(edges.connections_egress, 9223372036854775807 - excluded.connections_egress) \
        + excluded.connections_egress, \
     bytes_egress = min(edges.bytes_egress, 9223372036854775807 - excluded.bytes_egress) + excluded.bytes_egress, \
     connections_ingress = min(edges.connections_ingress, 9223372036854775807 - excluded.connections_ingress) \
        + excluded.connections_ingress, \
     bytes_ingress = min(edges.bytes_ingress, 9223372036854775807 - excluded.bytes_ingress) + excluded.bytes_ingress";

const UPSERT_DNS: &str = " ON CONFLICT (node_id, netns_ino, name, addr) DO UPDATE SET \
     ttl_seconds = CASE WHEN excluded.last_seen_unix_ms >= dns_answers.last_seen_unix_ms \
        THEN excluded.ttl_seconds ELSE dns_answers.ttl_seconds END, \
     first_seen_unix_ms = min(dns_answers.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = max(dns_answers.last_seen_unix_ms, excluded.last_seen_unix_ms)";

// === statement texts ===

/// Every script text, built once per process. Indexed by class: `[i]` holds
/// `MIN_CLASS << i` rows.
struct Scripts {
    /// Agent and boot upserts, then the first flow chunk.
    flows_first: Vec<String>,
    /// Agent and boot upserts of a batch without flows.
    agent_and_boot: String,
    flows: Vec<String>,
    edges_first: Vec<String>,
    edges: Vec<String>,
    dns: Vec<String>,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let agent_and_boot = format!("{UPSERT_AGENT};\n{UPSERT_BOOT}");
        // OR ROLLBACK: a failed row aborts the whole batch anyway, and saying so lets
        // SQLite skip the statement journal it keeps to undo half a multi-row statement.
        let flows_insert = format!("INSERT OR ROLLBACK INTO flows ({FLOW_COLUMNS}) SELECT * FROM (VALUES ");
        let edges_insert = format!("INSERT INTO edges ({EDGE_COLUMNS}) SELECT * FROM (VALUES ");
        let dns_insert = format!("INSERT INTO dns_answers ({DNS_COLUMNS}) SELECT * FROM (VALUES ");
        let padded = |head: &str, rows: usize, cols: usize, tail: &str| {
            let mut s = String::with_capacity(head.len() + rows * (cols * 2 + 2) + tail.len() + 40);
            s.push_str(head);
            for r in 0..rows {
                s.push_str(if r == 0 { "(?" } else { ",(?" });
                for _ in 1..cols {
                    s.push_str(",?");
                }
                s.push(')');
            }
            s.push_str(") WHERE column1 IS NOT NULL");
            s.push_str(tail);
            s
        };
        let classes = |max: usize| (0..).map(|i| MIN_CLASS << i).take_while(move |&c| c <= max);
        Scripts {
            flows_first: classes(MAX_FLOW_ROWS)
                .map(|c| padded(&format!("{agent_and_boot};\n{flows_insert}"), c, FLOW_COLS, ""))
                .collect(),
            agent_and_boot,
            flows: classes(MAX_FLOW_ROWS).map(|c| padded(&flows_insert, c, FLOW_COLS, "")).collect(),
            edges_first: classes(MAX_EDGE_ROWS)
                .map(|c| padded(&format!("{INSERT_BLOCK};\n{edges_insert}"), c, EDGE_COLS, UPSERT_EDGES))
                .collect(),
            edges: classes(MAX_EDGE_ROWS).map(|c| padded(&edges_insert, c, EDGE_COLS, UPSERT_EDGES)).collect(),
            dns: classes(MAX_DNS_ROWS).map(|c| padded(&dns_insert, c, DNS_COLS, UPSERT_DNS)).collect(),
        }
    })
}

/// Index into a class table for a chunk of `rows` (1..=max) rows.
fn class_index(rows: usize) -> usize {
    let class = rows.next_power_of_two().max(MIN_CLASS);
    (class / MIN_CLASS).trailing_zeros() as usize
}

/// `n` rows in chunks of at most `max`: full chunks first, the (padded) rest last.
fn chunks(n: usize, max: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n.div_ceil(max)).map(move |i| i * max..((i + 1) * max).min(n))
}

// === writing ===

/// Writes everything of a new batch after its dedupe record, inside the caller's
/// transaction.
pub(crate) async fn write_batch(conn: &mut SqliteConnection, p: &PreparedBatch<'_>) -> Result<(), sqlx::Error> {
    let s = scripts();
    let f = &p.flows;
    let n = f.len();

    // Agent, boot and the first flow chunk.
    let mut flow_chunks = chunks(n, MAX_FLOW_ROWS);
    let mut args = SqliteArguments::default();
    let first = flow_chunks.next();
    args.reserve(AGENT_AND_BOOT_ARGS + first.as_ref().map_or(0, |r| r.len() * FLOW_COLS), 0);
    let (node, boot): (Arc<str>, Arc<str>) = (Arc::from(p.node_id), Arc::from(p.boot_id));
    for _ in 0..2 {
        add(&mut args, node.clone())?;
        add(&mut args, boot.clone())?;
        add(&mut args, p.received_unix_ms)?;
        add(&mut args, p.received_unix_ms)?;
    }
    add(&mut args, p.seq)?;
    for v in p.loss {
        add(&mut args, v)?;
    }
    let sql = match &first {
        Some(rows) => {
            push_flows(&mut args, f, rows.clone())?;
            s.flows_first[class_index(rows.len())].as_str()
        }
        None => s.agent_and_boot.as_str(),
    };
    run(conn, sql, args).await?;
    for rows in flow_chunks {
        let mut args = SqliteArguments::default();
        args.reserve(rows.len() * FLOW_COLS, 0);
        let sql = s.flows[class_index(rows.len())].as_str();
        push_flows(&mut args, f, rows)?;
        run(conn, sql, args).await?;
    }

    // The block, right after the last flow chunk, and the first edge chunk. A batch
    // without flows has neither.
    if n > 0 {
        let mut edge_chunks = chunks(p.edges.len(), MAX_EDGE_ROWS);
        let first = edge_chunks.next().unwrap_or(0..0);
        let mut args = SqliteArguments::default();
        args.reserve(BLOCK_ARGS + first.len() * EDGE_COLS, 0);
        add(&mut args, i64::try_from(n).unwrap_or(i64::MAX))?;
        add(&mut args, node.clone())?;
        add(&mut args, p.received_unix_ms)?;
        add(&mut args, identity_list(f))?;
        add(&mut args, f.last_seen_unix_ms.iter().copied().min().unwrap_or(0))?;
        add(&mut args, f.last_seen_unix_ms.iter().copied().max().unwrap_or(0))?;
        let sql = s.edges_first[class_index(first.len().max(1))].as_str();
        push_edges(&mut args, p, first)?;
        run(conn, sql, args).await?;
        for rows in edge_chunks {
            let mut args = SqliteArguments::default();
            args.reserve(rows.len() * EDGE_COLS, 0);
            let sql = s.edges[class_index(rows.len())].as_str();
            push_edges(&mut args, p, rows)?;
            run(conn, sql, args).await?;
        }
    }

    for rows in chunks(p.dns.len(), MAX_DNS_ROWS) {
        let mut args = SqliteArguments::default();
        args.reserve(rows.len() * DNS_COLS, 0);
        let sql = s.dns[class_index(rows.len())].as_str();
        for d in &p.dns[rows] {
            add(&mut args, node.clone())?;
            add(&mut args, d.netns_ino)?;
            add(&mut args, d.name.as_str())?;
            add(&mut args, d.addr.as_str())?;
            add(&mut args, d.ttl_seconds)?;
            add(&mut args, d.first_seen_unix_ms)?;
            add(&mut args, d.last_seen_unix_ms)?;
        }
        run(conn, sql, args).await?;
    }

    super::edge_http::write_sqlite(conn, &p.http).await
}

/// What a stored batch reports.
pub(crate) fn stored(p: &PreparedBatch<'_>) -> IngestOutcome {
    IngestOutcome::Stored { flows: p.flows.len() as u64, edges: p.edges.len() as u64 }
}

async fn run(conn: &mut SqliteConnection, sql: &'static str, args: SqliteArguments) -> Result<(), sqlx::Error> {
    sqlx::query_with(sql, args).execute(conn).await.map(drop)
}

/// Adds one argument (encoding the integers, text and blobs used here does not fail).
fn add<'q, T: sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    args: &mut SqliteArguments,
    v: T,
) -> Result<(), sqlx::Error> {
    args.add(v).map_err(sqlx::Error::Encode)
}

fn push_flows(args: &mut SqliteArguments, f: &FlowColumns, rows: std::ops::Range<usize>) -> Result<(), sqlx::Error> {
    for i in rows {
        add(args, f.src_identity[i])?;
        add(args, f.dst_identity[i])?;
        add(args, f.src_addr[i].as_slice())?;
        add(args, f.src_port[i])?;
        add(args, f.dst_addr[i].as_slice())?;
        add(args, f.dst_port[i])?;
        add(args, f.protocol[i])?;
        add(args, f.direction[i])?;
        add(args, f.netns_ino[i])?;
        add(args, f.cgroup_id[i])?;
        add(args, f.pid[i])?;
        add(args, f.comm[i].clone())?;
        add(args, f.connections[i])?;
        add(args, f.bytes_sent[i])?;
        add(args, f.bytes_received[i])?;
        add(args, f.packets[i])?;
        add(args, f.verdict[i])?;
        add(args, f.first_seen_unix_ms[i])?;
        add(args, f.last_seen_unix_ms[i])?;
    }
    Ok(())
}

fn push_edges(
    args: &mut SqliteArguments,
    p: &PreparedBatch<'_>,
    rows: std::ops::Range<usize>,
) -> Result<(), sqlx::Error> {
    for (k, a) in &p.edges[rows] {
        let [ce, be, ci, bi] = a.counters();
        add(args, i64::from(k.src.0))?;
        add(args, i64::from(k.dst.0))?;
        add(args, i32::from(k.dst_port))?;
        add(args, i32::from(k.protocol.number()))?;
        add(args, a.first_seen_unix_ms)?;
        add(args, a.last_seen_unix_ms)?;
        add(args, ce)?;
        add(args, be)?;
        add(args, ci)?;
        add(args, bi)?;
    }
    Ok(())
}

/// `flow_blocks.identities` of a batch: every identity on either end, as ',a,b,'.
pub(crate) fn identity_list(f: &FlowColumns) -> String {
    let mut ids: Vec<i64> = f.src_identity.iter().chain(&f.dst_identity).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut s = String::with_capacity(ids.len() * 7 + 1);
    s.push(',');
    for id in ids {
        let _ = write!(s, "{id},");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_classes_cover_every_row_once() {
        for n in [0, 1, 7, 8, 9, 1000, 1024, 1025, 5000] {
            let c: Vec<_> = chunks(n, MAX_FLOW_ROWS).collect();
            assert_eq!(c.iter().map(|r| r.len()).sum::<usize>(), n);
            assert!(c.windows(2).all(|w| w[0].end == w[1].start));
            for r in &c {
                let class = MIN_CLASS << class_index(r.len());
                assert!(class >= r.len() && class < 2 * r.len().max(MIN_CLASS), "{n}: {r:?} in {class}");
                assert!(class <= MAX_FLOW_ROWS);
            }
        }
    }

    #[test]
    fn statements_fit_sqlites_parameter_limit() {
        let s = scripts();
        assert_eq!(s.flows_first.len(), class_index(MAX_FLOW_ROWS) + 1);
        // Anonymous parameters only (see the module docs), as many as the arguments.
        for sql in s.flows_first.iter().chain(&s.edges_first).chain(&s.dns).chain([&s.agent_and_boot]) {
            assert!(!sql.contains('$') && !sql.contains("?1"), "{}", &sql[..80]);
        }
        assert_eq!(s.agent_and_boot.matches('?').count(), AGENT_AND_BOOT_ARGS);
        assert_eq!(INSERT_BLOCK.matches('?').count(), BLOCK_ARGS);
        assert_eq!(s.flows_first[0].matches('?').count(), AGENT_AND_BOOT_ARGS + MIN_CLASS * FLOW_COLS);
    }
}
