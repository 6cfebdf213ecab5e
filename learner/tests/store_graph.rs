//! The service graph's edge reads (`Store::graph_edges`) through a long-lived
//! [`EdgeMirror`], on SQLite and PostgreSQL (see `tests/common`).
//!
//! On SQLite the mirror keeps every edge in memory and, before each read, brings it up to
//! date from the flows written since its last read, or reads every edge again when some
//! of those flows are already pruned or there are too many of them. Whatever it did, its
//! answer must be exactly what a fresh read of the table answers and what the ingested
//! flows add up to (a model kept here), for every range and scope — after ingests that
//! add and update edges, duplicates, prunes of flows it had seen and of flows it had not,
//! a gap too large to catch up on, another store handle (a second learner process)
//! writing, and a restart. On PostgreSQL every read goes to the table; the same checks
//! hold. A concurrent case checks that a read during ingests answers at least every batch
//! that was committed before it began and nothing that was not yet sent.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bulkhead_learner::store::{
    Backend, EdgeMirror, GraphEdgeQuery, GraphEdges, IngestBatch, IngestOutcome, ResolvedFlow, Store,
};
use bulkhead_model::{Direction, Edge, EdgeKey, Flow, Identity, Protocol, Verdict};
use common::{Fixture, batch, labels, resolved, store_cases};

store_cases!(mirror_answers_like_a_fresh_read_after_every_write, mirror_stays_within_what_was_committed_during_ingest,);

// === the model ===

/// What the stored flows add up to per edge: each side's sums (saturated like the store's
/// counters), first and last seen.
#[derive(Debug, Default, Clone)]
struct Model {
    edges: HashMap<EdgeKey, Sides>,
}

#[derive(Debug, Clone, Copy)]
struct Sides {
    first: i64,
    last: i64,
    /// connections egress, bytes egress, connections ingress, bytes ingress.
    sums: [u128; 4],
}

impl Model {
    fn absorb(&mut self, b: &IngestBatch) {
        for rf in &b.flows {
            let f = &rf.flow;
            let key =
                EdgeKey { src: rf.src_identity, dst: rf.dst_identity, dst_port: f.dst_port, protocol: f.protocol };
            let s = self.edges.entry(key).or_insert(Sides {
                first: f.first_seen_unix_ms,
                last: f.last_seen_unix_ms,
                sums: [0; 4],
            });
            s.first = s.first.min(f.first_seen_unix_ms);
            s.last = s.last.max(f.last_seen_unix_ms);
            let bytes = u128::from(f.bytes_sent) + u128::from(f.bytes_received);
            let side = if f.direction == Direction::Egress { 0 } else { 2 };
            s.sums[side] += u128::from(f.connections);
            s.sums[side + 1] += bytes;
        }
    }

    /// The edges `q` selects, as the store reports them: each counter the larger side,
    /// saturated at i64::MAX; sorted by key.
    fn answer(&self, q: &GraphEdgeQuery) -> Vec<Edge> {
        let cap = |v: u128| u64::try_from(v.min(i64::MAX as u128)).expect("capped");
        let (since, until) = (q.since_unix_ms.unwrap_or(i64::MIN), q.until_unix_ms.unwrap_or(i64::MAX));
        let mut out: Vec<Edge> = self
            .edges
            .iter()
            .filter(|(k, s)| {
                s.last >= since
                    && s.first <= until
                    && q.scope.as_ref().is_none_or(|ids| ids.contains(&k.src) || ids.contains(&k.dst))
            })
            .map(|(k, s)| Edge {
                key: *k,
                first_seen_unix_ms: s.first,
                last_seen_unix_ms: s.last,
                connections: cap(s.sums[0].max(s.sums[2])),
                bytes: cap(s.sums[1].max(s.sums[3])),
            })
            .collect();
        out.sort_by_key(|e| e.key);
        out
    }
}

// === builders ===

fn flow(
    direction: Direction,
    port: u16,
    protocol: Protocol,
    connections: u64,
    bytes: u64,
    first: i64,
    last: i64,
) -> Flow {
    Flow {
        src_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        src_port: 40000,
        dst_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        dst_port: port,
        protocol,
        direction,
        netns_ino: 4026531840,
        cgroup_id: 1,
        pid: 1,
        comm: "c".into(),
        connections,
        bytes_sent: bytes,
        bytes_received: bytes / 2,
        packets: 1,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: first,
        last_seen_unix_ms: last,
        http: Default::default(),
    }
}

async fn workloads(store: &Store, n: usize) -> Vec<Identity> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let app = format!("app-{i}");
        let ns = format!("ns-{}", i % 3);
        ids.push(
            store
                .ensure_identity(&labels(&[("app", &app), ("io.kubernetes.pod.namespace", &ns)]))
                .await
                .expect("identity"),
        );
    }
    ids
}

/// A small deterministic generator (xorshift*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[self.below(of.len() as u64) as usize]
    }
}

/// `n` random flows between `ids` on a few ports and both protocols, seen within
/// `[from, from + span)`.
fn random_flows(rng: &mut Rng, ids: &[Identity], n: usize, from: i64, span: i64) -> Vec<ResolvedFlow> {
    (0..n)
        .map(|_| {
            let first = from + rng.below(span as u64) as i64;
            let last = first + rng.below(1_000) as i64;
            let direction = if rng.below(2) == 0 { Direction::Egress } else { Direction::Ingress };
            let protocol = if rng.below(4) == 0 { Protocol::Udp } else { Protocol::Tcp };
            let port = rng.pick(&[53, 80, 443, 5432, 8080]);
            let f = flow(direction, port, protocol, 1 + rng.below(5), rng.below(100_000), first, last);
            resolved(f, rng.pick(ids), rng.pick(ids))
        })
        .collect()
}

// === checks ===

fn sorted(edges: &GraphEdges) -> Vec<Edge> {
    let mut v = edges.to_vec();
    v.sort_by_key(|e| e.key);
    v
}

/// The queries every check asks: everything, past and recent ranges, windows, scopes
/// (one identity, several, none).
fn queries(ids: &[Identity]) -> Vec<GraphEdgeQuery> {
    let range = |since: Option<i64>, until: Option<i64>| GraphEdgeQuery {
        since_unix_ms: since,
        until_unix_ms: until,
        scope: None,
    };
    let mut qs = vec![
        GraphEdgeQuery::default(),
        range(Some(900_000), None),
        range(None, Some(100_000)),
        range(Some(200_000), Some(300_000)),
        range(Some(50_000), Some(50_000)),
        range(Some(i64::MAX), None),
    ];
    for scope in [vec![ids[0]], vec![ids[1], ids[ids.len() - 1]], vec![]] {
        qs.push(GraphEdgeQuery { scope: Some(scope.clone()), ..Default::default() });
        qs.push(GraphEdgeQuery { since_unix_ms: Some(200_000), until_unix_ms: Some(700_000), scope: Some(scope) });
    }
    qs
}

/// Every query through `mirror` equals a fresh read (a new mirror: every edge read from
/// the table) and the model.
async fn check(store: &Store, mirror: &EdgeMirror, model: &Model, ids: &[Identity], what: &str) {
    for q in queries(ids) {
        let mirrored = sorted(&store.graph_edges(&q, mirror).await.expect("mirrored read"));
        let fresh = sorted(&store.graph_edges(&q, &EdgeMirror::default()).await.expect("fresh read"));
        let expected = model.answer(&q);
        assert_eq!(fresh, expected, "{what}: a fresh read differs from the flows stored, {q:?}");
        assert_eq!(mirrored, expected, "{what}: the mirror differs from the flows stored, {q:?}");
    }
}

/// The name of the set `mirror` answers every edge from (SQLite; changes only when every
/// edge was read again), `None` on PostgreSQL.
async fn set_name(store: &Store, mirror: &EdgeMirror) -> Option<u64> {
    store.graph_edges(&GraphEdgeQuery::default(), mirror).await.expect("all edges").list_name()
}

async fn stored(store: &Store, model: &mut Model, b: IngestBatch) {
    let outcome = store.ingest(&b).await.expect("ingest");
    assert!(matches!(outcome, IngestOutcome::Stored { .. }), "{outcome:?}");
    model.absorb(&b);
}

// === cases ===

async fn mirror_answers_like_a_fresh_read_after_every_write(f: &Fixture) {
    let store = &f.store;
    let sqlite = store.backend() == Backend::Sqlite;
    let ids = workloads(store, 8).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let mirror = EdgeMirror::default();
    let mut model = Model::default();
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };

    check(store, &mirror, &model, &ids, "empty").await;
    assert!(store.graph_edges(&GraphEdgeQuery::default(), &mirror).await.expect("edges").is_empty());

    let tcp = Protocol::Tcp;
    let x = batch(
        "node-1",
        next(),
        vec![
            resolved(flow(Direction::Egress, 80, tcp, 2, 100, 500_000, 510_000), a, b),
            resolved(flow(Direction::Egress, 443, tcp, 1, 10, 520_000, 530_000), a, c),
        ],
    );
    stored(store, &mut model, x).await;
    check(store, &mirror, &model, &ids, "first batch").await;
    let name = set_name(store, &mirror).await;
    assert_eq!(name.is_some(), sqlite, "SQLite answers every edge from the mirror's set");

    // The server's side reports the same connections (max, not sum), then more; a new
    // edge; an edge seen only in the past (first and last seen before everything else).
    let x = batch(
        "node-2",
        next(),
        vec![
            resolved(flow(Direction::Ingress, 80, tcp, 1, 100, 500_100, 509_000), a, b),
            resolved(flow(Direction::Ingress, 80, tcp, 3, 1_000, 600_000, 950_000), a, b),
        ],
    );
    stored(store, &mut model, x).await;
    let x = batch(
        "node-1",
        next(),
        vec![
            resolved(flow(Direction::Egress, 22, tcp, 1, 5, 940_000, 960_000), c, a),
            resolved(flow(Direction::Egress, 53, Protocol::Udp, 4, 400, 40_000, 60_000), b, c),
        ],
    );
    stored(store, &mut model, x.clone()).await;
    check(store, &mirror, &model, &ids, "updates, a new edge, a past edge").await;
    assert_eq!(set_name(store, &mirror).await, name, "caught up from the new flows, not read again");

    // A retried batch changes nothing; nothing new keeps the very same set.
    assert!(matches!(store.ingest(&x).await.expect("retry"), IngestOutcome::Duplicate));
    check(store, &mirror, &model, &ids, "duplicate").await;
    if sqlite {
        let (one, two) = (
            store.graph_edges(&GraphEdgeQuery::default(), &mirror).await.expect("edges"),
            store.graph_edges(&GraphEdgeQuery::default(), &mirror).await.expect("edges"),
        );
        let (GraphEdges::All(one), GraphEdges::All(two)) = (one, two) else { panic!("every edge is shared") };
        assert!(Arc::ptr_eq(&one, &two), "nothing written: the same set, not a copy");
    }

    // A batch larger than one edge statement (1024 edges), counters that saturate.
    let mut rng = Rng(0x5eed_0001);
    let mut flows = random_flows(&mut rng, &ids, 3_000, 100_000, 800_000);
    flows.push(resolved(flow(Direction::Egress, 9, tcp, u64::MAX, u64::MAX, 700_000, 700_000), a, b));
    flows.push(resolved(flow(Direction::Egress, 9, tcp, u64::MAX, u64::MAX, 700_001, 700_001), a, b));
    stored(store, &mut model, batch("node-3", next(), flows)).await;
    check(store, &mirror, &model, &ids, "a large batch").await;
    assert_eq!(set_name(store, &mirror).await, name, "caught up");

    // Pruning flows the mirror has seen changes no edge.
    assert!(store.prune_flows(400_000).await.expect("prune") > 0);
    check(store, &mirror, &model, &ids, "pruned seen flows").await;
    assert_eq!(set_name(store, &mirror).await, name, "nothing written since");

    // A late batch of old flows, pruned before the mirror saw it: its edge changes (an
    // edge's first_seen moved back, a new edge) are only in the edges table now.
    let x = batch(
        "node-4",
        next(),
        vec![
            resolved(flow(Direction::Egress, 80, tcp, 7, 70, 10_000, 20_000), a, b),
            resolved(flow(Direction::Egress, 8443, tcp, 1, 1, 10_000, 30_000), c, b),
        ],
    );
    stored(store, &mut model, x).await;
    assert_eq!(store.prune_flows(400_000).await.expect("prune"), 2);
    check(store, &mirror, &model, &ids, "pruned before seen").await;
    let renamed = set_name(store, &mirror).await;
    if sqlite {
        assert_ne!(renamed, name, "every edge read again");
    }

    // Partly pruned: one flow of a batch is gone, the other is still there.
    let x = batch(
        "node-4",
        next(),
        vec![
            resolved(flow(Direction::Egress, 80, tcp, 1, 1, 15_000, 15_000), b, a),
            resolved(flow(Direction::Egress, 80, tcp, 1, 1, 15_000, 990_000), c, c),
        ],
    );
    stored(store, &mut model, x).await;
    assert_eq!(store.prune_flows(400_000).await.expect("prune"), 1);
    check(store, &mirror, &model, &ids, "partly pruned before seen").await;
    let name = set_name(store, &mirror).await;
    if sqlite {
        assert_ne!(name, renamed, "every edge read again");
    }

    // More new flows than are worth catching up on one by one: read again.
    let flows = random_flows(&mut rng, &ids, 5_000, 600_000, 300_000);
    stored(store, &mut model, batch("node-3", next(), flows)).await;
    check(store, &mirror, &model, &ids, "a large gap").await;
    if sqlite {
        assert_ne!(set_name(store, &mirror).await, name, "every edge read again");
    }
    let name = set_name(store, &mirror).await;

    // Another handle on the same database writes (a second process, a restarted
    // learner): this mirror catches up all the same.
    let other = f.reopen().await;
    for i in 0..5 {
        let flows = random_flows(&mut rng, &ids, 200 + i * 50, 0, 1_000_000);
        stored(&other, &mut model, batch("node-5", next(), flows)).await;
        check(store, &mirror, &model, &ids, "written by another handle").await;
    }
    assert_eq!(set_name(store, &mirror).await, name, "caught up");

    // A restart: a new store handle and a new mirror start from the table.
    let restarted = f.reopen().await;
    let after_restart = EdgeMirror::default();
    check(&restarted, &after_restart, &model, &ids, "after a restart").await;
    stored(&restarted, &mut model, batch("node-6", next(), random_flows(&mut rng, &ids, 100, 0, 1_000_000))).await;
    check(&restarted, &after_restart, &model, &ids, "after a restart and a batch").await;
    check(store, &mirror, &model, &ids, "the first handle after the restart's batch").await;
    other.close().await;
    restarted.close().await;
}

/// Reads during ingest: each answer holds, per edge, at least what the batches committed
/// before the read began add up to and at most what the batches begun before it ended
/// add up to (edge values only grow: counters up, first seen down, last seen up), and no
/// edge outside the latter. Prunes run in between (they change no edge, but make the
/// mirror read everything again now and then).
async fn mirror_stays_within_what_was_committed_during_ingest(f: &Fixture) {
    const BATCHES: usize = 40;
    let store = f.store.clone();
    let ids = workloads(&store, 6).await;
    let mut rng = Rng(0x5eed_0002);
    let batches: Vec<IngestBatch> = (0..BATCHES)
        .map(|i| {
            // Now and then a batch of old flows (pruned soon after) or a large one.
            let (n, from) = match i % 7 {
                3 => (40, 0),
                5 => (1_500, 500_000),
                _ => (1 + rng.below(200) as usize, 500_000 + (i as i64) * 10_000),
            };
            batch("node-1", i as u64 + 1, random_flows(&mut rng, &ids, n, from, 100_000))
        })
        .collect();
    // Prefix models: `models[k]` is what the first k batches add up to.
    let mut models = vec![Model::default()];
    for b in &batches {
        let mut m = models.last().expect("a model").clone();
        m.absorb(b);
        models.push(m);
    }
    let (begun, committed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let writer = {
        let (store, begun, committed) = (store.clone(), begun.clone(), committed.clone());
        tokio::spawn(async move {
            for (i, b) in batches.iter().enumerate() {
                begun.store(i + 1, Ordering::SeqCst);
                store.ingest(b).await.expect("ingest");
                committed.store(i + 1, Ordering::SeqCst);
                if i % 7 == 3 {
                    store.prune_flows(200_000).await.expect("prune");
                }
            }
        })
    };
    let mirror = EdgeMirror::default();
    let all = GraphEdgeQuery::default();
    let mut reads = 0;
    loop {
        let done = writer.is_finished();
        let lo = committed.load(Ordering::SeqCst);
        let edges = store.graph_edges(&all, &mirror).await.expect("edges");
        let hi = begun.load(Ordering::SeqCst);
        let (floor, ceiling): (HashMap<EdgeKey, Edge>, HashMap<EdgeKey, Edge>) = (
            models[lo].answer(&all).into_iter().map(|e| (e.key, e)).collect(),
            models[hi].answer(&all).into_iter().map(|e| (e.key, e)).collect(),
        );
        let got: HashMap<EdgeKey, &Edge> = edges.iter().map(|e| (e.key, e)).collect();
        assert_eq!(got.len(), edges.len(), "each edge once");
        for (k, low) in &floor {
            let e = got.get(k).unwrap_or_else(|| panic!("read {reads}: {k:?} committed before the read, missing"));
            assert!(
                e.connections >= low.connections
                    && e.bytes >= low.bytes
                    && e.first_seen_unix_ms <= low.first_seen_unix_ms
                    && e.last_seen_unix_ms >= low.last_seen_unix_ms,
                "read {reads}: {e:?} older than batch {lo} made it ({low:?})"
            );
        }
        for e in got.values() {
            let high = ceiling.get(&e.key).unwrap_or_else(|| panic!("read {reads}: {e:?} was never sent"));
            assert!(
                e.connections <= high.connections
                    && e.bytes <= high.bytes
                    && e.first_seen_unix_ms >= high.first_seen_unix_ms
                    && e.last_seen_unix_ms <= high.last_seen_unix_ms,
                "read {reads}: {e:?} beyond batch {hi} ({high:?})"
            );
        }
        reads += 1;
        if done {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    assert!(reads > 1, "reads ran during ingest");
    check(&store, &mirror, &models[BATCHES], &ids, "after the concurrent ingest").await;
}
