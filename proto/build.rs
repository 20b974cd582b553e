//! Compiles `synopsis/v1/*.proto` with protox (pure Rust, so no `protoc` is needed on a fresh
//! machine) and writes the descriptor set that gRPC reflection serves.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "synopsis/v1/common.proto",
    "synopsis/v1/trainer.proto",
    "synopsis/v1/generator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("synopsis_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::SynopsisCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
