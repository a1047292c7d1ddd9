"""LayerNorm over each attention head's queries or keys, as one Triton kernel per direction.

torch's LayerNorm kernel gives every row its own thread block: with 64-channel rows (a head's
query) and 65k to 172k rows per call it ran at about a tenth of the memory bandwidth on an
H200, and the 43 per-head norms of one 6-view reconstruction took 4.0 of its 22.3 ms of GPU
time (`scripts/benchmark.py --profile`). Here a program normalizes BLOCK_ROWS rows at once,
reads the heads straight from the strided view that `split_heads` or the fused qkv projection
leaves (no contiguous copy first), and writes them contiguous, as attention takes them.

Statistics and the affine transform are computed in float32 from the input's dtype, as torch's
kernel does for half-precision inputs; gradients of weight and bias accumulate in float32.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # a torch build without Triton: HeadNorm keeps torch's kernel
    triton = None

log = logging.getLogger(__name__)
_unavailable: Optional[str] = None  # why the kernel could not be built here, once it could not
_ran = False  # it ran once: a later failure is not the toolchain's

# (rows per program, warps per program) of each kernel: the fastest of 20 (8-128 rows, 1-8 warps)
# on an H200 at 4096 and 10752 rows of 16 heads (within noise of most others)
FORWARD_LAUNCH = (16, 4)
BACKWARD_LAUNCH = (16, 1)


def supports(x: Tensor) -> bool:
    """Whether x [B, H, L, d] (channels contiguous, on a GPU, outside torch.compile) can take the kernel."""
    # torch.compile first: a compiled block fuses its own LayerNorm and traces nothing of this
    return (not torch.compiler.is_compiling() and triton is not None and _unavailable is None and x.is_cuda
            and x.dim() == 4 and x.stride(-1) == 1 and _span(x) < 2**31)  # int32 offsets in the kernels


def _span(x: Tensor) -> int:
    """Elements from x's first to its last (what the kernels' offsets must reach), at least its numel."""
    return max(x.numel(), 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())))


if triton is not None:
    @triton.jit
    def _load_rows(X, stride_b, stride_h, stride_l, num_heads, length, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr):
        """This program's rows of one head of X, in float32 [BLOCK_ROWS, BLOCK_D] (0 outside X),
        with the head's index (b * num_heads + h), the rows', the columns' and the mask."""
        head = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < length) & (cols[None, :] < D)
        x_ptrs = (X + (head // num_heads) * stride_b + (head % num_heads) * stride_h
                  + rows[:, None] * stride_l + cols[None, :])
        return head, rows, cols, mask, tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _forward_kernel(X, Y, W, Bias, Mean, Rstd, stride_b, stride_h, stride_l, num_heads, length, eps,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        head, rows, cols, mask, x = _load_rows(X, stride_b, stride_h, stride_l, num_heads, length, D, BLOCK_D,
                                               BLOCK_ROWS)
        mean = tl.sum(x, axis=1) / D
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        b = tl.load(Bias + cols, mask=cols < D, other=0.0).to(tl.float32)
        y = centered * rstd[:, None] * w[None, :] + b[None, :]
        row_ids = head * length + rows
        tl.store(Y + row_ids[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + row_ids, mean, mask=rows < length)
        tl.store(Rstd + row_ids, rstd, mask=rows < length)

    @triton.jit
    def _backward_kernel(X, DY, DX, W, Mean, Rstd, PartialW, PartialB, stride_b, stride_h, stride_l, num_heads,
                         length, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        head, rows, cols, mask, x = _load_rows(X, stride_b, stride_h, stride_l, num_heads, length, D, BLOCK_D,
                                               BLOCK_ROWS)
        row_ids = head * length + rows
        out_offsets = row_ids[:, None] * D + cols[None, :]
        dy = tl.load(DY + out_offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row_ids, mask=rows < length, other=0.0)
        rstd = tl.load(Rstd + row_ids, mask=rows < length, other=0.0)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        w_dy = dy * w[None, :]
        dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=1) / D)[:, None]
              - (tl.sum(w_dy, axis=1) / D)[:, None]) * rstd[:, None]
        tl.store(DX + out_offsets, dx.to(DX.dtype.element_ty), mask=mask)
        program = head * tl.num_programs(0) + tl.program_id(0)
        tl.store(PartialW + program * D + cols, tl.sum(dy * x_hat, axis=0), mask=cols < D)
        tl.store(PartialB + program * D + cols, tl.sum(dy, axis=0), mask=cols < D)


def _launch_shape(x: Tensor, launch: Tuple[int, int]) -> Tuple[Tuple[int, int], dict]:
    batch, heads, length, dim = x.shape
    rows, warps = launch
    grid = (triton.cdiv(length, rows), batch * heads)
    return grid, dict(D=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_ROWS=rows, num_warps=warps)


class _HeadLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        batch, heads, length, _ = x.shape
        grid, meta = _launch_shape(x, FORWARD_LAUNCH)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        mean = torch.empty(batch * heads * length, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        with torch.cuda.device_of(x):  # Triton launches on the current device, which need not be x's
            _forward_kernel[grid](x, y, weight, bias, mean, rstd, x.stride(0), x.stride(1), x.stride(2), heads,
                                  length, eps, **meta)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        batch, heads, length, dim = x.shape
        grid, meta = _launch_shape(x, BACKWARD_LAUNCH)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        partial_w = torch.empty(grid[0] * grid[1], dim, dtype=torch.float32, device=x.device)
        partial_b = torch.empty_like(partial_w)
        with torch.cuda.device_of(x):
            _backward_kernel[grid](x, dy.contiguous(), dx, weight, mean, rstd, partial_w, partial_b, x.stride(0),
                                   x.stride(1), x.stride(2), heads, length, **meta)
        return dx, partial_w.sum(0).to(weight.dtype), partial_b.sum(0).to(weight.dtype), None


def head_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Optional[Tensor]:
    """LayerNorm of x [B, H, L, d] over d (any strides with d contiguous) -> [B, H, L, d] contiguous, x's dtype.

    weight, bias [d] (float32 parameters are used as they are); differentiable in all three.
    None where the kernel cannot be built here (Triton compiles it at its first use, with the
    machine's C compiler): the warning says why, and `supports` is False from then on, so the
    caller's own LayerNorm takes over. A failure after a first success is raised.
    """
    global _unavailable, _ran
    try:
        out = _HeadLayerNorm.apply(x, weight, bias, eps)
    except Exception as exc:
        if _ran:
            raise
        _unavailable = f"{type(exc).__name__}: {exc}".strip()
        log.warning("the per-head LayerNorm kernel cannot run here (%s); torch's slower LayerNorm is used instead",
                    _unavailable.splitlines()[0])
        return None
    _ran = True
    return out
