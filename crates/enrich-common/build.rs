// Generates the envelope types from proto/. Needs `protoc` (Debian: protobuf-compiler),
// which `make deps` installs; PROTOC may point at another one.
fn main() -> std::io::Result<()> {
    let proto_root = "../../proto";
    let file = "../../proto/enrichment/v1/envelope.proto";
    println!("cargo:rerun-if-changed={file}");
    // sqlx::migrate! embeds migrations/ at compile time: rebuild when it changes.
    println!("cargo:rerun-if-changed=../../migrations");
    prost_build::Config::new().compile_protos(&[file], &[proto_root])
}
