// Generates the gRPC admin service from proto/. Needs `protoc` (Debian:
// protobuf-compiler), which `make deps` installs; PROTOC may point at another one.
fn main() -> std::io::Result<()> {
    let file = "../../proto/enrichment/admin/v1/dead_letters.proto";
    println!("cargo:rerun-if-changed={file}");
    tonic_prost_build::configure().compile_protos(&[file], &["../../proto"])
}
