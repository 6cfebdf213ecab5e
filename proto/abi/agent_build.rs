// Shared by the agents' build scripts (`collector/build.rs`, `enforcer/build.rs`) through
// `include!`: builds an agent's eBPF object with aya-build into `OUT_DIR`, where its
// `datapath` embeds it with `include_bytes_aligned!`.
//
// The eBPF crate is built with the *stable* toolchain plus `-Z build-std=core`, which
// needs `RUSTC_BOOTSTRAP=1`. It is set here, for the nested eBPF build only, so the
// outer build stays plain stable (EBPF.md, "Build wiring").

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
};

/// Where `cargo xtask setup` installs bpf-linker (EBPF.md toolchain recipe).
fn default_linker_dir() -> Option<PathBuf> {
    env::var_os("HOME").map(|home| Path::new(&home).join(".cache/bulkhead/bpf-linker/bin"))
}

fn find_on_path(path: &OsString, name: &str) -> Option<PathBuf> {
    env::split_paths(path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

/// Builds the eBPF crate `package` (in `<agent>/ebpf`) for the agent whose build script
/// includes this file; `agent` names it in messages.
fn build_ebpf_object(package: &'static str, agent: &str) {
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=HOME");
    // The ABI crate is a dependency of the eBPF crate, not only of ours: changes
    // there must rebuild the object too.
    println!("cargo:rerun-if-changed=../proto/abi");

    let path = env::var_os("PATH").unwrap_or_default();
    let linker = match find_on_path(&path, "bpf-linker") {
        Some(linker) => linker,
        None => {
            let Some(dir) = default_linker_dir().filter(|dir| dir.join("bpf-linker").is_file()) else {
                panic!(
                    "bpf-linker not found on PATH nor in $HOME/.cache/bulkhead/bpf-linker/bin: \
                     run `cargo xtask setup` (EBPF.md, toolchain recipe) to install it"
                );
            };
            let mut dirs = vec![dir.clone()];
            dirs.extend(env::split_paths(&path));
            let joined = env::join_paths(dirs).expect("PATH entries contain no separator");
            // SAFETY: build scripts are single-threaded at this point; the nested
            // cargo started by aya-build inherits this environment.
            unsafe { env::set_var("PATH", joined) };
            dir.join("bpf-linker")
        }
    };
    println!("cargo:rerun-if-changed={}", linker.display());

    // SAFETY: as above, no other thread reads the environment concurrently.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };

    // Build with the toolchain that builds us (rustup sets RUSTUP_TOOLCHAIN), so the
    // eBPF object and bpf-linker agree on the LLVM version they were checked with.
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    let root_dir = format!("{}/ebpf", env!("CARGO_MANIFEST_DIR"));
    let package = aya_build::Package { name: package, root_dir: &root_dir, ..Default::default() };
    if let Err(err) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)) {
        panic!("building the {agent}'s eBPF programs failed: {err:#}");
    }
}
