//! The one fact the kernel maps cannot hold: which learner version the active
//! generation came from. Kept in a small file next to the agent's state, written
//! atomically (temp file, fsync, rename) after a generation is activated.
//!
//! It is only believed when its generation is the one the kernel has active: a
//! process killed between activating and writing leaves a file naming the older
//! generation, and the agent then says "version unknown" (0) in its Hello — the
//! learner sends its current snapshot, which is diffed against the maps as read
//! back from the kernel, so nothing is lost either way.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Version + generation, one line: `version=<u64> generation=<u32>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub generation: u32,
}

/// Where the file lives, per instance.
#[derive(Debug, Clone)]
pub struct AppliedFile {
    path: PathBuf,
}

impl AppliedFile {
    pub fn new(state_dir: &Path) -> Self {
        Self { path: state_dir.join("applied") }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded version, `None` when there is no file or it cannot be parsed
    /// (logged: a garbled file costs one full resync, nothing more).
    pub fn read(&self) -> Option<Applied> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Cannot read the applied-version file.");
                return None;
            }
        };
        let parsed = parse(&text);
        if parsed.is_none() {
            tracing::warn!(path = %self.path.display(), "Ignoring a malformed applied-version file.");
        }
        parsed
    }

    pub fn write(&self, applied: Applied) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "version={} generation={}", applied.version, applied.generation)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
    }
}

fn parse(text: &str) -> Option<Applied> {
    let mut version = None;
    let mut generation = None;
    for word in text.split_whitespace() {
        match word.split_once('=')? {
            ("version", v) => version = Some(v.parse().ok()?),
            ("generation", g) => generation = Some(g.parse().ok()?),
            _ => return None,
        }
    }
    Some(Applied { version: version?, generation: generation? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = AppliedFile::new(dir.path());
        assert_eq!(f.read(), None);
        f.write(Applied { version: 1_700_000_000_123, generation: 7 }).expect("write");
        assert_eq!(f.read(), Some(Applied { version: 1_700_000_000_123, generation: 7 }));
        std::fs::write(f.path(), "version=x generation=1").expect("write");
        assert_eq!(f.read(), None);
        std::fs::write(f.path(), "version=3").expect("write");
        assert_eq!(f.read(), None);
    }
}
