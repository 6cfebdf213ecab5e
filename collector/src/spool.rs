//! Bounded on-disk spool of flow batches awaiting the learner's ack.
//!
//! Every batch is written here *before* it is sent and removed only when the learner
//! acks it, so a learner restart, a network outage or a collector crash loses nothing
//! that fits in the spool: delivery is at-least-once and the learner dedupes on
//! (node, boot id, seq). When the spool is full the oldest batches are evicted and
//! counted — loss is reported, never silent.
//!
//! One file per batch, named so that lexical order is delivery order:
//! `{created_ms:016x}-{seq:016x}-{flows}.{boot_id}.pb`. Writes go to a temporary name,
//! are fsynced and renamed, so a crash never leaves a torn batch behind.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use bulkhead_proto::v1;
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("writing spooled batch {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("reading spooled batch {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("batch of {size} bytes does not fit a spool of {max} bytes")]
    TooLarge { size: u64, max: u64 },
}

/// A spooled batch, identified by its file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpoolEntry {
    name: String,
    pub boot_id: String,
    pub seq: u64,
    pub flows: u64,
    pub bytes: u64,
}

/// What eviction threw away to make room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    pub batches: u64,
    pub flows: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    entries: Vec<SpoolEntry>,
    bytes: u64,
    /// Batches sent to the learner whose ack has not come back. They are never
    /// evicted: the learner may already have stored one, so counting it as lost would
    /// count a flow twice (stored and lost); and if it was not stored, it is sent
    /// again. Only the next Welcome (what the learner has) releases them.
    unacked: BTreeSet<String>,
}

impl Spool {
    /// Opens (creating) the spool and indexes batches left by earlier runs. Leftover
    /// temporary files and unparsable names are removed: they can only come from a
    /// crash mid-write, before the batch was ever sent.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self, SpoolError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| SpoolError::Dir { path: dir.clone(), source })?;
        let mut entries = Vec::new();
        let rd = fs::read_dir(&dir).map_err(|source| SpoolError::Dir { path: dir.clone(), source })?;
        for item in rd {
            let item = item.map_err(|source| SpoolError::Dir { path: dir.clone(), source })?;
            let name = item.file_name().to_string_lossy().into_owned();
            let bytes = item.metadata().map(|m| m.len()).unwrap_or(0);
            match parse_name(&name, bytes) {
                Some(e) => entries.push(e),
                None => {
                    tracing::warn!(file = %name, "Removing incomplete spool file.");
                    let _ = fs::remove_file(item.path());
                }
            }
        }
        entries.sort();
        let bytes = entries.iter().map(|e| e.bytes).sum();
        Ok(Self { dir, max_bytes, entries, bytes, unacked: BTreeSet::new() })
    }

    /// Adds a batch, evicting the oldest ones if needed.
    pub fn push(&mut self, batch: &v1::FlowBatch) -> Result<(SpoolEntry, Evicted), SpoolError> {
        let body = batch.encode_to_vec();
        let size = body.len() as u64;
        if size > self.max_bytes {
            return Err(SpoolError::TooLarge { size, max: self.max_bytes });
        }
        let mut evicted = Evicted::default();
        // Batches awaiting an ack are not evictable, so the limit can be passed by at
        // most the shipper's window of batches: better than losing a new one.
        while self.bytes + size > self.max_bytes {
            let Some(old) = self.oldest_evictable() else { break };
            self.remove(&old)?;
            evicted.batches += 1;
            evicted.flows += old.flows;
            tracing::warn!(seq = old.seq, flows = old.flows, "Spool full: evicted the oldest batch.");
        }
        let name = format!(
            "{:016x}-{:016x}-{}.{}.pb",
            batch.created_unix_ms.max(0),
            batch.seq,
            batch.flows.len(),
            sanitize(&batch.boot_id)
        );
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_data()?;
            fs::rename(&tmp, &path)
        };
        // A full file system (the spool shares it, or its limit is set above what the
        // disk has) is treated like a full spool: the oldest batches make room for the
        // newest, and each one thrown away is counted. Only when nothing is left to
        // evict is the batch itself lost (the caller counts it).
        loop {
            match write() {
                Ok(()) => break,
                Err(source) => {
                    let _ = fs::remove_file(&tmp);
                    let oldest = self.oldest_evictable();
                    let Some(old) = oldest.filter(|_| disk_full(&source)) else {
                        return Err(SpoolError::Write { path: path.clone(), source });
                    };
                    self.remove(&old)?;
                    evicted.batches += 1;
                    evicted.flows += old.flows;
                    tracing::warn!(
                        dir = %self.dir.display(),
                        error = %source,
                        seq = old.seq,
                        flows = old.flows,
                        "Spool disk full: evicted the oldest batch to make room."
                    );
                }
            }
        }
        let entry = SpoolEntry {
            name,
            boot_id: batch.boot_id.clone(),
            seq: batch.seq,
            flows: batch.flows.len() as u64,
            bytes: size,
        };
        let pos = self.entries.partition_point(|e| e < &entry);
        self.entries.insert(pos, entry.clone());
        self.bytes += size;
        Ok((entry, evicted))
    }

    /// Spooled batches in delivery order.
    pub fn entries(&self) -> &[SpoolEntry] {
        &self.entries
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn read(&self, e: &SpoolEntry) -> Result<v1::FlowBatch, SpoolError> {
        let path = self.dir.join(&e.name);
        let body = fs::read(&path).map_err(|source| SpoolError::Read { path: path.clone(), source })?;
        v1::FlowBatch::decode(body.as_slice())
            .map_err(|err| SpoolError::Read { path, source: std::io::Error::new(std::io::ErrorKind::InvalidData, err) })
    }

    /// The oldest batch not awaiting an ack.
    fn oldest_evictable(&self) -> Option<SpoolEntry> {
        self.entries.iter().find(|e| !self.unacked.contains(&e.name)).cloned()
    }

    /// Marks a batch as sent: it stays (unevictable) until acked or released.
    pub fn sent(&mut self, e: &SpoolEntry) {
        self.unacked.insert(e.name.clone());
    }

    /// Whether a batch was sent and its ack has not come back.
    pub fn is_unacked(&self, e: &SpoolEntry) -> bool {
        self.unacked.contains(&e.name)
    }

    /// Forgets which batches were sent: called once a new stream's Welcome said what
    /// the learner has, so everything still spooled is known to need sending.
    pub fn release_unacked(&mut self) {
        self.unacked.clear();
    }

    /// Removes a delivered (or rejected) batch. Removing one that is already gone is fine.
    pub fn remove(&mut self, e: &SpoolEntry) -> Result<(), SpoolError> {
        let path = self.dir.join(&e.name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SpoolError::Write { path, source }),
        }
        self.unacked.remove(&e.name);
        if let Some(pos) = self.entries.iter().position(|x| x == e) {
            self.bytes -= self.entries[pos].bytes;
            self.entries.remove(pos);
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// No space (or quota) left where the spool lives.
fn disk_full(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Boot ids are UUIDs we make ourselves, but the file name must never escape the dir.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect()
}

fn parse_name(name: &str, bytes: u64) -> Option<SpoolEntry> {
    let stem = name.strip_suffix(".pb")?;
    let (head, boot_id) = stem.split_once('.')?;
    let mut parts = head.splitn(3, '-');
    let _created = u64::from_str_radix(parts.next()?, 16).ok()?;
    let seq = u64::from_str_radix(parts.next()?, 16).ok()?;
    let flows = parts.next()?.parse().ok()?;
    Some(SpoolEntry { name: name.to_owned(), boot_id: boot_id.to_owned(), seq, flows, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, flows: usize, boot: &str) -> v1::FlowBatch {
        v1::FlowBatch {
            node_id: "n1".into(),
            boot_id: boot.into(),
            seq,
            created_unix_ms: 1_700_000_000_000 + seq as i64,
            flows: vec![v1::Flow { comm: "x".repeat(40), ..Default::default() }; flows],
            ..Default::default()
        }
    }

    #[test]
    fn survives_reopen_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spool::open(dir.path(), 1 << 20).expect("open");
        for seq in [1, 2, 3] {
            s.push(&batch(seq, 2, "b-1")).expect("push");
        }
        let first = s.entries()[0].clone();
        s.remove(&first).expect("remove");
        let s = Spool::open(dir.path(), 1 << 20).expect("reopen");
        let seqs: Vec<u64> = s.entries().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        let b = s.read(&s.entries()[1]).expect("read");
        assert_eq!((b.seq, b.flows.len(), b.boot_id.as_str()), (3, 2, "b-1"));
    }

    #[test]
    fn full_spool_evicts_oldest_and_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = batch(1, 10, "b").encode_to_vec().len() as u64;
        let mut s = Spool::open(dir.path(), one * 3).expect("open");
        let mut evicted = Evicted::default();
        for seq in 1..=5 {
            let (_, e) = s.push(&batch(seq, 10, "b")).expect("push");
            evicted.batches += e.batches;
            evicted.flows += e.flows;
        }
        assert_eq!(evicted, Evicted { batches: 2, flows: 20 });
        let seqs: Vec<u64> = s.entries().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert!(s.bytes() <= one * 3);
    }

    /// A batch the learner may already have stored is never counted as lost: it stays
    /// until its ack (or the next Welcome) settles it, and eviction takes the next one.
    #[test]
    fn batches_awaiting_an_ack_are_never_evicted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = batch(1, 10, "b").encode_to_vec().len() as u64;
        let mut s = Spool::open(dir.path(), one * 3).expect("open");
        for seq in 1..=3 {
            s.push(&batch(seq, 10, "b")).expect("push");
        }
        let first = s.entries()[0].clone();
        s.sent(&first);
        assert!(s.is_unacked(&first));
        let (_, e) = s.push(&batch(4, 10, "b")).expect("push");
        assert_eq!(e, Evicted { batches: 1, flows: 10 });
        let seqs: Vec<u64> = s.entries().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 3, 4], "the unacked batch 1 stays, batch 2 made room");

        // Acked: removed like any delivered batch, and no longer tracked.
        s.remove(&first).expect("remove");
        assert!(!s.is_unacked(&first));
        // Released by a new stream's Welcome: evictable again.
        let third = s.entries()[0].clone();
        s.sent(&third);
        s.release_unacked();
        let (_, e) = s.push(&batch(5, 10, "b")).expect("push");
        assert_eq!(e, Evicted::default(), "room was left by the acked batch");
        let (_, e) = s.push(&batch(6, 10, "b")).expect("push");
        assert_eq!(e, Evicted { batches: 1, flows: 10 });
        let seqs: Vec<u64> = s.entries().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6]);
    }

    #[test]
    fn torn_writes_are_discarded_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(".0000-0001-1.b.pb.tmp"), b"partial").expect("write");
        fs::write(dir.path().join("garbage"), b"x").expect("write");
        let s = Spool::open(dir.path(), 1 << 20).expect("open");
        assert!(s.entries().is_empty());
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    /// A real ENOSPC (a 64 KiB tmpfs, far below the spool's own limit): the oldest
    /// batches make room for the newest, every eviction is counted, no partial file is
    /// left, and what is indexed is what a reopen finds.
    #[test]
    fn a_full_disk_evicts_the_oldest_batches_and_counts_them() {
        let fs = bulkhead_testkit::tmpfs::Tmpfs::mount(64 << 10);
        let mut s = Spool::open(fs.path(), 1 << 30).expect("open");
        let mut evicted = Evicted::default();
        const PUSHED: u64 = 60;
        for seq in 1..=PUSHED {
            let (_, e) = s.push(&batch(seq, 10, "b")).expect("a full disk still takes the newest batch");
            evicted.batches += e.batches;
            evicted.flows += e.flows;
            if seq == 1 {
                // Sent, ack outstanding: the learner may have it, so it must stay.
                let first = s.entries()[0].clone();
                s.sent(&first);
            }
        }
        assert!(evicted.batches > 0, "64 KiB cannot hold {PUSHED} files: something was evicted");
        assert_eq!(evicted.flows, evicted.batches * 10);
        let seqs: Vec<u64> = s.entries().iter().map(|e| e.seq).collect();
        let expected: Vec<u64> = std::iter::once(1).chain(evicted.batches + 2..=PUSHED).collect();
        assert_eq!(seqs, expected, "the unacked batch and the newest batches stay, in order");
        let names: Vec<String> = fs::read_dir(fs.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "no partial writes left: {names:?}");
        let reopened = Spool::open(fs.path(), 1 << 30).expect("reopen");
        assert_eq!(reopened.entries(), s.entries());
    }

    #[test]
    fn a_write_error_other_than_a_full_disk_evicts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spool::open(dir.path(), 1 << 20).expect("open");
        s.push(&batch(1, 2, "b")).expect("push");
        // The spool directory vanished (an operator cleaned up): an error, nothing evicted.
        fs::remove_dir_all(dir.path()).expect("remove");
        assert!(matches!(s.push(&batch(2, 2, "b")), Err(SpoolError::Write { .. })));
        assert_eq!(s.entries().len(), 1);
    }

    #[test]
    fn oversized_batch_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Spool::open(dir.path(), 100).expect("open");
        assert!(matches!(s.push(&batch(1, 100, "b")), Err(SpoolError::TooLarge { .. })));
    }
}
