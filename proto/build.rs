//! Generates the bulkhead.v1 code. protoc comes from `protoc-bin-vendored` so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=bulkhead");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["bulkhead/v1/flow.proto", "bulkhead/v1/policy.proto"], &["."])?;
    Ok(())
}
