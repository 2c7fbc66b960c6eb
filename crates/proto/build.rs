//! Compiles proto/ with protox (pure Rust), so no protoc has to be installed or downloaded.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("metalkube/agent/v1/agent.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&root])?;
    tonic_prost_build::compile_fds(descriptors)?;
    Ok(())
}
