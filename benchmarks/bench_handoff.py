"""The encoder -> language handoff on one GPU: a Triton server writing a GPU output into a landing slice of another
process's GPU memory (CUDA IPC), against a device-to-device copy of the same bytes measured in the same run.

The server runs one benchmark-only Python model that answers every request with the same [rows, hidden] bfloat16
tensor, already on the GPU (what mimo_encoder's rows are when they are ready), plus a 4-byte `ack`. This process
is the language side: it owns a `CudaRegion` (mimo.epd.landing, the landing pool's region) registered with that
server, and times requests that ask for

  - `ack` only: the request's fixed cost (no rows move);
  - the rows into the CUDA landing slice: the GPU-direct handoff of the disaggregated layout;
  - the rows into a system shared-memory region: the host path (device to host);
  - the rows as gRPC bytes: what crosses hosts without shared memory (the `grpc` handoff mode).

handoff cost = median(rows into the slice) - median(ack only) at the client, where the modes are interleaved
request by request so drift hits them alike; and, finer, from Triton's own statistics: each mode is also run as a
block of requests and the model's mean `compute_output` (the backend moving its outputs into the response buffers,
here the landing slice) read from the statistics before and after. The limit is the device-to-device copy of the
same bytes (torch, CUDA events).

    python -m benchmarks.bench_handoff --rows 2040 --hidden 4096 --requests 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient

from mimo.epd.landing import CudaRegion, SystemShmRegion

MODEL = "rows_source"
MODEL_PY = '''
import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        rows, hidden = {rows}, {hidden}
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        self.rows = torch.randn(rows, hidden, device=device).to(torch.bfloat16)

    def execute(self, requests):
        out = []
        for request in requests:
            tensors = [pb_utils.Tensor.from_dlpack("rows", torch.utils.dlpack.to_dlpack(self.rows)),
                       pb_utils.Tensor("ack", np.ones([1], np.int32))]
            out.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return out
'''
CONFIG = """
name: "rows_source"
backend: "python"
max_batch_size: 0
input [ {{ name: "request" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "rows" data_type: TYPE_BF16 dims: [ {rows}, {hidden} ] }},
         {{ name: "ack" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_GPU gpus: [ {gpu} ] }} ]
parameters {{ key: "FORCE_CPU_ONLY_INPUT_TENSORS" value {{ string_value: "no" }} }}
"""


def write_repository(root: Path, rows: int, hidden: int, gpu: int) -> Path:
    repository = root / "model_repository"
    (repository / MODEL / "1").mkdir(parents=True, exist_ok=True)
    (repository / MODEL / "config.pbtxt").write_text(textwrap.dedent(CONFIG.format(rows=rows, hidden=hidden, gpu=gpu)))
    (repository / MODEL / "1" / "model.py").write_text(MODEL_PY.format(rows=rows, hidden=hidden))
    return repository


def d2d_copy_ms(byte_size: int, device: torch.device, repeats: int = 50) -> float:
    """Median of `repeats` copies of `byte_size` bytes between two device buffers (CUDA events)."""
    source = torch.randint(0, 255, (byte_size,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[5:])


def model_statistics(client) -> dict[str, int]:
    """Cumulative ns of the model's compute phases (Triton's inference statistics)."""
    stats = client.get_inference_statistics(MODEL).model_stats[0].inference_stats
    return {"compute_output_ns": stats.compute_output.ns, "compute_infer_ns": stats.compute_infer.ns,
            "compute_input_ns": stats.compute_input.ns}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2040, help="table rows (one 1920x1080 image: 2040)")
    parser.add_argument("--hidden", type=int, default=4096, help="row width (MiMo-V2.5: 4096)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per mode")
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench_handoff"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from tools.server_process import TritonServer

    byte_size = args.rows * args.hidden * 2
    repository = write_repository(args.workdir, args.rows, args.hidden, args.gpu)
    server = TritonServer(repository, args.workdir / "tritonserver.log",
                          extra_args=[f"--cuda-memory-pool-byte-size={args.gpu}:{4 * byte_size}"]).start()
    device = torch.device("cuda", args.gpu)
    cuda_region = CudaRegion(byte_size, args.gpu, key_prefix="mimo_bench_")
    host_region = SystemShmRegion(byte_size, key_prefix="mimo_bench_")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        cuda_region.register(client)
        host_region.register(client)
        request = grpcclient.InferInput("request", [1], "INT32")
        request.set_data_from_numpy(np.zeros([1], np.int32))

        def outputs(mode: str) -> list[grpcclient.InferRequestedOutput]:
            if mode == "ack_only":
                return [grpcclient.InferRequestedOutput("ack")]
            rows = grpcclient.InferRequestedOutput("rows")
            if mode in ("cuda_ipc", "system_shm"):
                region = cuda_region if mode == "cuda_ipc" else host_region
                rows.set_shared_memory(region.name, byte_size, 0)
            return [rows, grpcclient.InferRequestedOutput("ack")]

        modes = ("ack_only", "cuda_ipc", "system_shm", "grpc_bytes")
        times = {mode: [] for mode in modes}
        expected = None
        for index in range(args.requests + 10):  # 10 warm-up rounds
            for mode in modes:
                start = time.perf_counter()
                result = client.infer(MODEL, [request], outputs=outputs(mode))
                elapsed = time.perf_counter() - start
                if mode == "grpc_bytes" and expected is None:
                    expected = torch.from_numpy(result.as_numpy("rows").view(np.int16).copy())
                if index >= 10:
                    times[mode].append(1000 * elapsed)
        server_us = {}  # mode -> mean compute_output / compute_infer per request, from Triton's statistics
        for mode in modes:
            before = model_statistics(client)
            for _ in range(args.requests):
                client.infer(MODEL, [request], outputs=outputs(mode))
            after = model_statistics(client)
            server_us[mode] = {key.replace("_ns", "_us"): (after[key] - before[key]) / args.requests / 1000
                               for key in after}  # fmt: skip
        # the rows really landed in the GPU region (and the host one), bit for bit
        landed = cuda_region.view(0, byte_size).view(torch.int16).reshape(args.rows, args.hidden).cpu()
        host = host_region.view(0, byte_size).view(torch.int16).reshape(args.rows, args.hidden)
        assert torch.equal(landed, expected.reshape(args.rows, args.hidden)), "CUDA slice differs from the rows"
        assert torch.equal(host, expected.reshape(args.rows, args.hidden)), "system slice differs from the rows"
        copy_ms = d2d_copy_ms(byte_size, device)
    finally:
        for region in (cuda_region, host_region):
            try:
                region.unregister(client)
            except Exception:  # noqa: BLE001 - the server may be gone
                pass
            region.close()
        client.close()
        server.stop()

    median = {mode: statistics.median(values) for mode, values in times.items()}
    spread = {mode: [float(np.percentile(v, 10)), float(np.percentile(v, 90))] for mode, v in times.items()}
    report = {
        "device": torch.cuda.get_device_name(device), "rows": args.rows, "hidden": args.hidden, "bytes": byte_size,
        "request_median_ms": median, "request_p10_p90_ms": spread,
        "d2d_copy_ms": copy_ms, "d2d_copy_gb_s": byte_size / copy_ms / 1e6,
        "client_handoff_ms": {mode: median[mode] - median["ack_only"] for mode in ("cuda_ipc", "system_shm",
                                                                                 "grpc_bytes")},
    }  # fmt: skip
    report["server_us_per_request"] = server_us
    output_us = {mode: server_us[mode]["compute_output_us"] for mode in modes}
    report["server_handoff_us"] = {mode: output_us[mode] - output_us["ack_only"]
                                   for mode in ("cuda_ipc", "system_shm", "grpc_bytes")}  # fmt: skip
    report["cuda_ipc_server_handoff_vs_d2d_copy"] = report["server_handoff_us"]["cuda_ipc"] / (1000 * copy_ms)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
