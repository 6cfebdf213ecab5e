//! The enforcer accepts the arguments and environment deploy/ gives it (the generated
//! Kubernetes manifests and its systemd unit); see `deploy/tests/agent_args.rs`.

#[path = "../../deploy/tests/agent_args.rs"]
mod agent_args;

#[test]
fn the_enforcer_accepts_what_deploy_gives_it() {
    agent_args::check("enforcer", env!("CARGO_BIN_EXE_bulkhead-enforcer"));
}
