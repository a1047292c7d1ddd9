"""gsplat 1.5.3 on CUDA: every scene and view of a batch in one `rasterization` call."""

from __future__ import annotations

import torch
from torch import Tensor

from ..gaussians import Gaussians
from .common import EPS2D, TILE_SIZE, RenderOutput, intrinsics_matrices


def render_gsplat(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int],
                  background: Tensor, znear: float, zfar: float, tile_size: int = TILE_SIZE) -> RenderOutput:
    """Gaussians [B, N], w2c [B, V, 4, 4], intrinsics [B, V, 4], background [3] -> RenderOutput."""
    from gsplat import rasterization  # imported here: the package needs CUDA to run

    height, width = image_hw
    batch, views = w2c.shape[:2]
    # gsplat takes leading batch dims: means [B, N, 3] with viewmats [B, V, 4, 4] render [B, V, ...]
    rendered, alphas, meta = rasterization(
        means=gaussians.means, quats=gaussians.quats, scales=gaussians.scales, opacities=gaussians.opacities,
        colors=gaussians.colors, viewmats=w2c, Ks=intrinsics_matrices(intrinsics), width=width, height=height,
        near_plane=znear, far_plane=zfar, eps2d=EPS2D, packed=False, render_mode="RGB+ED",
        backgrounds=background.expand(batch, views, 3), tile_size=tile_size,
    )  # rendered [B, V, H, W, 4], alphas [B, V, H, W, 1]
    radii = meta["radii"]  # [B, V, N, 2] int32, 0 where culled
    # gsplat leaves means2d of culled Gaussians uninitialised; zero them as the torch backend does
    means2d = torch.where((radii > 0).all(-1, keepdim=True), meta["means2d"], torch.zeros_like(meta["means2d"]))
    return RenderOutput(images=rendered[..., :3].permute(0, 1, 4, 2, 3), alphas=alphas.permute(0, 1, 4, 2, 3),
                        depths=rendered[..., 3:].permute(0, 1, 4, 2, 3), means2d=means2d, radii=radii)
