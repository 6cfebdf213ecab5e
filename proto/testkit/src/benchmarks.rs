//! BENCHMARKS.md upkeep shared by the benchmarks: each owns one `## title` section and
//! replaces only that, so running one benchmark never disturbs the others' numbers.

use std::path::PathBuf;

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
