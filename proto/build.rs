//! Compiles `proto/idgraph/v1/*.proto` with protox (pure Rust, no system
//! `protoc`) and generates prost messages plus tonic clients and servers.
//! The encoded descriptor set is kept for gRPC server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/idgraph/v1/idgraph.proto", "proto/idgraph/v1/admin.proto", "proto/idgraph/v1/raft.proto"];
    let includes = ["proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, includes)?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("idgraph_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Messages serialise to JSON (idgraphctl --output json); Struct
        // fields go through `crate::json`.
        .type_attribute(".idgraph.v1", "#[derive(serde::Serialize)]")
        .field_attribute(".idgraph.v1.IdentifyRequest.traits", "#[serde(serialize_with = \"crate::json::serialize_struct\")]")
        .field_attribute(".idgraph.v1.Profile.traits", "#[serde(serialize_with = \"crate::json::serialize_struct\")]")
        .field_attribute(".idgraph.v1.RuleConflict.kind", "#[serde(serialize_with = \"crate::json::serialize_conflict_kind\")]")
        .compile_fds(fds)?;
    Ok(())
}
