"""gsplat 1.5.3 on CUDA: one `rasterization` call per scene, all of its views at once."""

from __future__ import annotations

import torch
from torch import Tensor

from ..gaussians import Gaussians
from .common import EPS2D, TILE_SIZE, RenderOutput, intrinsics_matrices


def render_gsplat(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int],
                  background: Tensor, znear: float, zfar: float, tile_size: int = TILE_SIZE) -> RenderOutput:
    """Gaussians [B, N], w2c [B, V, 4, 4], intrinsics [B, V, 4], background [3] -> RenderOutput.

    Scene by scene: gsplat sorts every (Gaussian, tile) pair of a call at once, in buffers of
    about 24 bytes per pair, so one call over all B·V cameras would hold B times the sort buffers
    of one scene (large Gaussians reach 10^8 pairs per view). What a call keeps for backward is
    the same either way.
    """
    scenes = [_render_scene(gaussians.scene(b), w2c[b], intrinsics[b], image_hw, background, znear, zfar,
                            tile_size) for b in range(w2c.shape[0])]
    return RenderOutput.stack(scenes)


def _render_scene(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int],
                  background: Tensor, znear: float, zfar: float, tile_size: int) -> RenderOutput:
    """One scene: Gaussians [N], w2c [V, 4, 4], intrinsics [V, 4] -> RenderOutput of [V, ...] tensors."""
    from gsplat import rasterization  # imported here: the package needs CUDA to run

    height, width = image_hw
    rendered, alphas, meta = rasterization(
        means=gaussians.means, quats=gaussians.quats, scales=gaussians.scales, opacities=gaussians.opacities,
        colors=gaussians.colors, viewmats=w2c, Ks=intrinsics_matrices(intrinsics), width=width, height=height,
        near_plane=znear, far_plane=zfar, eps2d=EPS2D, packed=False, render_mode="RGB+ED",
        backgrounds=background.expand(w2c.shape[0], 3), tile_size=tile_size,
    )  # rendered [V, H, W, 4], alphas [V, H, W, 1]
    radii = meta["radii"]  # [V, N, 2] int32, 0 where culled
    # gsplat leaves means2d of culled Gaussians uninitialised; zero them as the torch backend does
    means2d = torch.where((radii > 0).all(-1, keepdim=True), meta["means2d"], torch.zeros_like(meta["means2d"]))
    return RenderOutput(images=rendered[..., :3].permute(0, 3, 1, 2), alphas=alphas.permute(0, 3, 1, 2),
                        depths=rendered[..., 3:].permute(0, 3, 1, 2), means2d=means2d, radii=radii)
