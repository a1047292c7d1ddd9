"""The Triton per-head LayerNorm against a float64 LayerNorm: outputs and all three gradients.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are
defined, hence a fresh process); on a GPU they run compiled.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton ships with torch's Linux builds; this torch has none")

ROOT = Path(__file__).resolve().parents[1]


def compare_with_layer_norm(device: str, dtype: torch.dtype, length: int, dim: int) -> None:
    """Heads taken from a fused qkv output (strided, as Attention hands them over), normalized by
    the kernel and by float64 F.layer_norm; asserts each result is within its dtype's rounding."""
    from tokengs.models.head_norm_kernel import head_layer_norm

    generator = torch.Generator().manual_seed(dim + length)
    batch, heads, eps = 2, 3, 1e-5
    qkv = (torch.randn(batch, length, 3, heads, dim, generator=generator) * 2 + 0.5).to(device, dtype)
    qkv.requires_grad_()
    x = qkv.permute(2, 0, 3, 1, 4)[1]  # the keys: [B, H, L, d], not contiguous
    weight = (1 + 0.2 * torch.randn(dim, generator=generator)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(dim, generator=generator)).to(device).requires_grad_()
    grad_out = torch.randn(batch, heads, length, dim, generator=generator).to(device, dtype)

    out = head_layer_norm(x, weight, bias, eps)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    reference = F.layer_norm(x64, (dim,), w64, b64, eps)
    reference.backward(grad_out.double())

    # one bfloat16 ulp, relative (float16 has finer ones; the interpreter truncates, a GPU rounds)
    rounding = 2.0**-22 if dtype == torch.float32 else 2.0**-7
    assert ((out.double() - reference).abs() <= rounding * reference.abs() + 1e-5).all()
    dx = qkv.grad.permute(2, 0, 3, 1, 4)[1].double()
    assert (qkv.grad.permute(2, 0, 3, 1, 4)[[0, 2]] == 0).all()  # queries and values get nothing
    assert (dx - x64.grad).abs().max() <= rounding * x64.grad.abs().max() * 4
    for ours, ref in ((weight.grad, w64.grad), (bias.grad, b64.grad)):
        assert ours.dtype == torch.float32
        assert (ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


CASES = [(torch.float32, 100, 64), (torch.bfloat16, 100, 64), (torch.bfloat16, 70, 48), (torch.float16, 40, 64)]


@pytest.mark.parametrize("dtype, length, dim", CASES)
def test_interpreted_kernel_equals_layer_norm(dtype, length, dim):
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import torch, test_head_norm_kernel as t; "
            f"t.compare_with_layer_norm('cpu', {dtype}, {length}, {dim})")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel runs on a GPU machine")
@pytest.mark.parametrize("dtype, length, dim", CASES + [(torch.bfloat16, 10752, 64)])
def test_compiled_kernel_equals_layer_norm(dtype, length, dim):
    compare_with_layer_norm("cuda", dtype, length, dim)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU: run on a two-GPU machine")
def test_kernel_runs_on_the_device_of_its_input_not_the_current_one():
    assert torch.cuda.current_device() == 0
    compare_with_layer_norm("cuda:1", torch.bfloat16, 100, 64)


def test_head_norm_takes_the_kernel_only_for_strided_4d_cuda_inputs():
    from tokengs.models import head_norm_kernel

    # the kernels' int32 offsets must reach x's last element: the span of the view, not its numel
    qkv = torch.arange(2 * 5 * 3 * 4 * 8).view(2, 5, 3, 4, 8)
    for x in qkv.permute(2, 0, 3, 1, 4):
        assert head_norm_kernel._span(x) == int(x.max() - x.min()) + 1 == 2 * 5 * 3 * 4 * 8 - 2 * 32

    assert not head_norm_kernel.supports(torch.zeros(1, 2, 3, 4))  # CPU: torch's LayerNorm
    if torch.cuda.is_available():
        assert head_norm_kernel.supports(torch.zeros(2, 5, 3, 4, device="cuda").transpose(1, 2))
        assert not head_norm_kernel.supports(torch.zeros(2, 3, 4, 5, device="cuda").transpose(2, 3))
        assert not head_norm_kernel.supports(torch.zeros(3, 4, device="cuda"))


def test_a_kernel_that_cannot_run_here_hands_over_to_torchs_layer_norm_with_one_warning(monkeypatch, caplog):
    """Triton builds the kernels at their first use; where that fails (here: CPU tensors, which it
    cannot launch on; on a GPU machine e.g. no C compiler), HeadNorm goes on with torch's LayerNorm."""
    import logging

    from tokengs.models import head_norm_kernel
    from tokengs.models.layers import HeadNorm

    monkeypatch.setattr(head_norm_kernel, "_unavailable", None)
    monkeypatch.setattr(head_norm_kernel, "_ran", False)
    monkeypatch.setattr(head_norm_kernel, "supports", lambda x: head_norm_kernel._unavailable is None)
    norm = HeadNorm(16, eps=1e-5)
    x = torch.randn(1, 2, 8, 16).bfloat16()
    with caplog.at_level(logging.WARNING), torch.autocast("cpu", dtype=torch.bfloat16):
        first, second = norm(x), norm(x)
    assert caplog.text.count("per-head LayerNorm kernel cannot run here") == 1, caplog.text
    assert head_norm_kernel._unavailable
    expected = F.layer_norm(x, (16,), norm.weight.bfloat16(), norm.bias.bfloat16(), 1e-5)
    assert torch.equal(first, expected) and torch.equal(second, expected)
