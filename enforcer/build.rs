//! Builds the enforcer's eBPF object (`enforcer/ebpf`); the steps are shared with the
//! other agent in `proto/abi/agent_build.rs`.

include!("../proto/abi/agent_build.rs");

fn main() {
    build_ebpf_object("bulkhead-enforcer-ebpf", "enforcer");
}
