"""Drives Nudge's Open Inference Protocol service with NVIDIA's tritonclient (the gRPC
client of Triton and KServe; pinned in tests/fixtures/requirements-triton.txt), as a model
client written for those servers would. Run by tests/integration/inference.rs.

usage: oip_client.py GRPC_ADDR MODEL ROWS_JSON

ROWS_JSON is a list of rows, each the model's features in ModelMetadata's order (null for a
missing one). Prints one JSON object: what the server said about itself and the model, the
probabilities (as IEEE-754 bit patterns) of the rows sent as FP64 and as FP32, and the error of a request with one
column too few.
"""

import json
import struct
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def infer(client, model, rows, dtype, datatype):
    data = np.array(rows, dtype=dtype)
    tensor = grpcclient.InferInput("features", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    wanted = [grpcclient.InferRequestedOutput("predict")]
    result = client.infer(model, [tensor], outputs=wanted, request_id="req-1")
    response = result.get_response()
    out = result.as_numpy("predict")
    return {
        "id": response.id,
        "model_version": response.model_version,
        "shape": list(out.shape),
        "datatype": response.outputs[0].datatype,
        # Bit patterns, so the comparison is exact through JSON.
        "probability_bits": [struct.unpack("<Q", struct.pack("<d", p))[0] for p in out.reshape(-1)],
    }


def main():
    addr, model, rows_json = sys.argv[1:4]
    rows = [[float("nan") if v is None else v for v in row] for row in json.loads(rows_json)]
    client = grpcclient.InferenceServerClient(url=addr)
    metadata = client.get_model_metadata(model)
    server = client.get_server_metadata()
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "version_ready": client.is_model_ready(model, metadata.versions[0]),
        "other_version_ready": client.is_model_ready(model, "no-such-version"),
        "unknown_ready": client.is_model_ready("no-such-model"),
        "server": server.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "input_shape": list(metadata.inputs[0].shape),
        "output": metadata.outputs[0].name,
        "fp64": infer(client, model, rows, np.float64, "FP64"),
        "fp32": infer(client, model, rows, np.float32, "FP32"),
    }
    try:
        infer(client, model, [row[:-1] for row in rows], np.float64, "FP64")
        report["short_row_error"] = None
    except InferenceServerException as e:
        report["short_row_error"] = {"status": e.status(), "message": e.message()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
