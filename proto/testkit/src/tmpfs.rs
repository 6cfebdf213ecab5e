//! A small tmpfs mounted for one test, so a "disk full" is a real ENOSPC from the
//! kernel rather than an injected error. Unmounted (lazily, so an open file cannot
//! keep it) and removed on drop, even when the test panics.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// A tmpfs of a fixed size at a fresh directory under the system temp dir.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` (rounded up to pages by the kernel). Needs root;
    /// panics with the reason otherwise (privileged tests fail rather than skip).
    pub fn mount(size_bytes: u64) -> Tmpfs {
        crate::require_root();
        let path = std::env::temp_dir().join(format!("bh-tmpfs-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let options = format!("size={size_bytes},mode=0700");
        mount(Some("tmpfs"), &path, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(options.as_str()))
            .unwrap_or_else(|e| panic!("mounting a tmpfs at {}: {e}", path.display()));
        Tmpfs { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
