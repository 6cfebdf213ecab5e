//! Rebuild the eBPF object when the linker changes: cargo does not know that
//! bpf-linker (found on PATH, not declared anywhere) takes part in the build, and
//! a linker built against another LLVM produces an object the kernel may reject.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    let Some(path) = env::var_os("PATH") else { return };
    let linker: Option<PathBuf> =
        env::split_paths(&path).map(|dir| dir.join("bpf-linker")).find(|candidate| candidate.is_file());
    match linker {
        Some(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        None => println!("cargo:warning=bpf-linker not found on PATH; run `cargo xtask setup`"),
    }
}
