"""Rendering Gaussians into cameras: `render`, with gsplat on CUDA and a pure-PyTorch rasterizer elsewhere."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..data.types import Views
from ..gaussians import Gaussians
from .common import AUTO_TILE, BgColor, RenderOutput, background_tensor, intrinsics_matrices
from .gsplat_backend import render_gsplat
from .torch_backend import render_torch

__all__ = ["render", "render_chunked", "render_path", "resolve_backend", "RenderOutput", "intrinsics_matrices"]

_BACKENDS = {"gsplat": render_gsplat, "torch": render_torch}


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'gsplat' for CUDA tensors, else 'torch'; an explicit choice is checked against the device."""
    if backend == "auto":
        return "gsplat" if device.type == "cuda" else "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"render_backend={backend!r} is not known; use one of 'auto', {', '.join(map(repr, _BACKENDS))}")
    if backend == "gsplat" and device.type != "cuda":
        raise ValueError(f"render_backend='gsplat' needs CUDA tensors, got {device}; use --render_backend torch or auto")
    return backend


def render(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int], bg_color: BgColor,
           znear: float, zfar: float, backend: str = "auto", view_chunk_size: Optional[int] = None,
           tile_size: int = AUTO_TILE, depth: bool = True) -> RenderOutput:
    """Render Gaussians [B, N] into cameras [B, V].

    w2c: [B, V, 4, 4] world-to-camera (OpenCV axes); intrinsics: [B, V, 4] (fx, fy, cx, cy) in pixels;
    image_hw: (H, W); bg_color: [3]. view_chunk_size renders that many views per call (bounds memory
    for many views, e.g. evaluation's 50 targets); None renders all views at once. tile_size: the
    rasterizer's tile edge in pixels, AUTO_TILE (0) to let gsplat's backend pick 16 or 32 (speed and
    memory only). depth=False leaves `depths` None: the losses do not read it, and the rasterizer
    then carries three channels instead of four (images and alphas are the same either way).
    Rendering runs in float32 (float64 stays float64, for gradient checks) with autocast off.
    """
    device = gaussians.means.device
    rasterize = _BACKENDS[resolve_backend(backend, device)]
    dtype = torch.float64 if gaussians.means.dtype == torch.float64 else torch.float32
    gaussians = gaussians.map(lambda t: t.to(dtype))
    w2c, intrinsics = w2c.to(dtype), intrinsics.to(dtype)
    background = background_tensor(bg_color, gaussians.means)
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    num_views = w2c.shape[1]
    step = num_views if view_chunk_size is None else view_chunk_size
    with torch.autocast(device_type=device.type, enabled=False):
        parts = [rasterize(gaussians, w2c[:, s:s + step], intrinsics[:, s:s + step], image_hw, background, znear, zfar,
                           tile_size, depth) for s in range(0, num_views, step)]
    return parts[0] if len(parts) == 1 else RenderOutput.cat(parts, dim=1)


def render_chunked(opt, gaussians: Union[Gaussians, Tensor], views: Views,
                   chunk_size: Optional[int] = None, depth: bool = True) -> RenderOutput:
    """Render Gaussians (a Gaussians [B, N] or packed [B, N, 14]) into the cameras of views [B, V]
    at their image size, with the options' background, planes, backend and tile size,
    `chunk_size` views at a time (evaluation passes opt.eval_render_chunk_size); depth as in `render`."""
    return _render_with_options(opt, gaussians, views.w2c, views.intrinsics, views.image_hw, chunk_size, depth)


def render_path(opt, gaussians: Gaussians, c2ws: Tensor, intrinsics: Tensor, chunk_size: int = 8) -> Tensor:
    """Frames of ONE scene's Gaussians [1, N] seen along a camera path c2ws [F, 4, 4] (OpenCV
    camera-to-world) with the same intrinsics [4] throughout, at opt.img_size -> images [F, 3, H, W] in [0, 1]."""
    rendered = _render_with_options(opt, gaussians, torch.linalg.inv(c2ws)[None], intrinsics.expand(len(c2ws), 4)[None],
                                    opt.img_size, chunk_size, depth=False)
    return rendered.images[0].clamp(0, 1)


def _render_with_options(opt, gaussians: Union[Gaussians, Tensor], w2c: Tensor, intrinsics: Tensor,
                         image_hw: tuple[int, int], chunk_size: Optional[int], depth: bool) -> RenderOutput:
    if isinstance(gaussians, Tensor):
        gaussians = Gaussians.unpack(gaussians)
    return render(gaussians, w2c, intrinsics, image_hw, opt.bg_rgb, opt.znear, opt.zfar, backend=opt.render_backend,
                  view_chunk_size=chunk_size, tile_size=opt.render_tile_size, depth=depth)
