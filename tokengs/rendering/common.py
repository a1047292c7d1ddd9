"""What both rasterizer backends share: the output container, gsplat's constants, camera matrices.

The constants are gsplat 1.5.3's (its CUDA kernels hard-code them); the pure-PyTorch backend
uses them so that the two backends compute the same image from the same Gaussians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0  # alphas below this are skipped; opacities below it are culled
MAX_ALPHA = 0.999  # alpha = min(MAX_ALPHA, opacity * gaussian)
TRANSMITTANCE_THRESHOLD = 1e-4  # a pixel is done before the Gaussian that would take T to or below this
EPS2D = 0.3  # px^2 added to the diagonal of every 2D covariance (gsplat's low-pass dilation)
MAX_EXTEND = 3.33  # footprint bound in standard deviations
FRUSTUM_MARGIN = 0.3  # Jacobian clamp: tan-fov limits widened by 0.3 x tan(fov/2) on each side
TILE_SIZE = 16  # gsplat's tile: a Gaussian is evaluated on every pixel of every tile its box touches
AUTO_TILE = 0  # render_tile_size 0: gsplat's tile edge chosen per render (`resolve_tile_size`)
LARGE_TILE = 32  # the largest tile gsplat's kernels take (a thread per pixel, 1024 per block)
# 32-px tiles when the Gaussians' boxes make this many times the pairs at 16 px as at 32 px: only
# when nearly every box spans many tiles (the ratio is at most 4). Measured on an H200: a fresh
# latent model (ratio 3.9) trained 12-13% and tuned 38% faster with 32; trained-like Gaussians of
# a few pixels (ratio well under 2) render 2-18% slower with 32.
LARGE_TILE_PAIR_RATIO = 3.5

BgColor = Union[Tensor, Sequence[float]]


@dataclass
class RenderOutput:
    """Renders of B scenes into V cameras each."""

    images: Tensor  # [B, V, 3, H, W] rgb composited over the background
    alphas: Tensor  # [B, V, 1, H, W] accumulated opacity (1 - final transmittance)
    # [B, V, 1, H, W] expected z-depth: sum(w z) / alpha, 0 where alpha is 0; None where not asked for
    depths: Optional[Tensor]
    means2d: Tensor  # [B, V, N, 2] projected centers in pixels; 0 for Gaussians culled in that view
    radii: Tensor  # [B, V, N, 2] int32 footprint half-extent in pixels (x, y); 0 = culled in that view

    def map(self, fn) -> "RenderOutput":
        return RenderOutput(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                               for f in fields(self)})

    @staticmethod
    def cat(parts: list["RenderOutput"], dim: int) -> "RenderOutput":
        """Concatenate along scenes (dim 0) or views (dim 1)."""
        return RenderOutput(**{f.name: None if getattr(parts[0], f.name) is None
                               else torch.cat([getattr(p, f.name) for p in parts], dim=dim) for f in fields(RenderOutput)})


def intrinsics_matrices(intrinsics: Tensor) -> Tensor:
    """(fx, fy, cx, cy) [..., 4] -> pinhole matrices K [..., 3, 3], built with tensor ops."""
    fx, fy, cx, cy = intrinsics.unbind(-1)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    rows = (fx, zero, cx, zero, fy, cy, zero, zero, one)
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def background_tensor(bg_color: BgColor, like: Tensor) -> Tensor:
    """A background colour as a [3] tensor on `like`'s device and dtype."""
    bg = torch.as_tensor(bg_color, dtype=like.dtype)
    if bg.shape != (3,):
        raise ValueError(f"bg_color must be 3 values (rgb), got shape {tuple(bg.shape)}")
    if like.is_cuda and bg.device.type == "cpu":
        # a copy from pageable memory would wait for every queued kernel (one stall per render);
        # from pinned memory it is queued like a kernel
        bg = bg.pin_memory().to(like.device, non_blocking=True)
    else:
        bg = bg.to(like.device)
    return bg


def tile_span(means2d: Tensor, radii: Tensor, tile_size: int) -> tuple[Tensor, Tensor]:
    """The tiles each Gaussian's center +- radius box touches, per axis [first, last), unclipped
    (gsplat's intersection: floor(m/t - r/t), ceil(m/t + r/t)): means2d, radii [..., N, 2] px ->
    two [..., N, 2] in means2d's dtype."""
    center = means2d / tile_size
    reach = radii.to(means2d.dtype) / tile_size
    return torch.floor(center - reach), torch.ceil(center + reach)


def tile_pairs(means2d: Tensor, radii: Tensor, image_hw: tuple[int, int], tile_size: int = TILE_SIZE) -> Tensor:
    """The (Gaussian, tile) pairs a tile rasterizer sorts for each camera: means2d [..., N, 2] and
    radii [..., N, 2] (px; 0 where culled, where means2d may be anything: gsplat leaves it
    uninitialised) -> [...] float64: the tiles of `tile_span`, clipped to the image."""
    height, width = image_hw
    grid = torch.tensor([math.ceil(width / tile_size), math.ceil(height / tile_size)], device=radii.device)
    first, last = tile_span(means2d.float(), radii, tile_size)
    first, last = (torch.minimum(t.clamp(min=0), grid) for t in (first, last))
    pairs = torch.where((radii > 0).all(-1), (last - first).prod(-1), 0.0)
    return pairs.sum(-1, dtype=torch.float64)


def resolve_tile_size(tile_size: int, pairs_at: Callable[[int], Tensor]) -> int:
    """tile_size itself, or for AUTO_TILE the edge for cameras whose (Gaussian, tile) pairs at an
    edge are pairs_at(edge): LARGE_TILE when the Gaussians are much larger than a tile (at least
    LARGE_TILE_PAIR_RATIO times the pairs at TILE_SIZE), else TILE_SIZE."""
    if tile_size != AUTO_TILE:
        return tile_size
    small, large = float(pairs_at(TILE_SIZE).sum()), float(pairs_at(LARGE_TILE).sum())
    return LARGE_TILE if small >= LARGE_TILE_PAIR_RATIO * large else TILE_SIZE
