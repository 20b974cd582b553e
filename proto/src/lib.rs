//! The `synopsis.v1` gRPC API: generated messages, clients and servers, and the descriptor set
//! that the servers publish through gRPC reflection.

pub mod codec;

/// Messages and services of package `synopsis.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("synopsis.v1");
}

/// Encoded `FileDescriptorSet` of every synopsis proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/synopsis_descriptor.bin"));
