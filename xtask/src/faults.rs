//! Fault tests of the whole pipeline: the reference scenario's real binaries, mTLS and
//! network-namespace workloads ([`crate::scenario`]), with one fault injected per run.
//! Each run checks the two promises of DESIGN.md §8:
//!
//! * **no data lost beyond what is reported as lost** — every tie fighter landing the
//!   scenario made is counted exactly once by the learner in the end, or the loss
//!   shows in the agent's counters (and then the counts add up exactly);
//! * **enforcement never weaker than the last applied version** — while a component
//!   is down, the kernel keeps judging with the version the enforcer last applied.
//!
//! The faults: the learner killed (`kill -9`) while the collector streams and again
//! right after a rollout change; the enforcer killed right after a rollout change
//! reached it; the learner's PostgreSQL database refusing connections for a while; the
//! collector's spool on a file system that fills up (a real ENOSPC from a small tmpfs);
//! the node's clock two hours off (libfaketime in the agents' processes).
//! `xtask/tests/faults.rs` runs each; a failing check names the fault, the step and
//! the logs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::scenario::{Options, Scenario, step};
use crate::util;

/// Where Debian's `libfaketime` package puts the preload library (the variant for
/// multi-threaded programs).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// One injected fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// `kill -9` of the learner while the collector streams, and again right after a
    /// rollout change (before the enforcer may have received it).
    LearnerKilled,
    /// `kill -9` of the enforcer right after a rollout change was sent to it.
    EnforcerKilled,
    /// The learner's PostgreSQL database refuses connections for a while (the pipeline
    /// must run on `database`, given as `Options::overrides.db_url`).
    DatabaseUnavailable { admin_url: String, database: String },
    /// The collector's spool (`Options::overrides.spool_dir`, a small tmpfs) fills up
    /// while the learner is down.
    DiskFullSpool,
    /// The node's clock is `offset_ms` off the learner's (the agents run under
    /// libfaketime, see [`clock_skew_env`]).
    ClockSkew { offset_ms: i64 },
}

/// The agents' environment that puts their wall clock `offset_ms` off (monotonic time,
/// which timers use, stays true).
pub fn clock_skew_env(offset_ms: i64) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), format!("{:+}", offset_ms as f64 / 1000.0)),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Runs the scenario's pipeline with `fault`; everything is torn down before it returns.
pub fn run(fault: &Fault, opts: &Options) -> Result<()> {
    let mut sc = Scenario::start(opts)?;
    let outcome = Story::new(&mut sc).and_then(|mut story| story.play(fault));
    if outcome.is_err() {
        println!("[fault] failed; logs are in {}", opts.dir.display());
    }
    drop(sc);
    outcome
}

/// A fault run: the scenario and what it did so far.
struct Story<'a> {
    sc: &'a mut Scenario,
    /// Tie fighter landings that succeeded (each one TCP connection to deathstar:80).
    landed: u64,
    collector_metrics: SocketAddr,
    enforcer_metrics: SocketAddr,
}

impl<'a> Story<'a> {
    fn new(sc: &'a mut Scenario) -> Result<Story<'a>> {
        sc.start_pipeline()?;
        sc.start_deathstar()?;
        let ports = sc.ports();
        Ok(Story {
            sc,
            landed: 0,
            collector_metrics: ports.collector_metrics,
            enforcer_metrics: ports.enforcer_metrics,
        })
    }

    fn play(&mut self, fault: &Fault) -> Result<()> {
        match fault {
            Fault::LearnerKilled => self.learner_killed(),
            Fault::EnforcerKilled => self.enforcer_killed(),
            Fault::DatabaseUnavailable { admin_url, database } => self.database_unavailable(admin_url, database),
            Fault::DiskFullSpool => self.disk_full_spool(),
            Fault::ClockSkew { offset_ms } => self.clock_skew(*offset_ms),
        }
    }

    // === the faults ===

    fn learner_killed(&mut self) -> Result<()> {
        step("fault: the learner is killed while the collector streams");
        self.land(3)?;
        self.sc.kill("learner")?;
        self.land(3)?;
        self.wait_metric(
            self.collector_metrics,
            "bulkhead_collector_spool_batches",
            "the landings held in the spool",
            |v| v >= 1.0,
        )?;
        self.sc.restart("learner")?;
        self.wait_learner()?;
        self.land(2)?;
        self.expect_all_landings_counted_once()?;

        step("fault: the learner is killed right after a rollout change");
        let (deathstar, _) = self.learn_and_approve()?;
        let monitor = self.monitor_then_ask_for_enforce(deathstar)?;
        self.sc.kill("learner")?;
        // Whichever version the enforcer holds now, the kernel enforces exactly it.
        let held = self.applied()?;
        let xwing = self.sc.ship("xwing", "POST", "/v1/request-landing", Some("2"))?;
        if held == monitor {
            expect(xwing == "Ship landed", format!("monitor (v{held}) still applied, so xwing lands: {xwing}"))?;
        } else {
            expect(xwing.starts_with("request failed"), format!("enforce (v{held}) applied: xwing dropped: {xwing}"))?;
        }
        self.land(1)?;
        self.sc.restart("learner")?;
        self.wait_learner()?;
        self.sc.wait_applied(Some(monitor), "enforce")?;
        self.expect_enforced()?;
        let changes = self.sc.cli_json(&["audit", "--action", "rollout.mode"])?;
        let to_enforce = changes.as_array().into_iter().flatten().filter(|e| e["detail"]["to"] == "enforce").count();
        expect(to_enforce == 1, format!("the change to enforce is in the audit log exactly once: {changes}"))?;

        step("fault: the learner is killed while the enforcer enforces; it resyncs on restart");
        let held = self.kernel_version()?;
        let log = self.sc.log_path("enforcer");
        let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        self.sc.kill("learner")?;
        self.sc.restart("learner")?;
        self.wait_learner()?;
        self.sc.wait_for(Duration::from_secs(30), "the enforcer to ack the restarted learner's version", |sc| {
            sc.enforcer_versions().is_ok_and(|(desired, applied)| desired > Some(held) && applied == desired)
        })?;
        // Nothing changed, so the resync must not touch the kernel: a restarted learner
        // that offered anything before its first compile (an empty policy) would have
        // unmanaged deathstar for a moment.
        let applies = log_since(&log, before)?
            .lines()
            .filter(|l| l.contains("Applied a policy"))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        expect(
            !applies.is_empty() && applies.iter().all(|l| l.contains("unchanged content")),
            format!("the resync applied the same policy without map writes: {applies:#?}"),
        )?;
        self.expect_enforced()?;
        self.expect_all_landings_counted_once()
    }

    fn enforcer_killed(&mut self) -> Result<()> {
        step("fault: the enforcer is killed right after a rollout change reached it");
        self.land(3)?;
        let (deathstar, _) = self.learn_and_approve()?;
        let monitor = self.monitor_then_ask_for_enforce(deathstar)?;
        self.sc.kill("enforcer")?;
        // Its pinned programs and maps keep judging: connections allowed by both
        // versions pass, xwing meets whichever version was applied last.
        self.land(2)?;
        let xwing = self.sc.ship("xwing", "POST", "/v1/request-landing", Some("2"))?;
        let down_until = unix_ms();
        println!("[fault]   xwing while the enforcer is down: {xwing}");
        self.sc.restart("enforcer")?;
        self.sc.wait_applied(Some(monitor), "enforce")?;
        // The kernel judged xwing while no agent ran: its event waited in the pinned
        // ring buffer and the new process reported it.
        let xwing_id = self.sc.identity_of("xwing")?;
        let verdict = if xwing == "Ship landed" { "audit" } else { "denied" };
        self.sc.wait_for(Duration::from_secs(30), "xwing's attempt during the downtime reported", |sc| {
            sc.cli_json(&["verdicts", "--identity", &deathstar.to_string(), "--verdict", verdict]).is_ok_and(|v| {
                v.as_array().into_iter().flatten().any(|e| {
                    e["peer"].as_i64() == Some(xwing_id) && e["at_unix_ms"].as_i64().is_some_and(|t| t <= down_until)
                })
            })
        })?;
        self.expect_enforced()?;
        self.expect_all_landings_counted_once()
    }

    fn database_unavailable(&mut self, admin_url: &str, database: &str) -> Result<()> {
        step("fault: the learner's database becomes unavailable while enforcing");
        self.land(3)?;
        let (deathstar, _) = self.learn_and_approve()?;
        self.sc.rollout(deathstar, "monitor", "fault test")?;
        self.sc.rollout(deathstar, "enforce", "fault test")?;
        let applied = self.kernel_version()?;
        let outage_from = unix_ms();
        psql(admin_url, &format!("ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS false"))?;
        psql(
            admin_url,
            &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"),
        )?;
        let outage = (|| -> Result<()> {
            let refused = self.sc.cli(&["graph"]);
            expect(refused.is_err(), format!("the API answers an error while the store is down: {refused:?}"))?;
            self.land(4)?;
            let xwing = self.sc.ship("xwing", "POST", "/v1/request-landing", Some("2"))?;
            expect(xwing.starts_with("request failed"), format!("xwing stays dropped: {xwing}"))?;
            self.wait_metric(
                self.collector_metrics,
                "bulkhead_collector_spool_batches",
                "flows held in the spool",
                |v| v >= 1.0,
            )?;
            let log = self.sc.log_path("learner");
            self.sc.wait_for(Duration::from_secs(30), "the learner's policy recompile to fail on the store", |_| {
                std::fs::read_to_string(&log).is_ok_and(|l| l.contains("enforcers keep their last policy"))
            })?;
            expect(self.applied()? == applied, "the enforcer keeps the applied version".into())?;
            Ok(())
        })();
        let restored = psql(admin_url, &format!("ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS true"));
        let outage_until = unix_ms();
        outage?;
        restored?;
        step("the database is back");
        self.expect_enforced()?;
        // The learner kept xwing's denial from the outage until the store took it.
        let xwing = self.sc.identity_of("xwing")?;
        self.sc.wait_for(Duration::from_secs(30), "xwing's denial during the outage recorded", |sc| {
            sc.cli_json(&["verdicts", "--identity", &deathstar.to_string(), "--verdict", "denied"]).is_ok_and(|v| {
                v.as_array().into_iter().flatten().any(|e| {
                    e["peer"].as_i64() == Some(xwing)
                        && e["at_unix_ms"].as_i64().is_some_and(|t| (outage_from..=outage_until).contains(&t))
                })
            })
        })?;
        self.expect_all_landings_counted_once()
    }

    fn disk_full_spool(&mut self) -> Result<()> {
        step("fault: the collector's spool fills its file system while the learner is down");
        self.land(2)?;
        self.expect_all_landings_counted_once()?;
        self.sc.kill("learner")?;
        let mut spooled = self.metric(self.collector_metrics, "bulkhead_collector_batches_spooled_total")?;
        for _ in 0..60 {
            self.land(1)?;
            // Each landing in its own batch, so the spool holds many files.
            self.wait_metric(self.collector_metrics, "bulkhead_collector_batches_spooled_total", "a new batch", |v| {
                v > spooled
            })?;
            spooled = self.metric(self.collector_metrics, "bulkhead_collector_batches_spooled_total")?;
            if self.metric(self.collector_metrics, "bulkhead_collector_spool_evicted_flows_total")? > 0.0 {
                break;
            }
        }
        let evicted = self.metric(self.collector_metrics, "bulkhead_collector_spool_evicted_flows_total")?;
        expect(evicted > 0.0, "the small file system filled up and the collector evicted batches".into())?;
        self.land(2)?;
        self.sc.restart("learner")?;
        self.wait_learner()?;
        self.wait_metric(self.collector_metrics, "bulkhead_collector_spool_batches", "the spool drained", |v| {
            v == 0.0
        })?;
        // Every flow the collector cut is stored or reported lost, exactly.
        let mut last = String::new();
        let ok = self.sc.wait_for(Duration::from_secs(30), "stored + lost flows = flows cut", |sc| {
            let counts = (|| -> Result<(f64, f64, u64, u64)> {
                let m = scrape(sc.ports().collector_metrics)?;
                let cut = m.get("bulkhead_collector_flows_total").copied().unwrap_or(-1.0);
                let lost = m.get("bulkhead_collector_spool_evicted_flows_total").copied().unwrap_or(-1.0);
                let stored = stored_flows(sc)?;
                let reported = reported_lost_flows(sc)?;
                Ok((cut, lost, stored, reported))
            })();
            last = format!("{counts:?}");
            counts.is_ok_and(|(cut, lost, stored, reported)| {
                stored as f64 + lost == cut && reported as f64 == lost && stored > 0
            })
        });
        ok.with_context(|| format!("(flows cut, lost, stored, lost as the learner shows it) = {last}"))?;
        println!("[fault]   (flows cut, lost, stored, lost as the learner shows it) = {last}");
        let connections = self.tiefighter_connections()?;
        expect(
            connections < self.landed && connections > 0,
            format!("{connections} of {} landings stored; the rest is reported lost", self.landed),
        )
    }

    fn clock_skew(&mut self, offset_ms: i64) -> Result<()> {
        step(&format!("fault: the node's clock is {:+.1} s off", offset_ms as f64 / 1000.0));
        self.land(3)?;
        self.sc.wait_for_landings(3)?;
        let agents = self.sc.cli_json(&["agents"])?;
        let skew = agents.as_array().into_iter().flatten().find_map(|a| a["clock_skew_ms"].as_i64());
        expect(
            skew.is_some_and(|s| (s + offset_ms).abs() < 5_000),
            format!("the collector's skew is measured as {:+} ms: {agents}", -offset_ms),
        )?;
        let flows = self.sc.cli_json(&["flows", "--limit", "1000"])?;
        let now = unix_ms();
        let off: Vec<&Value> = flows
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["flow"]["last_seen_unix_ms"].as_i64().is_none_or(|t| (t - now).abs() > 60_000))
            .collect();
        expect(off.is_empty(), format!("flows are on the learner's clock (now {now}); off: {off:?}"))?;

        let (deathstar, _) = self.learn_and_approve()?;
        self.sc.rollout(deathstar, "monitor", "fault test")?;
        let xwing = self.sc.ship("xwing", "POST", "/v1/request-landing", None)?;
        expect(xwing == "Ship landed", format!("monitor drops nothing: {xwing}"))?;
        self.sc.wait_verdicts(deathstar, "xwing", "audit", None, "xwing's landing reported as audit")?;
        let events = self.sc.cli_json(&["verdicts", "--identity", &deathstar.to_string(), "--verdict", "audit"])?;
        let now = unix_ms();
        let off: Vec<&Value> = events
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["at_unix_ms"].as_i64().is_none_or(|t| (t - now).abs() > 60_000))
            .collect();
        expect(off.is_empty(), format!("verdict events are on the learner's clock (now {now}); off: {off:?}"))?;
        let enforcers = self.sc.cli_json(&["enforcers"])?;
        let skew = enforcers.as_array().into_iter().flatten().find_map(|e| e["clock_skew_ms"].as_i64());
        expect(
            skew.is_some_and(|s| (s + offset_ms).abs() < 5_000),
            format!("the enforcer's skew is measured as {:+} ms: {enforcers}", -offset_ms),
        )
    }

    // === steps ===

    /// The tie fighter lands `n` times (each must land).
    fn land(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            let answer = self.sc.ship("tiefighter", "POST", "/v1/request-landing", None)?;
            expect(answer == "Ship landed", format!("the tie fighter lands: {answer}"))?;
            self.landed += 1;
        }
        println!("[fault]   tie fighter landings so far: {}", self.landed);
        Ok(())
    }

    /// Once the collector's spool is empty every batch has been acked, so the count is
    /// final: it must be every landing, once.
    fn expect_all_landings_counted_once(&mut self) -> Result<()> {
        self.wait_metric(self.collector_metrics, "bulkhead_collector_spool_batches", "the spool drained", |v| {
            v == 0.0
        })?;
        let want = self.landed;
        self.sc.wait_for(Duration::from_secs(60), &format!("{want} tie fighter connections"), |sc| {
            tiefighter_connections(sc).is_ok_and(|c| c >= want)
        })?;
        let have = self.tiefighter_connections()?;
        expect(have == want, format!("each landing counted exactly once: {have} stored for {want} landings"))?;
        let loss = reported_lost_flows(self.sc)?;
        expect(loss == 0, format!("the collector reports no loss ({loss} flows)"))
    }

    /// Learns deathstar's proposal and approves it; (deathstar, proposal).
    fn learn_and_approve(&mut self) -> Result<(i64, i64)> {
        self.sc.wait_for_landings(u32::try_from(self.landed).unwrap_or(u32::MAX))?;
        let deathstar = self.sc.identity_of("deathstar")?;
        let proposal = self.sc.proposal_for(deathstar)?;
        self.sc.check_proposal(proposal)?;
        self.sc.cli(&["proposals", "approve", &proposal.to_string(), "--comment", "fault test"])?;
        Ok((deathstar, proposal))
    }

    /// Puts deathstar in monitor mode (applied in the kernel), then asks for enforce
    /// without waiting: the moment a fault strikes. The monitor version.
    fn monitor_then_ask_for_enforce(&mut self, deathstar: i64) -> Result<u64> {
        self.sc.rollout(deathstar, "monitor", "fault test")?;
        let monitor = self.kernel_version()?;
        let target = deathstar.to_string();
        self.sc.cli(&["rollout", "set", "--target", &target, "--mode", "enforce", "--reason", "fault"])?;
        Ok(monitor)
    }

    /// The version the enforcer acked to the learner, once its metrics show the kernel
    /// holds it too (they are updated a moment after the ack).
    fn kernel_version(&mut self) -> Result<u64> {
        let acked = self.sc.enforcer_versions()?.1.context("the enforcer acked no version")?;
        let metrics = self.enforcer_metrics;
        self.wait_metric(metrics, "bulkhead_enforcer_applied_version", "the acked version in the kernel", |v| {
            v as u64 == acked
        })?;
        Ok(acked)
    }

    /// Enforce mode as the scenario promises it: the tie fighter lands, xwing does not.
    fn expect_enforced(&mut self) -> Result<()> {
        self.land(1)?;
        let xwing = self.sc.ship("xwing", "POST", "/v1/request-landing", Some("2"))?;
        expect(xwing.starts_with("request failed"), format!("xwing is dropped in enforce mode: {xwing}"))
    }

    /// The version the enforcer's kernel maps hold, from its own metrics (works while
    /// the learner is down).
    fn applied(&mut self) -> Result<u64> {
        let v = self.metric(self.enforcer_metrics, "bulkhead_enforcer_applied_version")?;
        Ok(v as u64)
    }

    fn wait_learner(&mut self) -> Result<()> {
        self.sc.wait_for(Duration::from_secs(30), "the learner's API after its restart", |sc| {
            sc.cli_json(&["agents"]).is_ok()
        })
    }

    fn tiefighter_connections(&mut self) -> Result<u64> {
        tiefighter_connections(self.sc)
    }

    fn metric(&mut self, at: SocketAddr, name: &str) -> Result<f64> {
        scrape(at)?.get(name).copied().with_context(|| format!("no metric {name} at {at}"))
    }

    fn wait_metric(&mut self, at: SocketAddr, name: &str, what: &str, ok: impl Fn(f64) -> bool) -> Result<()> {
        self.sc.wait_for(Duration::from_secs(30), &format!("{what} ({name})"), |_| {
            scrape(at).ok().and_then(|m| m.get(name).copied()).is_some_and(&ok)
        })
    }
}

fn tiefighter_connections(sc: &Scenario) -> Result<u64> {
    let edges = sc.cli_json(&["graph"])?;
    Ok(edges
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["dst_port"] == 80 && e["src_labels"]["class"] == "tiefighter")
        .filter_map(|e| e["connections"].as_u64())
        .sum())
}

/// Flows the learner stored from the scenario's node.
fn stored_flows(sc: &Scenario) -> Result<u64> {
    let flows = sc.cli_json(&["flows", "--limit", "10000", "--node", crate::scenario::NODE])?;
    let n = flows.as_array().map_or(0, Vec::len) as u64;
    if n >= 10_000 {
        bail!("more flows than one page; the fault test expects a few hundred");
    }
    Ok(n)
}

/// The flows the learner shows as lost by the node's collector (all loss counters).
fn reported_lost_flows(sc: &Scenario) -> Result<u64> {
    let agents = sc.cli_json(&["agents"])?;
    let agent = agents.as_array().into_iter().flatten().find(|a| a["node_id"] == crate::scenario::NODE);
    let loss = agent.map(|a| &a["loss"]).context("the scenario's node is not among the agents")?;
    Ok(loss["spool_evicted_flows"].as_u64().unwrap_or(0))
}

/// The Prometheus text of `http://at/metrics` as name → value (labels are not used
/// by the agents' metrics the fault tests read).
fn scrape(at: SocketAddr) -> Result<HashMap<String, f64>> {
    let mut s =
        TcpStream::connect_timeout(&at, Duration::from_secs(2)).with_context(|| format!("connecting to {at}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {at}\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// What a log file got since it was `offset` bytes long.
fn log_since(path: &std::path::Path, offset: u64) -> Result<String> {
    let all = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let from = usize::try_from(offset).unwrap_or(usize::MAX).min(all.len());
    Ok(String::from_utf8_lossy(&all[from..]).into_owned())
}

fn psql(admin_url: &str, sql: &str) -> Result<()> {
    util::capture(Command::new("psql").args([admin_url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql]))
        .with_context(|| format!("psql: {sql}"))?;
    Ok(())
}

fn expect(ok: bool, what: String) -> Result<()> {
    if !ok {
        bail!("{what}");
    }
    println!("[fault]   ok: {what}");
    Ok(())
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
