//! FlowIngest over real gRPC against an in-process learner: good batches are stored
//! once, and every kind of bad input gets a clear answer without losing what was
//! already stored.

mod common;

use std::time::Duration;

use bulkhead_learner::grpc::ingest::Enrollment;
use bulkhead_learner::server::{self, Running, ServerConfig};
use bulkhead_learner::store::{EdgeQuery, FlowQuery};
use bulkhead_proto::v1::{self, flow_ingest_client::FlowIngestClient, ingest_request, ingest_response};
use bytes::{Buf, BufMut};
use common::curl_flow;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status, Streaming};

const NODE: &str = "node-1";

const INVENTORY: &str = r#"
workloads:
  - name: client
    labels: {app: client, quote: "it's \"quoted\"; DROP TABLE edges;--", emoji: "🚀"}
    match: {netns: [ns-client]}
  - name: server
    labels: {app: server}
    match: {netns: [ns-server]}
"#;

async fn learner(db_url: String, enrollment: Enrollment, max_batch_bytes: usize) -> (Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = dir.path().join("inventory.yaml");
    std::fs::write(&inv, INVENTORY).expect("inventory");
    let running = server::start(ServerConfig {
        db_url,
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory: Some(inv),
        enrollment,
        max_batch_bytes,
        flow_retention: Duration::from_secs(3600),
        policy: Default::default(),
        auth: Default::default(),
        tls: None,
    })
    .await
    .expect("learner starts");
    (running, dir)
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("learner.db").display())
}

fn endpoints() -> Vec<v1::EndpointFact> {
    let ep = |ino, name: &str, addr: [u8; 4]| v1::EndpointFact {
        netns_ino: ino,
        netns_name: name.into(),
        addresses: vec![v1::InterfaceAddress { interface: "eth0".into(), addr: addr.to_vec(), prefix_len: 24 }],
        cgroups: vec![],
        host: false,
    };
    vec![ep(100, "ns-client", [10, 9, 0, 1]), ep(200, "ns-server", [10, 9, 0, 2])]
}

fn batch(seq: u64, flows: Vec<v1::Flow>) -> v1::FlowBatch {
    v1::FlowBatch {
        node_id: NODE.into(),
        boot_id: "boot-a".into(),
        seq,
        created_unix_ms: 5_000,
        flows,
        endpoints: if seq == 1 { endpoints() } else { vec![] },
        endpoints_snapshot: seq == 1,
        ..Default::default()
    }
}

/// One agent stream: send requests, read responses.
struct Agent {
    tx: mpsc::Sender<v1::IngestRequest>,
    rx: Streaming<v1::IngestResponse>,
    welcome: v1::Welcome,
}

impl Agent {
    async fn connect(r: &Running, node: &str) -> Result<Agent, Status> {
        let mut client = FlowIngestClient::connect(format!("http://{}", r.grpc_addr)).await.expect("connect");
        client = client.max_encoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(8);
        let hello = v1::Hello { node_id: node.into(), boot_id: "boot-a".into(), agent_version: "test".into() };
        tx.send(v1::IngestRequest { msg: Some(ingest_request::Msg::Hello(hello)) }).await.expect("send hello");
        let mut rx = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = match rx.next().await {
            Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Welcome(w)) })) => w,
            Some(Err(s)) => return Err(s),
            other => panic!("expected Welcome, got {other:?}"),
        };
        Ok(Agent { tx, rx, welcome })
    }

    async fn send(&mut self, b: v1::FlowBatch) -> Result<v1::BatchAck, Status> {
        self.tx.send(v1::IngestRequest { msg: Some(ingest_request::Msg::Batch(b)) }).await.expect("send batch");
        match self.rx.next().await {
            Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Ack(a)) })) => Ok(a),
            Some(Err(s)) => Err(s),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}

async fn edge_connections(r: &Running) -> Vec<u64> {
    r.store.edges(&EdgeQuery::default()).await.expect("edges").into_iter().map(|e| e.edge.connections).collect()
}

fn status(a: &v1::BatchAck) -> v1::AckStatus {
    v1::AckStatus::try_from(a.status).expect("known status")
}

async fn stores_once_and_dedupes(db_url: String) {
    let (r, _dir) = learner(db_url, Enrollment::Open, 4 << 20).await;
    let mut agent = Agent::connect(&r, NODE).await.expect("stream");
    assert_eq!(agent.welcome.stored_through_seq, 0);
    let ack = agent.send(batch(1, vec![curl_flow(3)])).await.expect("ack");
    assert_eq!((status(&ack), ack.flows_stored), (v1::AckStatus::Stored, 1));
    let ack = agent.send(batch(1, vec![curl_flow(3)])).await.expect("ack");
    assert_eq!(status(&ack), v1::AckStatus::Duplicate);
    assert_eq!(edge_connections(&r).await, vec![3]);

    // A reconnecting agent learns what is already stored.
    drop(agent);
    let mut agent = Agent::connect(&r, NODE).await.expect("stream");
    assert_eq!(agent.welcome.stored_through_seq, 1);
    let ack = agent.send(batch(2, vec![curl_flow(2)])).await.expect("ack");
    assert_eq!(status(&ack), v1::AckStatus::Stored);
    assert_eq!(edge_connections(&r).await, vec![5]);

    // Identities carry the hostile labels verbatim.
    let ids = r.store.identities().await.expect("identities");
    let client = ids.iter().find(|i| i.labels.get("app") == Some("client")).expect("client identity");
    assert_eq!(client.labels.get("quote"), Some("it's \"quoted\"; DROP TABLE edges;--"));
    assert_eq!(client.labels.get("emoji"), Some("🚀"));
}

#[tokio::test]
async fn stores_once_and_dedupes_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    stores_once_and_dedupes(sqlite_url(&dir)).await;
}

#[tokio::test]
async fn stores_once_and_dedupes_on_postgres() {
    let db = bulkhead_testkit::postgres::fresh_database().await;
    stores_once_and_dedupes(db.url().to_owned()).await;
}

fn now_ms() -> i64 {
    bulkhead_learner::grpc::ingest::unix_ms()
}

/// A node whose clock is an hour behind (then one two minutes ahead): its flows land at
/// the learner's time, not an hour in the past, and the node's skew is on record.
async fn skewed_clocks_are_measured_and_corrected(db_url: String) {
    const HOUR: i64 = 3_600_000;
    let (r, _dir) = learner(db_url, Enrollment::Open, 4 << 20).await;
    let mut agent = Agent::connect(&r, NODE).await.expect("stream");
    let node_now = now_ms() - HOUR;
    let skewed = v1::Flow { first_seen_unix_ms: node_now - 500, last_seen_unix_ms: node_now, ..curl_flow(1) };
    let b = v1::FlowBatch { sent_unix_ms: node_now, ..batch(1, vec![skewed]) };
    assert_eq!(status(&agent.send(b).await.expect("ack")), v1::AckStatus::Stored);

    let flows = r.store.flows(&FlowQuery { limit: 100, ..Default::default() }).await.expect("flows");
    let stored = &flows.first().expect("one flow").flow;
    let learner_now = now_ms();
    assert!(
        (learner_now - stored.last_seen_unix_ms).abs() < 10_000,
        "last_seen {} is on the learner's clock ({learner_now})",
        stored.last_seen_unix_ms
    );
    assert_eq!(stored.last_seen_unix_ms - stored.first_seen_unix_ms, 500, "durations are kept");
    let agents = r.store.agents().await.expect("agents");
    let skew = agents.iter().find(|a| a.node_id == NODE).and_then(|a| a.clock_skew_ms).expect("skew recorded");
    assert!((HOUR..HOUR + 10_000).contains(&skew), "skew {skew}");

    // A clock within the tolerance is taken as it is (a new stream measures anew).
    drop(agent);
    let mut agent = Agent::connect(&r, NODE).await.expect("stream");
    let exact = v1::Flow { first_seen_unix_ms: 1_000, last_seen_unix_ms: 2_000, ..curl_flow(1) };
    let b = v1::FlowBatch { sent_unix_ms: now_ms(), ..batch(2, vec![exact]) };
    assert_eq!(status(&agent.send(b).await.expect("ack")), v1::AckStatus::Stored);
    let flows = r.store.flows(&FlowQuery { limit: 100, ..Default::default() }).await.expect("flows");
    assert!(flows.iter().any(|f| f.flow.last_seen_unix_ms == 2_000), "untouched times: {flows:?}");
    let agents = r.store.agents().await.expect("agents");
    let skew = agents.iter().find(|a| a.node_id == NODE).and_then(|a| a.clock_skew_ms).expect("skew recorded");
    assert!(skew.abs() < 10_000, "re-measured skew {skew}");

    // Ahead by two minutes: corrected backwards.
    drop(agent);
    let mut agent = Agent::connect(&r, NODE).await.expect("stream");
    let node_now = now_ms() + 120_000;
    let ahead = v1::Flow { first_seen_unix_ms: node_now, last_seen_unix_ms: node_now, dst_port: 8443, ..curl_flow(1) };
    let b = v1::FlowBatch { sent_unix_ms: node_now, ..batch(3, vec![ahead]) };
    assert_eq!(status(&agent.send(b).await.expect("ack")), v1::AckStatus::Stored);
    let flows = r.store.flows(&FlowQuery { limit: 100, ..Default::default() }).await.expect("flows");
    let f = flows.iter().find(|f| f.flow.dst_port == 8443).expect("the third flow");
    assert!(f.flow.last_seen_unix_ms <= now_ms(), "not in the future: {}", f.flow.last_seen_unix_ms);
}

#[tokio::test]
async fn skewed_clocks_are_measured_and_corrected_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    skewed_clocks_are_measured_and_corrected(sqlite_url(&dir)).await;
}

#[tokio::test]
async fn skewed_clocks_are_measured_and_corrected_on_postgres() {
    let db = bulkhead_testkit::postgres::fresh_database().await;
    skewed_clocks_are_measured_and_corrected(db.url().to_owned()).await;
}

#[tokio::test]
async fn invalid_batches_are_rejected_by_name_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, _d) = learner(sqlite_url(&dir), Enrollment::Open, 4 << 20).await;
    let mut agent = Agent::connect(&r, NODE).await.expect("stream");
    assert_eq!(status(&agent.send(batch(1, vec![curl_flow(1)])).await.expect("ack")), v1::AckStatus::Stored);

    let bad_addr = v1::Flow { dst_addr: vec![1, 2, 3], ..curl_flow(1) };
    let ack = agent.send(batch(2, vec![curl_flow(1), bad_addr])).await.expect("ack");
    assert_eq!(status(&ack), v1::AckStatus::Rejected);
    assert!(ack.error.contains("flows[1]: dst_addr has 3 bytes"), "{}", ack.error);

    let other_node = v1::FlowBatch { node_id: "someone-else".into(), ..batch(3, vec![curl_flow(1)]) };
    let ack = agent.send(other_node).await.expect("ack");
    assert_eq!(status(&ack), v1::AckStatus::Rejected);
    assert!(ack.error.contains("belongs to \"node-1\""), "{}", ack.error);

    let zero_seq = batch(0, vec![curl_flow(1)]);
    assert!(agent.send(zero_seq).await.expect("ack").error.contains("seq must be at least 1"));

    // Nothing of the rejected batches was stored; the stream still works.
    assert_eq!(edge_connections(&r).await, vec![1]);
    assert_eq!(status(&agent.send(batch(4, vec![curl_flow(1)])).await.expect("ack")), v1::AckStatus::Stored);
    assert_eq!(edge_connections(&r).await, vec![2]);
}

#[tokio::test]
async fn unknown_nodes_are_refused_when_enrollment_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, _d) = learner(sqlite_url(&dir), Enrollment::Closed, 4 << 20).await;
    let err = Agent::connect(&r, "intruder").await.err().expect("refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("bulkhead-learner node add intruder"), "{}", err.message());
    assert!(r.store.agents().await.expect("agents").iter().all(|a| a.node_id != "intruder"));

    r.store.register_agent(NODE, 1).await.expect("register");
    let mut agent = Agent::connect(&r, NODE).await.expect("registered node streams");
    assert_eq!(status(&agent.send(batch(1, vec![curl_flow(1)])).await.expect("ack")), v1::AckStatus::Stored);
}

#[tokio::test]
async fn oversized_batch_is_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, _d) = learner(sqlite_url(&dir), Enrollment::Open, 64 << 10).await;
    let mut agent = Agent::connect(&r, NODE).await.expect("stream");
    assert_eq!(agent.welcome.max_batch_bytes, 64 << 10);
    assert_eq!(status(&agent.send(batch(1, vec![curl_flow(1)])).await.expect("ack")), v1::AckStatus::Stored);

    let huge = batch(2, vec![curl_flow(1); 2000]);
    assert!(huge.encoded_len() > 64 << 10);
    let err = agent.send(huge).await.expect_err("refused");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("message length too large"), "{}", err.message());
    assert_eq!(edge_connections(&r).await, vec![1]);

    let mut agent = Agent::connect(&r, NODE).await.expect("new stream after refusal");
    assert_eq!(status(&agent.send(batch(2, vec![curl_flow(1)])).await.expect("ack")), v1::AckStatus::Stored);
    assert_eq!(edge_connections(&r).await, vec![2]);
}

#[tokio::test]
async fn a_stream_must_start_with_hello() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, _d) = learner(sqlite_url(&dir), Enrollment::Open, 4 << 20).await;
    let mut client = FlowIngestClient::connect(format!("http://{}", r.grpc_addr)).await.expect("connect");
    let first = v1::IngestRequest { msg: Some(ingest_request::Msg::Batch(batch(1, vec![curl_flow(1)]))) };
    let err = client.ingest(tokio_stream::iter(vec![first])).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("must be a Hello"), "{}", err.message());
    assert!(edge_connections(&r).await.is_empty());
}

/// Bytes as they are: lets the test put garbage on the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn malformed_protobuf_ends_the_stream_with_a_clear_error_and_keeps_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (r, _d) = learner(sqlite_url(&dir), Enrollment::Open, 4 << 20).await;
    let mut agent = Agent::connect(&r, NODE).await.expect("stream");
    assert_eq!(status(&agent.send(batch(1, vec![curl_flow(4)])).await.expect("ack")), v1::AckStatus::Stored);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", r.grpc_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let hello = v1::IngestRequest {
        msg: Some(ingest_request::Msg::Hello(v1::Hello {
            node_id: NODE.into(),
            boot_id: "boot-b".into(),
            agent_version: "x".into(),
        })),
    }
    .encode_to_vec();
    // A length-delimited field whose length runs past the end of the message.
    let garbage = vec![0x12, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02];
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/bulkhead.v1.FlowIngest/Ingest");
    let resp = grpc
        .streaming(tonic::Request::new(tokio_stream::iter(vec![hello, garbage])), path, RawCodec)
        .await
        .expect("stream opens");
    let mut inbound = resp.into_inner();
    let welcome = inbound.next().await.expect("welcome").expect("welcome ok");
    assert!(v1::IngestResponse::decode(welcome.as_slice()).is_ok());
    let err = inbound.next().await.expect("an answer to the garbage").expect_err("decode error");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().to_lowercase().contains("decode"), "{}", err.message());

    // Nothing stored was lost, and the learner still serves.
    assert_eq!(edge_connections(&r).await, vec![4]);
    let mut agent = Agent::connect(&r, NODE).await.expect("still serving");
    assert_eq!(status(&agent.send(batch(2, vec![curl_flow(1)])).await.expect("ack")), v1::AckStatus::Stored);
    assert_eq!(edge_connections(&r).await, vec![5]);
}
