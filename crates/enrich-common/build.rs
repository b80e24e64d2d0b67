// Generates the envelope types from proto/. Needs `protoc` (Debian: protobuf-compiler),
// which `make deps` installs; PROTOC may point at another one.
fn main() -> std::io::Result<()> {
    let proto_root = "../../proto";
    let file = "../../proto/enrichment/v1/envelope.proto";
    println!("cargo:rerun-if-changed={file}");
    prost_build::Config::new().compile_protos(&[file], &[proto_root])
}
