"""A CUDA IPC copy on one GPU, taken apart: is the direct write's time (bench_handoff) the copy into another
process's allocation, or the host issuing it inside the event window?

The parent allocates 16.7 MB (one 1920x1080 image's rows) and passes its IPC handle to a child, which times four
copies of the same bytes: into the parent's allocation through cudaMemcpyAsync (DeviceToDevice and Default kinds),
and into a buffer of its own (torch copy_, cudaMemcpyAsync). Each: CUDA events around one copy, events around ten
back to back (per copy), and the host's time to issue one call. The parent checks the bytes arrived.

    python -m benchmarks.bench_ipc_copy          # on the GPU machine
"""

import ctypes
import statistics
import subprocess
import sys
import time

import torch
from cuda.bindings import runtime as rt

N = 16711680
def ok(r):
    err, *v = r if isinstance(r, tuple) else (r,)
    assert int(err) == 0, err
    return v[0] if v else None

if len(sys.argv) == 1:  # owner
    buf = torch.zeros(N, dtype=torch.uint8, device="cuda")
    h = ok(rt.cudaIpcGetMemHandle(buf.data_ptr()))
    raw = bytes((ctypes.c_char * 64).from_address(h.getPtr()))
    p = subprocess.run([sys.executable, __file__, raw.hex()], timeout=80)
    torch.cuda.synchronize()
    print("owner sees nonzero bytes:", int((buf != 0).sum()))
    sys.exit(p.returncode)

raw = bytes.fromhex(sys.argv[1])
h = rt.cudaIpcMemHandle_t(); ctypes.memmove(h.getPtr(), raw, 64)
torch.cuda.init(); torch.zeros(1, device="cuda")
ok(rt.cudaSetDevice(0))
ptr = int(ok(rt.cudaIpcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess)))
src = torch.randint(1, 255, (N,), dtype=torch.uint8, device="cuda")
local = torch.empty_like(src)
s = torch.cuda.current_stream()
def ev(fn, n=1):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(s)
    for _ in range(n): fn()
    b.record(s); b.synchronize()
    return a.elapsed_time(b) * 1000 / n
ipc = lambda: ok(rt.cudaMemcpyAsync(ptr, src.data_ptr(), N, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, s.cuda_stream))
ipc_default = lambda: ok(rt.cudaMemcpyAsync(ptr, src.data_ptr(), N, rt.cudaMemcpyKind.cudaMemcpyDefault, s.cuda_stream))
loc = lambda: local.copy_(src)
loc_rt = lambda: ok(rt.cudaMemcpyAsync(local.data_ptr(), src.data_ptr(), N, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, s.cuda_stream))
for name, fn in [("ipc cudaMemcpyAsync", ipc), ("ipc memcpy Default kind", ipc_default), ("local torch copy_", loc), ("local cudaMemcpyAsync", loc_rt)]:
    for _ in range(5): ev(fn)
    one = [ev(fn) for _ in range(50)]
    ten = [ev(fn, 10) for _ in range(10)]
    t = []
    for _ in range(50):
        t0 = time.perf_counter(); fn(); t.append((time.perf_counter() - t0) * 1e6); torch.cuda.synchronize()
    print(f"{name:26s} one/event {statistics.median(one):7.1f} us  ten back-to-back {statistics.median(ten):7.1f} us/copy  host issue {statistics.median(t):6.1f} us", flush=True)
ok(rt.cudaIpcCloseMemHandle(ptr))
