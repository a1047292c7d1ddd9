"""gsplat 1.5.3 on CUDA: a batch's cameras in as few `rasterization` calls as memory allows."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..gaussians import Gaussians
from .common import (AUTO_TILE, EPS2D, LARGE_TILE, TILE_SIZE, RenderOutput, intrinsics_matrices, resolve_tile_size,
                     tile_pairs)

# gsplat sorts every (Gaussian, tile) pair of a call together, about BYTES_PER_PAIR each (keys,
# ids and their sorted copies). Scenes share a call while their pairs stay within
# MERGE_PAIRS_PER_CALL (~3 GB of sort buffers): more cameras a call keep more tiles in flight. A
# scene has a call of its own up to MAX_PAIRS_PER_CALL (~13 GB; at most 1/SORT_MEMORY_SHARE of
# the device's memory) and its views are split beyond it only: per-view calls of a fresh latent
# model took 1.5x the time of per-scene calls on an H200.
MERGE_PAIRS_PER_CALL = 2**27
MAX_PAIRS_PER_CALL = 2**29
BYTES_PER_PAIR = 24
SORT_MEMORY_SHARE = 8
# gsplat indexes a call's Gaussian x camera entries with 32-bit integers
MAX_ENTRIES_PER_CALL = 2**31 - 1


def render_gsplat(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int],
                  background: Tensor, znear: float, zfar: float, tile_size: int = TILE_SIZE,
                  depth: bool = True) -> RenderOutput:
    """Gaussians [B, N], w2c [B, V, 4, 4], intrinsics [B, V, 4], background [3] -> RenderOutput
    (depths None unless `depth`). tile_size AUTO_TILE: 16 or 32 pixels, as `resolve_tile_size`
    picks for these cameras."""
    max_pairs, max_cameras = call_limits(gaussians.means.shape[1], gaussians.means.device)
    sizes = (TILE_SIZE, LARGE_TILE) if tile_size == AUTO_TILE else (tile_size,)
    pairs = dict(zip(sizes, count_tile_pairs(gaussians, w2c, intrinsics, image_hw, znear, zfar, sizes=sizes,
                                             max_cameras=max_cameras)))
    tile_size = resolve_tile_size(tile_size, pairs.__getitem__)
    calls = plan_calls(pairs[tile_size], max_pairs, max_cameras, merge_pairs=min(MERGE_PAIRS_PER_CALL, max_pairs))
    per_scene: list[tuple[slice, list[RenderOutput]]] = []
    for scenes, views in calls:
        out = _rasterize(gaussians.map(lambda t: t[scenes]), w2c[scenes, views], intrinsics[scenes, views], image_hw,
                         background, znear, zfar, tile_size, depth)
        if per_scene and per_scene[-1][0] == scenes:  # the next views of the same scene
            per_scene[-1][1].append(out)
        else:
            per_scene.append((scenes, [out]))
    parts = [views[0] if len(views) == 1 else RenderOutput.cat(views, dim=1) for _, views in per_scene]
    return parts[0] if len(parts) == 1 else RenderOutput.cat(parts, dim=0)


def call_limits(num_gaussians: int, device: torch.device) -> tuple[int, int]:
    """(pairs, cameras) one call may take: the sort buffers' share of the device's memory, and
    gsplat's 32-bit index over Gaussians x cameras."""
    max_pairs = MAX_PAIRS_PER_CALL
    if device.type == "cuda":
        max_pairs = min(max_pairs, torch.cuda.get_device_properties(device).total_memory
                        // (SORT_MEMORY_SHARE * BYTES_PER_PAIR))
    return max_pairs, max(1, MAX_ENTRIES_PER_CALL // max(1, num_gaussians))


@torch.no_grad()
def count_tile_pairs(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int],
                     znear: float, zfar: float, sizes: tuple[int, ...] = (TILE_SIZE,),
                     max_cameras: Optional[int] = None) -> Tensor:
    """The pairs `rasterization` would sort per camera at each tile size -> [len(sizes), B, V]
    on the CPU (gsplat's own projection, max_cameras cameras at a time; one copy to the host)."""
    from gsplat import fully_fused_projection

    height, width = image_hw
    num_scenes, num_views = w2c.shape[:2]
    counts = torch.zeros(len(sizes), num_scenes, num_views, dtype=torch.float64, device=w2c.device)
    for scenes, views in plan_calls(torch.zeros(num_scenes, num_views), math.inf, max_cameras):
        radii, means2d, *_ = fully_fused_projection(
            gaussians.means[scenes], None, gaussians.quats[scenes], gaussians.scales[scenes], w2c[scenes, views],
            intrinsics_matrices(intrinsics[scenes, views]), width, height, eps2d=EPS2D, near_plane=znear,
            far_plane=zfar, opacities=gaussians.opacities[scenes])
        for index, size in enumerate(sizes):
            counts[index, scenes, views] = tile_pairs(means2d, radii, image_hw, size)
    return counts.cpu()


def plan_calls(pairs: Tensor, max_pairs: float, max_cameras: Optional[int] = None,
               merge_pairs: Optional[float] = None) -> list[tuple[slice, slice]]:
    """Cameras per call from the pairs of each [B, V] -> (scenes, views) slices, scene-major:
    consecutive whole scenes while their pairs stay within merge_pairs (default max_pairs) and
    their cameras within max_cameras; a scene above max_pairs or max_cameras alone, its
    consecutive views in chunks within both (at least one view each)."""
    num_scenes, num_views = pairs.shape
    max_cameras = max_cameras or num_scenes * num_views
    merge_pairs = max_pairs if merge_pairs is None else merge_pairs
    per_scene = pairs.sum(1).tolist()
    calls = []
    for scenes in _runs(per_scene, merge_pairs, max_cameras // num_views):
        if scenes.stop - scenes.start > 1 or (per_scene[scenes.start] <= max_pairs and num_views <= max_cameras):
            calls.append((scenes, slice(0, num_views)))
        else:
            calls += [(scenes, views) for views in _runs(pairs[scenes.start].tolist(), max_pairs, max_cameras)]
    return calls


def _runs(values: list[float], max_sum: float, max_count: int) -> list[slice]:
    """Consecutive runs of `values`, each as long as its sum stays within max_sum and its length
    within max_count (at least one value each)."""
    runs, start = [], 0
    while start < len(values):
        stop, total = start + 1, values[start]
        while stop < len(values) and total + values[stop] <= max_sum and stop + 1 - start <= max_count:
            total += values[stop]
            stop += 1
        runs.append(slice(start, stop))
        start = stop
    return runs


def _rasterize(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int],
               background: Tensor, znear: float, zfar: float, tile_size: int, depth: bool) -> RenderOutput:
    """One call: Gaussians [b, N] into cameras w2c [b, v, 4, 4] (gsplat's leading batch dims)."""
    from gsplat import rasterization  # imported here: the package needs CUDA to run

    height, width = image_hw
    batch, views = w2c.shape[:2]
    rendered, alphas, meta = rasterization(
        means=gaussians.means, quats=gaussians.quats, scales=gaussians.scales, opacities=gaussians.opacities,
        colors=gaussians.colors, viewmats=w2c, Ks=intrinsics_matrices(intrinsics), width=width, height=height,
        near_plane=znear, far_plane=zfar, eps2d=EPS2D, packed=False, render_mode="RGB+ED" if depth else "RGB",
        backgrounds=background.expand(batch, views, 3), tile_size=tile_size,
    )  # rendered [b, v, H, W, 3 + depth], alphas [b, v, H, W, 1]
    radii = meta["radii"]  # [b, v, N, 2] int32, 0 where culled
    # gsplat leaves means2d of culled Gaussians uninitialised; zero them as the torch backend does
    means2d = torch.where((radii > 0).all(-1, keepdim=True), meta["means2d"], torch.zeros_like(meta["means2d"]))
    return RenderOutput(images=rendered[..., :3].permute(0, 1, 4, 2, 3), alphas=alphas.permute(0, 1, 4, 2, 3),
                        depths=rendered[..., 3:].permute(0, 1, 4, 2, 3) if depth else None, means2d=means2d,
                        radii=radii)
