//! Compiles the public contracts in `proto/` into Rust for the root crate.
//!
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine needs nothing but Rust;
//! `$PROTOC` overrides it (for platforms the vendored binaries do not cover).

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/sluice/limiter/v1/limiter.proto",
    "proto/sluice/queue/v1/queue.proto",
    "proto/envoy/service/ratelimit/v3/rls.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    let includes = [PathBuf::from("proto"), well_known];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("sluice_descriptor.bin"))
        .include_file("sluice_protos.rs")
        .compile_with_config(config, &protos, &includes)?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
