//! Compiles the .proto files with protox (a pure-Rust protobuf compiler), so a fresh machine
//! needs no system `protoc`, then generates prost types and tonic client/server stubs.

const PROTOS: &[&str] = &[
    "common/Common.proto",
    "common/Command.proto",
    "language-agent/Tracing.proto",
    "language-agent/Meter.proto",
    "management/Management.proto",
    "logging/Logging.proto",
    "event/Event.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo::rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    // The descriptor set is also written out so tests can compare our definitions with
    // independent ones (the apache-skywalking wheel's generated modules).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("skywalking.fds"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
