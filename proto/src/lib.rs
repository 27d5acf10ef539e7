//! SkyWalking v3 protocol (package `skywalking.v3`): messages and gRPC stubs generated from
//! the .proto files beside this crate.

#[allow(clippy::all, missing_docs)]
pub mod v3 {
    tonic::include_proto!("skywalking.v3");
}

/// Our compiled descriptor set (`FileDescriptorSet`, protobuf-encoded).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/skywalking.fds"));
