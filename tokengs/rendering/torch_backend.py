"""A differentiable pure-PyTorch rasterizer with gsplat 1.5.3's conventions (the CPU path).

Steps, as gsplat's "RGB+ED" rasterization with packed=False, eps2d 0.3, antialiasing off:
1. `project_gaussians`: EWA projection of every Gaussian into every camera, with gsplat's
   frustum-clamped Jacobian, the eps2d dilation, near/far and opacity culling and the
   opacity-aware footprint radius.
2. `rasterize_view`: per tile (16x16 by default), the Gaussians whose footprint box touches the tile, front
   to back by camera z, composited per pixel (`composite`): alpha = min(0.999, o exp(-sigma)),
   skipped below 1/255, stopping before the Gaussian that takes the transmittance to 1e-4 or
   below. Depth is composited as a fourth colour channel, like gsplat.

Memory: in a view of at least KEEP_GRAPH_MAX_PAIRS pixel x Gaussian pairs, each chunk of pairs
(at most PAIRS_PER_CHUNK) runs under activation checkpointing, so backward keeps only the
per-Gaussian inputs of each chunk and recomputes one chunk's pairwise tensors at a time; a smaller
view keeps its graphs (the demo's 48x80 training step, 32 views: 2.12 -> 1.44 s, peak memory
1.2 -> 2.0 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..gaussians import Gaussians
from .common import (ALPHA_THRESHOLD, AUTO_TILE, EPS2D, FRUSTUM_MARGIN, MAX_ALPHA, MAX_EXTEND, TILE_SIZE,
                     TRANSMITTANCE_THRESHOLD, RenderOutput, tile_span)

# Pixel x Gaussian pairs evaluated at once; about a dozen float tensors of this size live in a
# chunk's graph, so 2^21 pairs keep a chunk near 100 MB in float32.
PAIRS_PER_CHUNK = 1 << 21
# A view of fewer pairs in all keeps its chunks' graphs (under ~50 MB) instead of recomputing them
# in backward: recomputing costs a second forward, which small images pay for nothing.
KEEP_GRAPH_MAX_PAIRS = 1 << 20


@dataclass
class Projection:
    """Gaussians [B, N] seen from cameras [B, V]."""

    means2d: Tensor  # [B, V, N, 2] pixel coordinates of the centers
    conics: Tensor  # [B, V, N, 3] inverse of the dilated 2D covariance: (a, b, c) of [[a, b], [b, c]]
    depths: Tensor  # [B, V, N] camera-space z of the centers
    radii: Tensor  # [B, V, N, 2] int32 footprint half-extent in pixels; 0 where culled
    visible: Tensor  # [B, V, N] bool: not culled


def quats_to_rotmats(quats: Tensor) -> Tensor:
    """Quaternions w x y z [..., 4] (any norm; normalized here, as gsplat does) -> rotations [..., 3, 3]."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def project_gaussians(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int],
                      znear: float, zfar: float) -> Projection:
    """Gaussians [B, N], world-to-camera [B, V, 4, 4], (fx, fy, cx, cy) [B, V, 4] -> Projection."""
    height, width = image_hw
    rot_cam, t_cam = w2c[..., :3, :3], w2c[..., :3, 3]  # [B, V, 3, 3], [B, V, 3]
    means_cam = torch.einsum("bvij,bnj->bvni", rot_cam, gaussians.means) + t_cam[:, :, None, :]
    x, y, z = means_cam.unbind(-1)  # [B, V, N]
    in_depth_range = (z >= znear) & (z <= zfar)
    # culled Gaussians still flow through the arithmetic; a safe z keeps NaN out of the gradients
    z = torch.where(in_depth_range, z, torch.ones_like(z))

    fx, fy, cx, cy = (c[:, :, None] for c in intrinsics.unbind(-1))  # [B, V, 1]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    # gsplat evaluates the projection Jacobian at a point clamped to a frustum slightly wider
    # than the image, so Gaussians far off to the side do not get huge, smeared footprints.
    lim_x_pos = (width - cx) / fx + FRUSTUM_MARGIN * 0.5 * width / fx
    lim_x_neg = cx / fx + FRUSTUM_MARGIN * 0.5 * width / fx
    lim_y_pos = (height - cy) / fy + FRUSTUM_MARGIN * 0.5 * height / fy
    lim_y_neg = cy / fy + FRUSTUM_MARGIN * 0.5 * height / fy
    tx = z * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / z))
    ty = z * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / z))
    zero = torch.zeros_like(z)
    jacobian = torch.stack([fx / z, zero, -fx * tx / z**2, zero, fy / z, -fy * ty / z**2], dim=-1).unflatten(-1, (2, 3))

    # 2D covariance = (J W M)(J W M)^T with M = R(q) diag(s): never forms the [B, V, N, 3, 3] 3D covariance
    scaled_rot = quats_to_rotmats(gaussians.quats) * gaussians.scales[..., None, :]  # [B, N, 3, 3]
    half = jacobian @ rot_cam[:, :, None] @ scaled_rot[:, None]  # [B, V, N, 2, 3]
    cov2d = half @ half.transpose(-1, -2)
    a = cov2d[..., 0, 0] + EPS2D
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + EPS2D
    det = a * c - b * b
    positive = det > 0
    det = torch.where(positive, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)

    with torch.no_grad():
        opacities = gaussians.opacities[:, None, :].expand_as(z)
        opaque = opacities >= ALPHA_THRESHOLD
        # the box holds every pixel where alpha can reach 1/255: o exp(-k^2/2) = 1/255
        extend = torch.sqrt(2 * torch.log(opacities.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp(max=MAX_EXTEND)
        radii = torch.stack([torch.ceil(extend * a.sqrt()), torch.ceil(extend * c.sqrt())], dim=-1)
        u, v = means2d.detach().unbind(-1)
        on_image = (u + radii[..., 0] > 0) & (u - radii[..., 0] < width) & (v + radii[..., 1] > 0) & (v - radii[..., 1] < height)
        visible = in_depth_range & positive & opaque & on_image & (radii > 0).all(-1)
        radii = torch.where(visible[..., None], radii, torch.zeros_like(radii)).to(torch.int32)

    means2d = torch.where(visible[..., None], means2d, torch.zeros_like(means2d))
    return Projection(means2d=means2d, conics=conics, depths=z, radii=radii, visible=visible)


def composite(pixels: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Front-to-back compositing of n depth-sorted Gaussians onto P pixels.

    pixels [P, 2] pixel centers; means2d [n, 2]; conics [n, 3]; opacities [n]; features [n, F].
    Returns the accumulated features sum_i w_i f_i [P, F] and the final transmittance [P].
    """
    delta = means2d[None, :, :] - pixels[:, None, :]  # [P, n, 2]
    dx, dy = delta.unbind(-1)
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy
    alpha = (opacities * torch.exp(-sigma)).clamp(max=MAX_ALPHA)
    used = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    alpha = torch.where(used, alpha, torch.zeros_like(alpha))
    with torch.no_grad():
        # T only falls along the sorted list, so "this Gaussian would take T to <= 1e-4" holds
        # from the first such Gaussian on: exactly the ones gsplat's early stop leaves out.
        survives = torch.cumprod(1 - alpha, dim=1) > TRANSMITTANCE_THRESHOLD
    alpha = torch.where(survives, alpha, torch.zeros_like(alpha))
    # T before each Gaussian, and after the last one (1 with no Gaussian at all)
    transmittance = torch.cumprod(torch.cat([alpha.new_ones(len(alpha), 1), 1 - alpha], dim=1), dim=1)
    weights = alpha * transmittance[:, :-1]
    return weights @ features, transmittance[:, -1]


def _tile_pixels(ty: int, tx: int, tile_size: int, image_hw: tuple[int, int], like: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Pixel centers (x + 0.5, y + 0.5) of one tile, row-major [h * w, 2], and the tile's (h, w)."""
    height, width = image_hw
    ys = torch.arange(ty * tile_size, min((ty + 1) * tile_size, height), dtype=like.dtype, device=like.device) + 0.5
    xs = torch.arange(tx * tile_size, min((tx + 1) * tile_size, width), dtype=like.dtype, device=like.device) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2), (len(ys), len(xs))


def _composite_chunked(pixels: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor,
                       recompute: bool) -> tuple[Tensor, Tensor]:
    """`composite` over pixel chunks of at most PAIRS_PER_CHUNK pairs, each checkpointed if `recompute`."""
    step = max(1, PAIRS_PER_CHUNK // max(1, len(opacities)))
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, opacities, features))
    accumulated, transmittance = [], []
    for start in range(0, len(pixels), step):
        args = (pixels[start:start + step], means2d, conics, opacities, features)
        acc, trans = checkpoint(composite, *args, use_reentrant=False) if needs_graph and recompute else composite(*args)
        accumulated.append(acc)
        transmittance.append(trans)
    return torch.cat(accumulated), torch.cat(transmittance)


def rasterize_view(means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, depths: Tensor,
                   radii: Tensor, visible: Tensor, image_hw: tuple[int, int], tile_size: int = TILE_SIZE
                   ) -> tuple[Tensor, Tensor]:
    """One camera: per-Gaussian [N, ...] inputs -> accumulated features [H, W, F], transmittance [H, W].
    The tile size changes only the work: a Gaussian is skipped where its alpha is below 1/255."""
    height, width = image_hw
    ids = visible.nonzero().squeeze(1)
    ids = ids[torch.sort(depths[ids].detach(), stable=True).indices]  # front to back; ties keep index order
    means2d, conics, opacities, features = means2d[ids], conics[ids], opacities[ids], features[ids]
    with torch.no_grad():
        tile_lo, tile_hi = tile_span(means2d, radii[ids], tile_size)
    tiles = []  # per tile row: (pixels, (h, w), the Gaussians touching it) of each tile
    for ty in range(math.ceil(height / tile_size)):
        row = []
        for tx in range(math.ceil(width / tile_size)):
            touches = (tile_lo[:, 0] <= tx) & (tx < tile_hi[:, 0]) & (tile_lo[:, 1] <= ty) & (ty < tile_hi[:, 1])
            row.append((*_tile_pixels(ty, tx, tile_size, image_hw, means2d), touches.nonzero().squeeze(1)))
        tiles.append(row)
    recompute = sum(len(pixels) * len(sel) for row in tiles for pixels, _, sel in row) >= KEEP_GRAPH_MAX_PAIRS
    rows = []
    for row in tiles:
        parts = []
        for pixels, (h, w), sel in row:
            acc, trans = _composite_chunked(pixels, means2d[sel], conics[sel], opacities[sel], features[sel], recompute)
            parts.append(torch.cat([acc, trans[:, None]], dim=-1).reshape(h, w, -1))
        rows.append(torch.cat(parts, dim=1))
    out = torch.cat(rows, dim=0)
    return out[..., :-1], out[..., -1]


def render_torch(gaussians: Gaussians, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int],
                 background: Tensor, znear: float, zfar: float, tile_size: int = TILE_SIZE,
                 depth: bool = True) -> RenderOutput:
    """Gaussians [B, N], w2c [B, V, 4, 4], intrinsics [B, V, 4], background [3] -> RenderOutput
    (depths None unless `depth`). tile_size AUTO_TILE renders with TILE_SIZE (the choice is gsplat's)."""
    tile_size = TILE_SIZE if tile_size == AUTO_TILE else tile_size
    proj = project_gaussians(gaussians, w2c, intrinsics, image_hw, znear, zfar)
    num_views = w2c.shape[1]
    views = []
    for b in range(w2c.shape[0]):
        for v in range(num_views):
            # depth rides along as a fourth colour, as in gsplat's RGB+D mode
            features = torch.cat([gaussians.colors[b], proj.depths[b, v, :, None]], dim=-1) if depth \
                else gaussians.colors[b]
            views.append(rasterize_view(proj.means2d[b, v], proj.conics[b, v], gaussians.opacities[b], features,
                                        proj.depths[b, v], proj.radii[b, v], proj.visible[b, v], image_hw, tile_size))
    accumulated = torch.stack([acc for acc, _ in views]).unflatten(0, (-1, num_views))  # [B, V, H, W, 3 or 4]
    transmittance = torch.stack([t for _, t in views]).unflatten(0, (-1, num_views))[..., None]  # [B, V, H, W, 1]
    images = accumulated[..., :3] + transmittance * background
    alphas = 1 - transmittance
    depths = _channels_first(accumulated[..., 3:] / alphas.clamp_min(1e-10)) if depth else None
    return RenderOutput(images=_channels_first(images), alphas=_channels_first(alphas), depths=depths,
                        means2d=proj.means2d, radii=proj.radii)


def _channels_first(images: Tensor) -> Tensor:
    """[B, V, H, W, C] -> [B, V, C, H, W]."""
    return images.permute(0, 1, 4, 2, 3)
