//! Builds the collector's eBPF object (`collector/ebpf`); the steps are shared with the
//! other agent in `proto/abi/agent_build.rs`.

include!("../proto/abi/agent_build.rs");

fn main() {
    build_ebpf_object("bulkhead-collector-ebpf", "collector");
}
