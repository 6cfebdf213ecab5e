//! The enforcer agent: loads (or adopts) the datapath, gives it to the one thread
//! that owns the maps, and keeps a `PolicyStream` to the learner — Hello with the
//! version the kernel enforces, every snapshot applied and acked (or rejected with
//! the reason), verdict reports every `--report-interval`.
//!
//! The learner being away changes nothing in the kernel: the last applied policy
//! stays, verdict events queue up (bounded, overflow counted), and on reconnect the
//! Hello's applied version lets the learner resend only what is newer.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::Context as _;
use bulkhead_abi::enforcer::{FAIL_CLOSED, FAIL_OPEN};
use bulkhead_enforcer::applied::AppliedFile;
use bulkhead_enforcer::datapath::{Datapath, DatapathOptions};
use bulkhead_enforcer::metrics::{self, Metrics};
use bulkhead_enforcer::owner::{MapOwner, Outcome, Rejection};
use bulkhead_enforcer::render::Capacity;
use bulkhead_model::{EnforcerHello, EnforcerMessage, PolicyAck, PolicyAckStatus, PolicyUpdate, VerdictReport};
use bulkhead_proto::tls::AgentTransport;
use bulkhead_proto::v1::{self, policy_stream_client::PolicyStreamClient};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::{Args, FailMode};

/// Largest snapshot accepted from the learner (100k rules are about 3 MiB).
const MAX_SNAPSHOT_BYTES: usize = 256 << 20;
/// How often the kernel's counters are copied into the metrics.
const METRICS_EVERY: Duration = Duration::from_secs(1);
/// How often managed network namespaces are checked for new interfaces.
const NETNS_REFRESH: Duration = Duration::from_secs(5);
/// How long a resynchronizing enforcer waits for the learner to close its side.
const RESYNC_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Most events per report message (keeps each well under the learner's 4 MiB limit).
const MAX_EVENTS_PER_REPORT: usize = 10_000;

pub async fn run(args: Args, transport: AgentTransport) -> anyhow::Result<()> {
    let node_id = match &args.node_id {
        Some(n) => n.clone(),
        None => {
            nix::unistd::gethostname().context("reading the hostname for --node-id")?.to_string_lossy().into_owned()
        }
    };
    let boot_id = uuid::Uuid::new_v4().to_string();
    tracing::info!(node = %node_id, boot = %boot_id, learner = %args.learner, instance = %args.instance, "Starting enforcer.");

    let mut opts = DatapathOptions::new(args.instance.clone(), args.cgroup.clone());
    opts.bpffs_root = args.bpffs_root.clone();
    opts.policy_entries = args.policy_entries;
    opts.egress = args.egress_check;
    let mut datapath = Datapath::load(&opts).context("loading the enforcer datapath")?;
    let mut cfg = datapath.config()?;
    cfg.fail_monitor = fail_abi(args.fail_monitor);
    cfg.fail_enforce = fail_abi(args.fail_enforce);
    cfg.event_rate = args.event_rate;
    cfg.event_burst = args.event_burst;
    datapath.set_config(cfg)?;
    let capacity = Capacity { policy_per_generation: (args.policy_entries / 2) as usize, ..Capacity::DEFAULT };
    let owner = MapOwner::open(datapath, AppliedFile::new(&args.state_dir.join(&args.instance)), capacity)
        .context("reading back the kernel's policy")?;
    let metrics = Metrics::new();
    let listener = metrics::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics listener {}", args.metrics_listen))?;
    let served = metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, served).await {
            tracing::warn!(error = %e, "The metrics endpoint stopped.");
        }
    });
    let owner = OwnerHandle::spawn(owner, args.poll_interval, metrics.clone());

    let session = Session { node_id, boot_id, agent_version: env!("CARGO_PKG_VERSION").to_owned(), transport };
    tokio::select! {
        () = stream_forever(&args, &session, &owner, &metrics) => Ok(()),
        () = shutdown_signal() => {
            // Pins keep the programs attached and the policy enforced; the next
            // process adopts them.
            tracing::info!("Shutting down; the kernel keeps enforcing the applied policy.");
            Ok(())
        }
    }
}

fn fail_abi(mode: FailMode) -> u8 {
    match mode {
        FailMode::Open => FAIL_OPEN,
        FailMode::Closed => FAIL_CLOSED,
    }
}

struct Session {
    node_id: String,
    boot_id: String,
    agent_version: String,
    /// mTLS with this node's certificate, or plaintext (`--insecure-grpc`).
    transport: AgentTransport,
}

// === the map owner's thread ===

enum Command {
    Apply(Box<PolicyUpdate>, oneshot::Sender<Result<Outcome, Rejection>>),
    Reports(oneshot::Sender<Vec<VerdictReport>>),
    Requeue(Vec<VerdictReport>),
    AppliedVersion(oneshot::Sender<u64>),
}

/// The async side's handle on the owner thread.
struct OwnerHandle {
    tx: std_mpsc::Sender<Command>,
}

impl OwnerHandle {
    fn spawn(mut owner: MapOwner, poll: Duration, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = std_mpsc::channel::<Command>();
        std::thread::Builder::new()
            .name("map-owner".into())
            .spawn(move || {
                let mut next_drain = std::time::Instant::now() + poll;
                let mut next_refresh = std::time::Instant::now() + NETNS_REFRESH;
                let mut next_export = std::time::Instant::now();
                loop {
                    let wait = next_drain.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(Command::Apply(update, reply)) => {
                            let _ = reply.send(owner.apply_update(&update));
                        }
                        Ok(Command::Reports(reply)) => {
                            let _ = reply.send(owner.take_reports());
                        }
                        Ok(Command::Requeue(reports)) => owner.requeue(reports),
                        Ok(Command::AppliedVersion(reply)) => {
                            let _ = reply.send(owner.applied_version());
                        }
                        Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    if std::time::Instant::now() >= next_drain {
                        owner.drain();
                        next_drain = std::time::Instant::now() + poll;
                    }
                    if std::time::Instant::now() >= next_export {
                        owner.export(&metrics);
                        next_export = std::time::Instant::now() + METRICS_EVERY;
                    }
                    if std::time::Instant::now() >= next_refresh {
                        owner.refresh_netns();
                        next_refresh = std::time::Instant::now() + NETNS_REFRESH;
                    }
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "Could not start the map owner thread."));
        Self { tx }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> anyhow::Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| anyhow::anyhow!("the map owner thread is gone"))?;
        rx.await.map_err(|_| anyhow::anyhow!("the map owner thread is gone"))
    }
}

// === the stream ===

async fn stream_forever(args: &Args, session: &Session, owner: &OwnerHandle, metrics: &Metrics) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = stream_once(args, session, owner, metrics, &mut backoff).await;
        metrics.learner_connected.set(0);
        match result {
            Ok(()) => tracing::info!("Learner closed the policy stream."),
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                retry_in_ms = backoff.as_millis() as u64,
                "Policy stream ended; the applied policy stays in force."
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(args.max_backoff);
    }
}

async fn stream_once(
    args: &Args,
    session: &Session,
    owner: &OwnerHandle,
    metrics: &Metrics,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let channel =
        session.transport.connect(&args.learner).await.with_context(|| format!("connecting to {}", args.learner))?;
    let mut client = PolicyStreamClient::new(channel).max_decoding_message_size(MAX_SNAPSHOT_BYTES);
    let applied_version = owner.ask(Command::AppliedVersion).await?;
    let (tx, rx) = mpsc::channel::<v1::EnforcerMessage>(64);
    let hello = EnforcerMessage::Hello(EnforcerHello {
        node_id: session.node_id.clone(),
        boot_id: session.boot_id.clone(),
        agent_version: session.agent_version.clone(),
        applied_version,
    });
    tx.send((&hello).into()).await.context("policy stream closed")?;
    let mut inbound = client.subscribe(ReceiverStream::new(rx)).await?.into_inner();
    *backoff = Duration::from_millis(100);
    metrics.learner_connected.set(1);
    tracing::info!(url = %args.learner, applied_version, "Connected to the learner's policy stream.");

    let mut reports = tokio::time::interval(args.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            update = inbound.message() => {
                let Some(update) = update? else { return Ok(()) };
                match apply_update(owner, update).await? {
                    Answer::Ack(ack) => {
                        match ack.status {
                            PolicyAckStatus::Applied => metrics.policies_applied.inc(),
                            PolicyAckStatus::Rejected => metrics.policies_rejected.inc(),
                        };
                        tx.send((&EnforcerMessage::Ack(ack)).into()).await.context("policy stream closed")?;
                    }
                    Answer::Resync(why) => {
                        // Close our side so what is queued (earlier acks) still goes
                        // out, wait for the learner to close its side, reconnect.
                        drop(tx);
                        let drained = tokio::time::timeout(RESYNC_CLOSE_WAIT, async {
                            while let Ok(Some(_)) = inbound.message().await {}
                        });
                        let _ = drained.await;
                        anyhow::bail!("{why}; reconnecting for a snapshot");
                    }
                }
            }
            _ = reports.tick() => {
                let pending = owner.ask(Command::Reports).await?;
                let events: usize = pending.iter().map(|r| r.events.len()).sum();
                send_reports(&tx, owner, pending).await?;
                metrics.events_reported.inc_by(events as u64);
            }
        }
    }
}

/// Decodes, applies and answers one update. An update that does not decode is
/// rejected like one that does not apply: the applied policy stays. A delta this
/// enforcer holds no base for ends the stream: the next one starts with a snapshot.
async fn apply_update(owner: &OwnerHandle, update: v1::PolicyUpdate) -> anyhow::Result<Answer> {
    let version = match &update.update {
        Some(v1::policy_update::Update::Snapshot(s)) => s.version,
        Some(v1::policy_update::Update::Delta(d)) => d.version,
        None => 0,
    };
    let result = match PolicyUpdate::try_from(update) {
        Ok(update) => {
            let kind = if matches!(update, PolicyUpdate::Delta(_)) { "delta" } else { "snapshot" };
            tracing::debug!(version, kind = %kind, "Received a policy update.");
            owner.ask(|reply| Command::Apply(Box::new(update), reply)).await?
        }
        Err(invalid) => Err(Rejection::Decode(invalid.to_string())),
    };
    Ok(match result {
        Ok(Outcome::Applied { .. } | Outcome::AlreadyApplied) => {
            Answer::Ack(PolicyAck { version, status: PolicyAckStatus::Applied, error: None })
        }
        Err(resync @ Rejection::Resync { .. }) => Answer::Resync(resync.to_string()),
        Err(rejection) => {
            tracing::warn!(version, error = %rejection, "Rejected a policy update; the applied policy stays.");
            Answer::Ack(PolicyAck { version, status: PolicyAckStatus::Rejected, error: Some(rejection.to_string()) })
        }
    })
}

/// What to do after an update.
enum Answer {
    Ack(PolicyAck),
    /// Reconnect: the update was a delta this enforcer holds no base for.
    Resync(String),
}

/// Sends reports in messages of bounded size; what cannot be sent goes back to
/// the owner for the next stream.
async fn send_reports(
    tx: &mpsc::Sender<v1::EnforcerMessage>,
    owner: &OwnerHandle,
    reports: Vec<VerdictReport>,
) -> anyhow::Result<()> {
    let mut queue: std::collections::VecDeque<VerdictReport> = reports.into_iter().flat_map(split_report).collect();
    while let Some(mut r) = queue.pop_front() {
        // The learner measures this node's clock skew from it (and corrects the times).
        r.sent_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let msg: v1::EnforcerMessage = (&EnforcerMessage::Report(r.clone())).into();
        if tx.send(msg).await.is_err() {
            queue.push_front(r);
            let _ = owner.tx.send(Command::Requeue(queue.into_iter().collect()));
            anyhow::bail!("policy stream closed while reporting");
        }
    }
    Ok(())
}

fn split_report(mut r: VerdictReport) -> Vec<VerdictReport> {
    if r.events.len() <= MAX_EVENTS_PER_REPORT {
        return vec![r];
    }
    let mut out = Vec::new();
    let events = std::mem::take(&mut r.events);
    for chunk in events.chunks(MAX_EVENTS_PER_REPORT) {
        out.push(VerdictReport { events: chunk.to_vec(), rule_counters: Vec::new(), ..r.clone() });
    }
    if let Some(first) = out.first_mut() {
        first.rule_counters = r.rule_counters;
    }
    out
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
