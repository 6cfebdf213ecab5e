//! Tracefs: finding it, mounting it if needed, and checking the layout of the
//! `sock/inet_sock_set_state` record against the one the program was compiled
//! with ([`INET_SOCK_SET_STATE_FIELDS`]).
//!
//! Tracepoint records are not a stable ABI in the strict sense: the kernel
//! publishes their layout in a `format` file instead. The program reads the record
//! with one fixed-layout copy, so any difference must stop the load rather than
//! produce silently wrong addresses.

use std::path::{Path, PathBuf};

use bulkhead_abi::collector::INET_SOCK_SET_STATE_FIELDS;

const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// What is wrong with the tracepoint's format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("tracefs is not mounted (tried {tried:?}) and mounting it at /sys/kernel/tracing failed: {source}")]
    NoTracefs {
        tried: Vec<PathBuf>,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read tracepoint format {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint format {path} has no field {field}")]
    MissingField { path: PathBuf, field: &'static str },
    #[error(
        "tracepoint format {path}: field {field} is at offset {offset} size {size}, the program expects offset {expected_offset} size {expected_size}"
    )]
    FieldMismatch {
        path: PathBuf,
        field: &'static str,
        offset: usize,
        size: usize,
        expected_offset: usize,
        expected_size: usize,
    },
}

/// The tracefs mount point, mounting tracefs at `/sys/kernel/tracing` when
/// neither usual location has it (EBPF.md: idempotent run-time mount).
pub fn tracefs_root() -> Result<PathBuf, FormatError> {
    if let Some(dir) = TRACEFS_DIRS.iter().map(Path::new).find(|d| d.join("events").is_dir()) {
        return Ok(dir.to_owned());
    }
    let target = Path::new(TRACEFS_DIRS[0]);
    nix::mount::mount(Some("nodev"), target, Some("tracefs"), nix::mount::MsFlags::empty(), None::<&str>).map_err(
        |errno| FormatError::NoTracefs {
            tried: TRACEFS_DIRS.iter().map(PathBuf::from).collect(),
            source: errno.into(),
        },
    )?;
    tracing::info!(path = %target.display(), "Mounted tracefs.");
    Ok(target.to_owned())
}

/// Checks the running kernel's `inet_sock_set_state` format.
pub fn check_inet_sock_set_state(tracefs: &Path) -> Result<(), FormatError> {
    let path = tracefs.join("events/sock/inet_sock_set_state/format");
    let text = std::fs::read_to_string(&path).map_err(|source| FormatError::Read { path: path.clone(), source })?;
    check_format(&path, &text)
}

pub(crate) fn check_format(path: &Path, text: &str) -> Result<(), FormatError> {
    let fields = parse_fields(text);
    for (name, expected_offset, expected_size) in INET_SOCK_SET_STATE_FIELDS {
        let Some(&(_, offset, size)) = fields.iter().find(|(n, _, _)| *n == name) else {
            return Err(FormatError::MissingField { path: path.to_owned(), field: name });
        };
        if (offset, size) != (expected_offset, expected_size) {
            return Err(FormatError::FieldMismatch {
                path: path.to_owned(),
                field: name,
                offset,
                size,
                expected_offset,
                expected_size,
            });
        }
    }
    Ok(())
}

/// Parses `field:TYPE NAME[N];\toffset:O;\tsize:S;\tsigned:X;` lines into
/// (NAME, O, S). Lines that do not parse are skipped: only the fields the program
/// reads are checked, and a missing one is reported by name.
fn parse_fields(text: &str) -> Vec<(&str, usize, usize)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else { continue };
        let mut parts = rest.split(';').map(str::trim);
        let (Some(decl), Some(offset), Some(size)) = (parts.next(), parts.next(), parts.next()) else { continue };
        // The name is the declaration's last word, without an array suffix.
        let Some(name) = decl.split_whitespace().last().map(|n| n.split('[').next().unwrap_or(n)) else {
            continue;
        };
        let (Some(offset), Some(size)) = (
            offset.strip_prefix("offset:").and_then(|o| o.parse().ok()),
            size.strip_prefix("size:").and_then(|s| s.parse().ok()),
        ) else {
            continue;
        };
        out.push((name, offset, size));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verbatim from Linux 6.18.
    const FORMAT_6_18: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"
";

    #[test]
    fn accepts_the_known_layout() {
        check_format(Path::new("f"), FORMAT_6_18).expect("known layout");
    }

    #[test]
    fn rejects_a_moved_field() {
        let moved = FORMAT_6_18.replace("dport;\toffset:26", "dport;\toffset:28");
        assert!(matches!(
            check_format(Path::new("f"), &moved),
            Err(FormatError::FieldMismatch { field: "dport", offset: 28, .. })
        ));
    }

    #[test]
    fn rejects_a_missing_field() {
        let missing = FORMAT_6_18.replace("saddr_v6", "src_v6");
        assert!(matches!(
            check_format(Path::new("f"), &missing),
            Err(FormatError::MissingField { field: "saddr_v6", .. })
        ));
    }

    #[test]
    fn garbage_is_a_missing_field_not_a_panic() {
        assert!(check_format(Path::new("f"), "field:;;;\nfield:int x;\toffset:zz;\n\0\u{ffff}").is_err());
    }
}
