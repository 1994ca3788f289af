//! Compiles the gRPC contracts in `proto/` (Nudge's own service and the Open Inference
//! Protocol's) with the pure-Rust protox compiler, so building Nudge needs no system
//! `protoc`. The encoded descriptor set is kept for gRPC reflection.
//! Also compiles the part of ONNX's schema that the native scorer's ONNX import reads
//! (`src/model/native/onnx.proto`), as plain messages beside the contract's.

use protox::prost::Message;

/// ONNX's schema, kept apart from `proto/`: it is not Nudge's API, so neither gRPC
/// reflection nor the API lint rules see it.
const ONNX_PROTO: &str = "src/model/native/onnx.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/nudge/v1/nudge.proto",
        "proto/inference/grpc_predict_v2.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("nudge_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A tensor's bytes stay in the buffer they arrived in (no copy per request).
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(fds)?;

    let mut onnx = protox::compile([ONNX_PROTO], ["src/model/native"])?;
    // ONNX's comments are not Rust documentation (rustdoc would read some as code to
    // test): the generated messages go without them.
    for file in &mut onnx.file {
        file.source_code_info = None;
    }
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(onnx)?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed={ONNX_PROTO}");
    Ok(())
}
