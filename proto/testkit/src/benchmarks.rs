//! BENCHMARKS.md upkeep shared by the benchmarks: each owns one `## title` section and
//! replaces only that, so running one benchmark never disturbs the others' numbers.

use std::path::PathBuf;
use std::time::Duration;

/// The workspace's BENCHMARKS.md.
pub fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md")
}

/// Replaces (or appends) the section headed `## {title}` with `body` (without the
/// heading); other sections stay byte for byte.
pub fn write_section(title: &str, body: &str) -> std::io::Result<PathBuf> {
    let path = path();
    let old = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_owned(),
        Err(e) => return Err(e),
    };
    std::fs::write(&path, replace_section(&old, title, body))?;
    Ok(path)
}

/// The "Machine:" sentence of a section: kernel, cores, CPU model, and the load
/// average when the run started (`load_at_start`, from [`load_average`]) and ended.
/// The benchmarks run on shared machines: the load at the start says how busy it was;
/// at the end it also counts the benchmark's own threads.
pub fn machine(load_at_start: &str, took: Duration) -> String {
    format!(
        "Machine: Linux {}, {} cores ({}), shared with other builds (load average at the start: {load_at_start}; \
         at the end: {}); bench took {:.0} s.",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model(),
        load_average(),
        took.as_secs_f64()
    )
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them.
pub fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// [`write_section`] on a string.
pub fn replace_section(old: &str, title: &str, body: &str) -> String {
    let head = format!("## {title}\n");
    let section = format!("{head}\n{}\n", body.trim_end());
    match old.find(&head).filter(|&i| i == 0 || old[..i].ends_with('\n')) {
        Some(start) => {
            let rest = &old[start + head.len()..];
            let end = rest.find("\n## ").map_or(old.len(), |i| start + head.len() + i + 1);
            let tail = &old[end..];
            if tail.is_empty() {
                format!("{}{section}", &old[..start])
            } else {
                format!("{}{section}\n{tail}", &old[..start])
            }
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_own_section() {
        let old = "# Benchmarks\n\n## A\n\nold a\n\n## B\n\nb stays\n";
        let new = replace_section(old, "A", "new a");
        assert_eq!(new, "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb stays\n");
        let appended = replace_section(&new, "C", "c");
        assert!(appended.ends_with("## B\n\nb stays\n\n## C\n\nc\n"), "{appended}");
        assert_eq!(replace_section(&appended, "B", "b2"), "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb2\n\n## C\n\nc\n");
    }
}
