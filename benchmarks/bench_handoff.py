"""The encoder -> language handoff on one GPU: an encoder process writing a ready GPU table into a landing slice of
another process's GPU memory (handoff shm: mimo.epd.direct_write, CUDA IPC), against a device-to-device copy of the
same bytes measured in the same run.

The server runs one benchmark-only Python model holding the same [rows, hidden] bfloat16 tensor on the GPU (what
mimo_encoder's rows are when they are ready). A request that names a landing slice (`SliceTarget` tensors, as
encode_item's) has the model write the rows there with mimo_encoder's own `SliceWriter` (the region mapped once,
one cudaMemcpyAsync, CUDA events, synchronized before the answer) and answer the write's time (`handoff_us`);
otherwise it answers through Triton. This process is the language side: it owns a `CudaRegion` (the landing pool's
region) and times requests, interleaved request by request so drift hits them alike, that ask for

  - `ack` only: the request's fixed cost (no rows move);
  - `direct_write`: the rows written into the CUDA landing slice by the model (what handoff shm does now);
  - `triton_output`: the rows as a Triton output into the same region registered with the server (what handoff shm
    did before: the Python backend opens the response buffer's IPC mapping per response);
  - `grpc_bytes`: the rows as gRPC bytes (the `grpc` handoff mode).

The issue's bound: the encoder-measured write of the table (median `handoff_us`) at most 1.5x the D2D copy of the
same bytes (torch, CUDA events) in the same run: `direct_write_vs_d2d_copy`. Triton's statistics give the model's
mean `compute_output` per mode (blocks of requests), for the old path's cost.

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

from mimo.epd.direct_write import LANDING_INPUTS, OUTPUT_BYTE_SIZE, SliceTarget
from mimo.epd.handoff import HANDOFF_US, TABLE_SHAPE
from mimo.epd.landing import CudaRegion

MODEL = "rows_source"
MODEL_PY = '''
import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from mimo.epd.direct_write import LANDING_INPUTS, OUTPUT_BYTE_SIZE, SliceTarget, SliceWriter


class TritonPythonModel:
    def initialize(self, args):
        rows, hidden = {rows}, {hidden}
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        self.rows = torch.randn(rows, hidden, device=device).to(torch.bfloat16)
        self.local = torch.empty_like(self.rows)
        generator = torch.Generator(device=device).manual_seed(0)
        self.features = torch.randn(rows, 4 * hidden, device=device, generator=generator).to(torch.bfloat16)
        self.projection = torch.randn(4 * hidden, hidden, device=device, generator=generator).to(torch.bfloat16)
        if {produce}:
            self.produce()  # the same rows at every request
        self.writer = SliceWriter()

    def local_copy_us(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.local.copy_(self.rows)
        end.record()
        end.synchronize()
        return 1000 * start.elapsed_time(end)

    def produce(self):
        """The rows made by a GEMM just before the write, as mimo_encoder's merger makes them: the write then
        follows GPU work, as in serving, instead of a GPU idle since the previous request."""
        torch.matmul(self.features, self.projection, out=self.rows)

    def execute(self, requests):
        out = []
        for request in requests:
            if {produce}:
                self.produce()
            arrays = {{name: pb_utils.get_input_tensor_by_name(request, name) for name in (*LANDING_INPUTS,
                                                                                      OUTPUT_BYTE_SIZE)}}
            target = SliceTarget.from_inputs({{k: v.as_numpy() for k, v in arrays.items() if v is not None}})
            seconds = 0.0 if target is None else self.writer.write(self.rows, target)
            rewrite_us = 0.0 if target is None else 1e6 * self.writer.write(self.rows, target)
            local_us = 0.0 if target is None else self.local_copy_us()
            tensors = [pb_utils.Tensor("ack", np.ones([1], np.int32)),
                       pb_utils.Tensor("table_shape", np.array(self.rows.shape, np.int64)),
                       pb_utils.Tensor("handoff_us", np.array([seconds * 1e6], np.float64)),
                       pb_utils.Tensor("rewrite_us", np.array([rewrite_us], np.float64)),
                       pb_utils.Tensor("local_copy_us", np.array([local_us], np.float64))]
            if target is None:
                tensors.append(pb_utils.Tensor.from_dlpack("rows", torch.utils.dlpack.to_dlpack(self.rows)))
            out.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return out

    def finalize(self):
        self.writer.close()
'''
CONFIG = """
name: "rows_source"
backend: "python"
max_batch_size: 0
input [ {{ name: "request" data_type: TYPE_INT32 dims: [ 1 ] }},
        {{ name: "landing_region" data_type: TYPE_STRING dims: [ 1, 1 ] optional: true }},
        {{ name: "landing_cuda_handle" data_type: TYPE_UINT8 dims: [ 1, 64 ] optional: true }},
        {{ name: "landing_cuda_device" data_type: TYPE_INT64 dims: [ 1, 1 ] optional: true }},
        {{ name: "landing_region_byte_size" data_type: TYPE_INT64 dims: [ 1, 1 ] optional: true }},
        {{ name: "landing_offset" data_type: TYPE_INT64 dims: [ 1, 1 ] optional: true }},
        {{ name: "output_byte_size" data_type: TYPE_INT64 dims: [ 1, 1 ] optional: true }} ]
output [ {{ name: "rows" data_type: TYPE_BF16 dims: [ {rows}, {hidden} ] }},
         {{ name: "ack" data_type: TYPE_INT32 dims: [ 1 ] }},
         {{ name: "table_shape" data_type: TYPE_INT64 dims: [ 2 ] }},
         {{ name: "handoff_us" data_type: TYPE_FP64 dims: [ 1 ] }},
         {{ name: "rewrite_us" data_type: TYPE_FP64 dims: [ 1 ] }},
         {{ name: "local_copy_us" data_type: TYPE_FP64 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_GPU gpus: [ {gpu} ] }} ]
parameters {{ key: "FORCE_CPU_ONLY_INPUT_TENSORS" value {{ string_value: "{cpu_inputs}" }} }}
"""


def write_repository(root: Path, rows: int, hidden: int, gpu: int, cpu_inputs: bool = True,
                     produce: bool = False) -> Path:
    repository = root / "model_repository"
    (repository / MODEL / "1").mkdir(parents=True, exist_ok=True)
    config = CONFIG.format(rows=rows, hidden=hidden, gpu=gpu, cpu_inputs="yes" if cpu_inputs else "no")
    (repository / MODEL / "config.pbtxt").write_text(textwrap.dedent(config))
    (repository / MODEL / "1" / "model.py").write_text(MODEL_PY.format(rows=rows, hidden=hidden, produce=produce))
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
    parser.add_argument("--gpu-inputs", action="store_true",
                        help="FORCE_CPU_ONLY_INPUT_TENSORS no: Triton may place the small inputs in GPU memory (its "
                             "own copies on the GPU before each request); default yes, as mimo_encoder's config")
    parser.add_argument("--produce", action="store_true",
                        help="the model makes the rows by a GEMM (merger-sized: [rows, 4 hidden] x [4 hidden, hidden]) "
                             "right before each write, as mimo_encoder does, instead of holding them ready")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/bench_handoff"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from tools.server_process import TritonServer

    byte_size = args.rows * args.hidden * 2
    repository = write_repository(args.workdir, args.rows, args.hidden, args.gpu, cpu_inputs=not args.gpu_inputs,
                                  produce=args.produce)
    server = TritonServer(repository, args.workdir / "tritonserver.log",
                          extra_args=[f"--cuda-memory-pool-byte-size={args.gpu}:{4 * byte_size}"]).start()
    device = torch.device("cuda", args.gpu)
    direct_region = CudaRegion(byte_size, args.gpu, key_prefix="mimo_bench_")  # named in requests, registered nowhere
    output_region = CudaRegion(byte_size, args.gpu, key_prefix="mimo_bench_")  # registered: Triton's output path
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        output_region.register(client)
        request = grpcclient.InferInput("request", [1], "INT32")
        request.set_data_from_numpy(np.zeros([1], np.int32))
        landing = []
        for name, array in SliceTarget.of(direct_region, 0, byte_size).arrays().items():
            dtype = {np.dtype(np.object_): "BYTES", np.dtype(np.int64): "INT64", np.dtype(np.uint8): "UINT8"}
            landing.append(grpcclient.InferInput(name, list(array.shape), dtype[array.dtype]))
            landing[-1].set_data_from_numpy(array)
        assert {tensor.name() for tensor in landing} <= {*LANDING_INPUTS, OUTPUT_BYTE_SIZE}

        def call(mode: str):
            wanted = {"ack_only": ["ack"],
                      "direct_write": ["ack", TABLE_SHAPE, HANDOFF_US, "rewrite_us", "local_copy_us"],
                      "triton_output": ["ack", "rows"], "grpc_bytes": ["ack", "rows"]}[mode]  # fmt: skip
            outputs = [grpcclient.InferRequestedOutput(name) for name in wanted]
            if mode == "triton_output":
                outputs[1].set_shared_memory(output_region.name, byte_size, 0)
            inputs = [request, *landing] if mode == "direct_write" else [request]
            return client.infer(MODEL, inputs, outputs=outputs)

        modes = ("ack_only", "direct_write", "triton_output", "grpc_bytes")
        times = {mode: [] for mode in modes}
        write_us, rewrite_us, local_us = [], [], []  # the model's own: each direct write, the same write again at
        # once (the GPU busy a moment before), and then a copy between two of its own buffers
        expected = None
        for index in range(args.requests + 10):  # 10 warm-up rounds
            for mode in modes:
                start = time.perf_counter()
                result = call(mode)
                elapsed = time.perf_counter() - start
                if mode == "grpc_bytes" and expected is None:
                    expected = torch.from_numpy(result.as_numpy("rows").view(np.int16).copy())
                if index >= 10:
                    times[mode].append(1000 * elapsed)
                    if mode == "direct_write":
                        write_us.append(float(result.as_numpy(HANDOFF_US)[0]))
                        rewrite_us.append(float(result.as_numpy("rewrite_us")[0]))
                        local_us.append(float(result.as_numpy("local_copy_us")[0]))
        server_us = {}  # mode -> mean compute_output / compute_infer per request, from Triton's statistics
        for mode in modes:
            before = model_statistics(client)
            for _ in range(args.requests):
                call(mode)
            after = model_statistics(client)
            server_us[mode] = {key.replace("_ns", "_us"): (after[key] - before[key]) / args.requests / 1000
                               for key in after}  # fmt: skip
        # the rows really landed in both regions, bit for bit
        for region in (direct_region, output_region):
            landed = region.view(0, byte_size).view(torch.int16).reshape(args.rows, args.hidden).cpu()
            assert torch.equal(landed, expected.reshape(args.rows, args.hidden)), f"{region.name} differs from the rows"
        copy_ms = d2d_copy_ms(byte_size, device)
    finally:
        try:
            output_region.unregister(client)
        except Exception:  # noqa: BLE001 - the server may be gone
            pass
        for region in (direct_region, output_region):
            region.close()
        client.close()
        server.stop()

    median = {mode: statistics.median(values) for mode, values in times.items()}
    spread = {mode: [float(np.percentile(v, 10)), float(np.percentile(v, 90))] for mode, v in times.items()}
    write_median_us = statistics.median(write_us)
    report = {
        "device": torch.cuda.get_device_name(device), "gpu_inputs": args.gpu_inputs, "produce": args.produce,
        "rows": args.rows, "hidden": args.hidden, "bytes": byte_size,
        "request_median_ms": median, "request_p10_p90_ms": spread,
        "d2d_copy_ms": copy_ms, "d2d_copy_gb_s": byte_size / copy_ms / 1e6,
        "direct_write_us": {"median": write_median_us, "p10": float(np.percentile(write_us, 10)),
                            "p90": float(np.percentile(write_us, 90))},
        "direct_write_vs_d2d_copy": write_median_us / (1000 * copy_ms),
        "direct_rewrite_us": statistics.median(rewrite_us),  # the second of two writes back to back
        "model_local_copy_us": statistics.median(local_us),  # the same bytes between two of the model's buffers
        "direct_write_vs_model_local_copy": write_median_us / statistics.median(local_us),
        "client_handoff_ms": {mode: median[mode] - median["ack_only"] for mode in modes[1:]},
    }  # fmt: skip
    report["server_us_per_request"] = server_us
    output_us = {mode: server_us[mode]["compute_output_us"] for mode in modes}
    report["server_compute_output_us_over_ack"] = {mode: output_us[mode] - output_us["ack_only"] for mode in modes[1:]}
    triton_output_us = report["server_compute_output_us_over_ack"]["triton_output"]
    report["triton_output_vs_d2d_copy"] = triton_output_us / (1000 * copy_ms)
    print(json.dumps(report, indent=1))
    print(f"\n| D2D copy of {byte_size / 1e6:.1f} MB | encoder-measured write, median (p10-p90) | write / copy |")
    print("|---|---|---|")
    print(f"| {1000 * copy_ms:.1f} us | {write_median_us:.1f} us ({report['direct_write_us']['p10']:.1f}-"
          f"{report['direct_write_us']['p90']:.1f}) | {report['direct_write_vs_d2d_copy']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
