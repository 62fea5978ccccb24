"""The layers' kernels (`mimo.models.layer_kernels`: RMSNorm with its residual add, RoPE) against the reference
ops (`RMSNorm.reference`, `layers.rotary_reference`), on fresh random rows.

Without CUDA the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, which conftest sets); on a CUDA
machine the same tests run compiled on the GPU, plus a whole tiny language model through the kernel against the
same model through the reference norms.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton (pip install triton==3.6.0)")

from mimo.models import layer_kernels  # noqa: E402
from mimo.models.layers import RMSNorm, rotary_cos_sin, rotary_reference  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="without CUDA the kernel needs TRITON_INTERPRET=1 (conftest sets it unless it was set otherwise)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def norm_of(hidden, weight_dtype, seed):
    norm = RMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(hidden, generator=torch.Generator().manual_seed(seed)))
    return norm.to(DEVICE, weight_dtype)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4096), (7, 96), (2, 3, 40)])
def test_kernel_equals_the_reference_norm(shape, dtype, residual):
    seed = sum(shape) + residual
    generator = torch.Generator().manual_seed(seed)
    norm = norm_of(shape[-1], dtype, seed)
    x = (3 * torch.randn(shape, generator=generator)).to(DEVICE, dtype)
    r = (3 * torch.randn(shape, generator=generator)).to(DEVICE, dtype) if residual else None
    got, want = layer_kernels.rms_norm(x, norm.weight, norm.eps, r), norm.reference(x, r)
    # Compiled, the kernel rounds to bf16 to nearest, as torch does; Triton's interpreter truncates instead, a bf16
    # unit in the last place per rounding apart (three roundings on the way to a normed row)
    exact_rounding = DEVICE.type == "cuda" or dtype == torch.float32
    if residual:
        (got, got_stream), (want, want_stream) = got, want
        if exact_rounding:
            assert torch.equal(got_stream, want_stream)  # the sum rounds once, in x's dtype, in both
        else:
            torch.testing.assert_close(got_stream, want_stream, rtol=2**-7, atol=0)
    assert got.dtype == want.dtype and got.shape == want.shape
    # only the sum of squares is reduced in another order: float32-close, or a bf16 rounding apart
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 0}
    torch.testing.assert_close(got, want, **(tolerance if exact_rounding else {"rtol": 3 * 2**-7, "atol": 0}))


def test_a_float32_weight_on_bf16_rows_gives_float32_as_the_reference():
    norm = norm_of(64, torch.float32, 1)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    got, want = layer_kernels.rms_norm(x, norm.weight, norm.eps), norm.reference(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2**-7 if DEVICE.type == "cuda" else 2**-6, atol=0)


def test_strided_rows_and_no_rows():
    norm = norm_of(32, torch.float32, 3)
    wide = torch.randn(6, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    x, r = wide[:, :32], wide[:, 32:]  # row stride 64
    (got, stream), (want, want_stream) = layer_kernels.rms_norm(x, norm.weight, norm.eps, r), norm.reference(x, r)
    assert torch.equal(stream, want_stream)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    empty = torch.empty(0, 32, device=DEVICE)
    assert layer_kernels.rms_norm(empty, norm.weight, norm.eps).shape == (0, 32)


def test_a_residual_of_another_shape_is_refused():
    norm = norm_of(32, torch.float32, 5)
    with pytest.raises(ValueError, match=r"residual torch.float32 \(3, 32\) must match x torch.float32 \(2, 32\)"):
        layer_kernels.rms_norm(torch.zeros(2, 32, device=DEVICE), norm.weight, norm.eps,
                                 torch.zeros(3, 32, device=DEVICE))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "head_dim", "rotary_dim"), [(4, 64, 64), (3, 192, 64), (2, 40, 24)])
def test_rotary_kernel_equals_the_reference(heads, head_dim, rotary_dim, dtype):
    generator = torch.Generator().manual_seed(heads * head_dim + rotary_dim)
    tokens = 5
    # q as the fused projection gives it: a view into wider rows (token stride above heads * head_dim)
    qkv = (4 * torch.randn(tokens, (heads + 1) * head_dim, generator=generator)).to(DEVICE, dtype)
    x = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    positions = torch.randint(0, 40_000, (tokens,), generator=generator).to(DEVICE)
    cos, sin = rotary_cos_sin(positions, rotary_dim, 10_000.0)
    got, want = layer_kernels.apply_rotary(x, cos, sin), rotary_reference(x, cos, sin)
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    if DEVICE.type == "cuda" or dtype == torch.float32:
        # every product and sum rounds where the reference's do
        differ = got != want
        assert not differ.any(), (f"{int(differ.sum())} of {got.numel()} differ, by up to "
                                  f"{float((got.float() - want.float()).abs().max()):.3e}; first: got "
                                  f"{got[differ][:4].tolist()} want {want[differ][:4].tolist()}")  # fmt: skip
    else:  # the interpreter truncates to bf16: three roundings of products up to |x|, then a difference
        torch.testing.assert_close(got, want, rtol=0, atol=3 * 2**-7 * float(x.abs().max()))


def test_rotary_takes_only_the_layouts_it_was_written_for():
    x = torch.zeros(3, 2, 8, device=DEVICE)
    cos = torch.zeros(3, 4, device=DEVICE)
    assert layer_kernels.rotary_fits(x, cos, cos)
    assert not layer_kernels.rotary_fits(x, cos[:2], cos[:2])  # another token count
    assert not layer_kernels.rotary_fits(x, torch.zeros(3, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE))
    assert not layer_kernels.rotary_fits(x.transpose(1, 2), cos, cos)
    with pytest.raises(ValueError, match=r"the kernel takes x \[T, heads, head_dim\]"):
        layer_kernels.apply_rotary(x[:, :, ::2], cos[:, :2], cos[:, :2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model-level comparison runs compiled on a GPU")
def test_a_language_model_through_the_kernel_equals_it_through_the_reference_norms(monkeypatch):
    from hf_reference import random_tiny_model
    from mimo.models.attention import NoCacheAttention

    model = random_tiny_model(DEVICE, seed=11).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(12)).to(DEVICE)
    positions = torch.arange(24, device=DEVICE)

    def logits():
        with torch.no_grad():
            return model.compute_logits(model(positions, NoCacheAttention([24]), model.embed(ids))).float()

    fused = logits()
    monkeypatch.setattr(layer_kernels, "available", lambda: False)
    reference = logits()
    assert (fused - reference).norm() / reference.norm() < 2e-2
    assert (fused.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
