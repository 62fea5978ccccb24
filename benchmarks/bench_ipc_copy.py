"""A CUDA IPC copy on one GPU, taken apart: is the direct write's time (bench_handoff) the copy into another
process's allocation, the copy engine's path there, or the host issuing it inside the event window?

The parent allocates 16.7 MB (one 1920x1080 image's rows) and passes its IPC handle to a child, which times the
same bytes copied into the parent's allocation by cudaMemcpyAsync (DeviceToDevice and Default kinds), by an SM
kernel (torch elementwise over a tensor aliasing the mapped pointer), and the same three into a buffer of its own.
Each: CUDA events around one copy, events around ten back to back (per copy), one copy after the GPU sat idle
for 3 ms (as between a lightly loaded server's requests), and the host's time to issue one call.
With `--owner-busy` the parent keeps its GPU context busy with matrix products meanwhile (two processes' contexts
time-slice one GPU without MPS). The parent checks the bytes arrived.

    python -m benchmarks.bench_ipc_copy [--owner-busy]          # on the GPU machine
"""

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import threading
import time

import torch
from cuda.bindings import runtime as rt

N = 16711680  # [2040, 4096] bf16


def ok(result):
    err, *values = result if isinstance(result, tuple) else (result,)
    assert int(err) == 0, err
    return values[0] if values else None


class _Aliased:
    """`__cuda_array_interface__` over a raw device pointer, so torch.as_tensor aliases it without a copy."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (pointer, False),
                                         "version": 3, "strides": None}


def owner(busy: bool) -> int:
    buf = torch.zeros(N, dtype=torch.uint8, device="cuda")
    handle = ok(rt.cudaIpcGetMemHandle(buf.data_ptr()))
    raw = bytes((ctypes.c_char * 64).from_address(handle.getPtr()))
    stop = threading.Event()

    def spin():
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            while not stop.is_set():
                for _ in range(20):
                    a @ a
                stream.synchronize()

    spinner = threading.Thread(target=spin, daemon=True) if busy else None
    if spinner:
        spinner.start()
    child = subprocess.run([sys.executable, "-m", "benchmarks.bench_ipc_copy", "--child", raw.hex()], timeout=120)
    stop.set()
    torch.cuda.synchronize()
    print(json.dumps({"owner_busy": busy, "owner_sees_nonzero_bytes": int((buf != 0).sum()), "of": N}), flush=True)
    return child.returncode


def child(handle_hex: str) -> None:
    handle = rt.cudaIpcMemHandle_t()
    ctypes.memmove(handle.getPtr(), bytes.fromhex(handle_hex), 64)
    torch.zeros(1, device="cuda")
    ok(rt.cudaSetDevice(0))
    pointer = int(ok(rt.cudaIpcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess)))
    src = torch.randint(1, 255, (N,), dtype=torch.uint8, device="cuda")
    local = torch.empty_like(src)
    remote = torch.as_tensor(_Aliased(pointer, N), device="cuda")
    assert remote.data_ptr() == pointer
    stream = torch.cuda.current_stream()

    def memcpy(dst: int, kind):
        return lambda: ok(rt.cudaMemcpyAsync(dst, src.data_ptr(), N, kind, stream.cuda_stream))

    def kernel(dst: torch.Tensor):  # an SM copy (bitwise or with 0 is exact), not the copy engine
        src64, dst64 = src.view(torch.int64), dst.view(torch.int64)
        return lambda: torch.bitwise_or(src64, 0, out=dst64)

    def events(fn, n=1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        for _ in range(n):
            fn()
        b.record(stream)
        b.synchronize()
        return a.elapsed_time(b) * 1000 / n

    d2d = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    cases = [("ipc cudaMemcpyAsync D2D", memcpy(pointer, d2d)),
             ("ipc cudaMemcpyAsync Default", memcpy(pointer, rt.cudaMemcpyKind.cudaMemcpyDefault)),
             ("ipc torch copy_", lambda: remote.copy_(src)),
             ("ipc SM kernel", kernel(remote)),
             ("local cudaMemcpyAsync D2D", memcpy(local.data_ptr(), d2d)),
             ("local torch copy_", lambda: local.copy_(src)),
             ("local SM kernel", kernel(local))]
    for name, fn in cases:
        for _ in range(5):
            events(fn)
        one = [events(fn) for _ in range(50)]
        ten = [events(fn, 10) for _ in range(10)]
        idle = []  # the GPU idle for 3 ms before each copy, as between the requests of a lightly loaded server
        for _ in range(30):
            time.sleep(0.003)
            idle.append(events(fn))
        issue = []
        for _ in range(50):
            t0 = time.perf_counter()
            fn()
            issue.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
        print(json.dumps({"copy": name, "one_copy_events_us": round(statistics.median(one), 1),
                          "one_copy_p90_us": round(sorted(one)[44], 1),
                          "ten_back_to_back_us_per_copy": round(statistics.median(ten), 1),
                          "one_copy_after_3ms_idle_us": round(statistics.median(idle), 1),
                          "host_issue_us": round(statistics.median(issue), 1),
                          "GB_s_one_copy": round(N / statistics.median(one) / 1e3, 1)}), flush=True)
    ok(rt.cudaIpcCloseMemHandle(pointer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owner-busy", action="store_true", help="the owner keeps the GPU busy meanwhile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
    else:
        sys.exit(owner(args.owner_busy))


if __name__ == "__main__":
    main()
