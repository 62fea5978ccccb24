"""Compiles the fused MoE kernels for sm_90 (H100 / H200) with triton's bundled ptxas, without a GPU, and prints one
JSON line per kernel variant: its shared memory and whether its loads were software-pipelined.

    python tests/fused_moe_hopper_compile.py SMALL_BATCH|SMALL_BATCH_FP8|LARGE_BATCH     (run by tests/test_fused_moe.py)
"""

import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mimo.models import fused_moe

POINTERS = {"x_ptr": "*bf16", "a_ptr": "*bf16", "out_ptr": "*bf16", "s_ptr": "*fp32", "srow_ptr": "*i64",
            "scol_ptr": "*i64", "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "pair_weight_ptr": "*fp32"}


def compile_for_hopper(kernel, fp8: bool, config: fused_moe.KernelConfig):
    """As a launch on the GPU specialises it: bf16 activations, 16-byte aligned tensors, strides and widths
    divisible by 16 (V2.5's are)."""
    pointers = POINTERS | {"w_ptr": "*fp8e4nv" if fp8 else "*bf16"}
    constexprs = {"FP8": fp8, "DOT_DTYPE": tl.bfloat16, "PRECISION": "tf32",
                  "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        signature[name] = "constexpr" if name in constexprs else pointers.get(name, "i32")
        if name in pointers or name.startswith("stride") or name in ("hidden", "inter"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def main() -> None:
    config = getattr(fused_moe, sys.argv[1])
    for kernel in (fused_moe._gate_up_silu_kernel, fused_moe._down_kernel):
        for fp8 in (False, True):
            compiled = compile_for_hopper(kernel, fp8, config)
            print(json.dumps({"kernel": kernel.fn.__name__, "fp8": fp8, "shared_bytes": compiled.metadata.shared,
                              "pipelined": "async_copy_global_to_local" in compiled.asm["ttgir"]}))


if __name__ == "__main__":
    main()
