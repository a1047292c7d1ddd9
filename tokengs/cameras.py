"""Camera math, as pure functions. Every convention of the project lives here, once.

Conventions:
- cameras are OpenCV (x right, y down, z forward) camera-to-world 4x4 matrices `c2w`; their
  inverses `w2c` (world-to-camera) are what the rasterizer and the loss project points with;
- intrinsics are (fx, fy, cx, cy) in pixels of the image they describe.

The functions take torch tensors with arbitrary leading dimensions unless a docstring says
otherwise; the readers convert their files' conventions to ours with the `*_to_opencv` ones.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Axis and world-frame conventions of the raw datasets
# ---------------------------------------------------------------------------------------------

# OpenGL / Blender / nerfstudio cameras look down -z with y up; OpenCV's look down +z with y
# down. The two differ by negating the camera's y and z axes, i.e. columns 1 and 2 of the
# rotation; the operation is its own inverse.
_GL_CV_FLIP = (1.0, -1.0, -1.0, 1.0)

# nerfstudio's COLMAP import (what DL3DV ships) permutes the world frame: it swaps the x and y
# rows of every camera-to-world and then negates the z row. This matrix undoes it (negate row 2,
# then swap rows 0 and 1), bringing cameras and points back to COLMAP's world.
NERFSTUDIO_TO_COLMAP_WORLD = torch.tensor(
    [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


def opengl_to_opencv(c2w: Tensor) -> Tensor:
    """[..., 4, 4] camera-to-world with OpenGL camera axes <-> OpenCV (the map is an involution)."""
    return c2w * c2w.new_tensor(_GL_CV_FLIP)


opencv_to_opengl = opengl_to_opencv


def nerfstudio_to_opencv(transform_matrix: Tensor) -> Tensor:
    """[..., 4, 4] nerfstudio `transform_matrix` (OpenGL axes, permuted world) -> OpenCV c2w in COLMAP's world."""
    world = NERFSTUDIO_TO_COLMAP_WORLD.to(transform_matrix)
    return opengl_to_opencv(world @ transform_matrix)


def opencv_to_nerfstudio(c2w: Tensor) -> Tensor:
    """Inverse of `nerfstudio_to_opencv` (what the synthetic generator writes)."""
    world = NERFSTUDIO_TO_COLMAP_WORLD.to(c2w)
    return world.transpose(-1, -2) @ opencv_to_opengl(c2w)


def nerfstudio_points_to_colmap(points: Tensor) -> Tensor:
    """[..., 3] points in nerfstudio's permuted world -> COLMAP's world (the frame of `nerfstudio_to_opencv`)."""
    return points @ NERFSTUDIO_TO_COLMAP_WORLD[:3, :3].to(points).transpose(0, 1)


def quaternion_to_matrix(quaternions: Tensor) -> Tensor:
    """[..., 4] quaternions w x y z (any norm) -> [..., 3, 3] rotation matrices."""
    q = quaternions / quaternions.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y))
    return torch.stack(rows, -1).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quaternion(rotations: Tensor) -> Tensor:
    """[..., 3, 3] rotations -> [..., 4] unit quaternions w x y z with w >= 0 (Shepperd's method)."""
    m = rotations
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate solutions; take, per matrix, the one whose pivot is largest (best conditioned).
    pivots = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    candidates = torch.stack([
        torch.stack([pivots[..., 0], m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], pivots[..., 1], m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1], pivots[..., 2], m[..., 2, 1] + m[..., 1, 2]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2], pivots[..., 3]], -1),
    ], -2)
    best = pivots.argmax(-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def kubric_to_opencv(positions: Tensor, quaternions: Tensor) -> Tensor:
    """Kubric metadata: positions [..., 3], quaternions [..., 4] (w x y z, OpenGL camera axes) -> OpenCV c2w [..., 4, 4]."""
    c2w = torch.zeros(positions.shape[:-1] + (4, 4), dtype=positions.dtype)
    c2w[..., :3, :3] = quaternion_to_matrix(quaternions)
    c2w[..., :3, 3] = positions
    c2w[..., 3, 3] = 1
    return opengl_to_opencv(c2w)


def w2c_to_c2w(w2c: Tensor) -> Tensor:
    """[..., 3, 4] or [..., 4, 4] world-to-camera -> [..., 4, 4] camera-to-world."""
    full = torch.zeros(w2c.shape[:-2] + (4, 4), dtype=w2c.dtype)
    full[..., :3, :] = w2c[..., :3, :]
    full[..., 3, 3] = 1
    return torch.linalg.inv(full)


# ---------------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------------

def normalized_to_pixel_intrinsics(normalized: Tensor, height: int, width: int) -> Tensor:
    """[..., 4] (fx/W, fy/H, cx/W, cy/H) (pixelSplat's storage) -> (fx, fy, cx, cy) in pixels of an H x W image."""
    return normalized * normalized.new_tensor([width, height, width, height])


def pixel_to_normalized_intrinsics(intrinsics: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `normalized_to_pixel_intrinsics`."""
    return intrinsics / intrinsics.new_tensor([width, height, width, height])


def rescale_intrinsics(intrinsics: Tensor, from_hw: Tuple[int, int], to_hw: Tuple[int, int]) -> Tensor:
    """[..., 4] intrinsics of an image of size from_hw -> the same camera imaged at to_hw (a plain resize)."""
    (h0, w0), (h1, w1) = from_hw, to_hw
    return intrinsics * intrinsics.new_tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0])


def center_crop_box(raw_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """The largest crop of a raw_hw image with out_hw's aspect ratio, centered: (top, left, crop_h, crop_w).

    crop = int(out * r) with r = min(Hr/H, Wr/W); offsets use Python's round (halves to even),
    as torchvision's center crop does and the release's fixtures require.
    """
    (hr, wr), (h, w) = raw_hw, out_hw
    r = min(hr / h, wr / w)
    crop_h, crop_w = int(h * r), int(w * r)
    return int(round((hr - crop_h) / 2.0)), int(round((wr - crop_w) / 2.0)), crop_h, crop_w


def crop_resize_intrinsics(intrinsics: Tensor, raw_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> Tensor:
    """[..., 4] raw-pixel intrinsics -> intrinsics after `center_crop_box` and a resize to out_hw.

    The principal point shifts by (crop - raw)/2, unrounded (the release's rule, even though the
    pixels are cut at a rounded offset), then x and y scale by out/crop.
    """
    (hr, wr), (h, w) = raw_hw, out_hw
    _, _, crop_h, crop_w = center_crop_box(raw_hw, out_hw)
    shift = intrinsics.new_tensor([0.0, 0.0, (crop_w - wr) / 2.0, (crop_h - hr) / 2.0])
    scale = intrinsics.new_tensor([w / crop_w, h / crop_h, w / crop_w, h / crop_h])
    return (intrinsics + shift) * scale


# ---------------------------------------------------------------------------------------------
# Camera normalization and scene scale
# ---------------------------------------------------------------------------------------------

def mean_camera(c2ws: Tensor) -> Tensor:
    """[V, 4, 4] cameras -> [4, 4] the 'mean' camera: mean position, mean forward axis, mean down
    axis made orthogonal to it (Gram-Schmidt), right = down x forward."""
    forward = c2ws[:, :3, 2].mean(0)
    forward = forward / forward.norm()
    down = c2ws[:, :3, 1].mean(0)
    down = down - (down @ forward) * forward
    down = down / down.norm()
    right = torch.linalg.cross(down, forward)
    frame = torch.eye(4, dtype=c2ws.dtype)
    frame[:3, 0], frame[:3, 1], frame[:3, 2], frame[:3, 3] = right, down, forward, c2ws[:, :3, 3].mean(0)
    return frame


def normalize_cameras(c2ws: Tensor, num_context: int, method: str) -> Tensor:
    """[V, 4, 4] cameras -> the same cameras expressed in a frame built from the context cameras
    (the first num_context): `first_cam` (the first camera becomes the identity) or `mean_cam`."""
    if method == "first_cam":
        reference = c2ws[0]
    elif method == "mean_cam":
        reference = mean_camera(c2ws[:num_context])
    else:
        raise ValueError(f"camera_normalization_method={method!r} is not known; use first_cam or mean_cam")
    return torch.linalg.inv(reference) @ c2ws


def backproject_depths(depths: Tensor, intrinsics: Tensor, c2ws: Tensor) -> Tensor:
    """World points of every valid pixel (depth > 1e-8): depths [V, 1, H, W], intrinsics [V, 4]
    in the depth maps' pixels, c2ws [V, 4, 4] -> [M, 3].

    Pixels sit at integer coordinates (u, v), not at their centers: the release's rule for the
    pointmap scale, kept so that the scale (and so every camera) matches it.
    """
    v_count, _, h, w = depths.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=c2ws.dtype), torch.arange(w, dtype=c2ws.dtype), indexing="ij")
    fx, fy, cx, cy = (intrinsics[:, i, None, None].to(c2ws.dtype) for i in range(4))
    z = depths[:, 0].to(c2ws.dtype)
    camera = torch.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], -1)  # [V, H, W, 3]
    world = camera @ c2ws[:, None, :3, :3].transpose(-1, -2) + c2ws[:, None, None, :3, 3]
    return world[z > 1e-8]


def scene_scale_factor(method: str, c2ws: Tensor, num_context: int, scene_scale: float,
                       depths: Optional[Tensor] = None, intrinsics: Optional[Tensor] = None,
                       trim: Tuple[float, float] = (0.0, 1.0)) -> float:
    """The factor camera translations are multiplied by, from NORMALIZED cameras c2ws [V, 4, 4].

    constant: scene_scale; distance: scene_scale / the largest distance of a context camera from
    the first; bound: scene_scale / the largest absolute coordinate of a context camera position;
    pointmap: scene_scale / the mean distance from the origin of the context views' points,
    back-projected from raw depths [V, 1, Hr, Wr] with raw intrinsics [V, 4], the distances kept
    within the trim = (lo, hi) quantile range.
    """
    positions = c2ws[:num_context, :3, 3]
    if method == "constant":
        extent = 1.0
    elif method == "distance":
        extent = float((positions - positions[0]).norm(dim=-1).max())
    elif method == "bound":
        extent = float(positions.abs().max())
    elif method == "pointmap":
        if depths is None or intrinsics is None:
            raise ValueError("camera_scale_method='pointmap' needs depth maps, and this dataset has none; "
                             "use constant, distance or bound")
        points = backproject_depths(depths[:num_context], intrinsics[:num_context], c2ws[:num_context])
        if points.shape[0] == 0:
            raise ValueError("camera_scale_method='pointmap': the context views hold no valid depth (all <= 1e-8)")
        distances = points.norm(dim=-1)
        lo, hi = trim
        if lo > 0.0 or hi < 1.0:
            bounds = torch.quantile(distances.double(), distances.new_tensor([lo, hi], dtype=torch.float64))
            distances = distances[(distances >= bounds[0]) & (distances <= bounds[1])]
        extent = float(distances.mean())
    else:
        raise ValueError(f"camera_scale_method={method!r} is not known; use constant, distance, bound or pointmap")
    if not math.isfinite(extent) or extent <= 0:
        raise ValueError(f"camera_scale_method={method!r} found a degenerate scene extent ({extent}); "
                         "the context cameras coincide or the depths are empty")
    return scene_scale / extent


def scale_translations(c2ws: Tensor, factor: float) -> Tensor:
    """[..., 4, 4] cameras with their translations multiplied by factor."""
    scaled = c2ws.clone()
    scaled[..., :3, 3] *= factor
    return scaled


# ---------------------------------------------------------------------------------------------
# Reflection (training augmentation)
# ---------------------------------------------------------------------------------------------

_REFLECT_X = (-1.0, 1.0, 1.0, 1.0)


def reflect_c2w(c2ws: Tensor) -> Tensor:
    """[..., 4, 4] cameras of a world mirrored in x, seeing left-right flipped images: F c2w F, F = diag(-1, 1, 1, 1)."""
    flip = c2ws.new_tensor(_REFLECT_X)
    return flip[:, None] * c2ws * flip


def reflect_intrinsics(intrinsics: Tensor, width: int) -> Tensor:
    """[..., 4] intrinsics of a left-right flipped image: cx -> W - cx (the release keeps cx; the
    mirror is exact also for off-center principal points, and equal for centered ones)."""
    reflected = intrinsics.clone()
    reflected[..., 2] = width - intrinsics[..., 2]
    return reflected


# ---------------------------------------------------------------------------------------------
# Rays and time
# ---------------------------------------------------------------------------------------------

def pixel_rays(c2ws: Tensor, intrinsics: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """Rays through pixel centers (u + 0.5, v + 0.5): c2ws [V, 4, 4], intrinsics [V, 4] ->
    origins [V, 3, H, W] and unit directions [V, 3, H, W] in world coordinates."""
    dtype = c2ws.dtype
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype) + 0.5, torch.arange(width, dtype=dtype) + 0.5,
                          indexing="ij")
    fx, fy, cx, cy = (intrinsics[:, i, None, None].to(dtype) for i in range(4))
    camera = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u - cx)], -1)  # [V, H, W, 3]
    # Normalizing in the camera frame (contiguous last axis) is cheaper and equal: rotations keep lengths.
    camera = camera / camera.norm(dim=-1, keepdim=True)
    directions = torch.einsum("vij,vhwj->vihw", c2ws[:, :3, :3], camera).contiguous()
    origins = c2ws[:, :3, 3, None, None].expand_as(directions).contiguous()
    return origins, directions


def plucker(origins: Tensor, directions: Tensor) -> Tensor:
    """Plücker coordinates (o x d, d): origins, directions [V, 3, H, W] -> [V, 6, H, W]."""
    ox, oy, oz = origins.unbind(1)
    dx, dy, dz = directions.unbind(1)
    moment = torch.stack([oy * dz - oz * dy, oz * dx - ox * dz, ox * dy - oy * dx], 1)
    return torch.cat([moment, directions], 1)


def time_embedding(timesteps: Tensor, dim: int) -> Tensor:
    """timesteps [..., V] (all views of a scene) -> [..., V, dim]: rescaled to [0, 1] by the scene's
    min and max (all zeros when they are equal), then [cos(t f_k) for k < dim/2, sin(t f_k) for
    k < dim/2], f_k = 10000^(-k / (dim/2))."""
    if dim % 2:
        raise ValueError(f"time_embedding_dim={dim} must be even (cos and sin pairs)")
    t = timesteps.to(torch.float32)
    lowest = t.amin(dim=-1, keepdim=True)
    span = t.amax(dim=-1, keepdim=True) - lowest
    # a tensor op, not a Python test of the span: on a GPU that test would wait for the device
    t = (t - lowest) / torch.where(span > 0, span, torch.ones_like(span))
    half = dim // 2
    frequencies = 10000.0 ** (-torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[..., None] * frequencies
    return torch.cat([torch.cos(angles), torch.sin(angles)], -1)


# ---------------------------------------------------------------------------------------------
# Camera paths for videos
# ---------------------------------------------------------------------------------------------

def orbit_path(c2ws: Tensor, num_frames: int, radius: Optional[float] = None) -> Tensor:
    """A closed circle of cameras around the mean of `c2ws` [V, 4, 4] -> [num_frames, 4, 4].

    Every camera keeps the mean camera's orientation and moves on a circle in its image plane
    (right and down axes), the usual "spiral" path for forward-facing captures. radius: None takes
    half the largest distance of a camera from the mean (a fixed small orbit for a single camera).
    """
    center = mean_camera(c2ws)
    if radius is None:
        spread = (c2ws[:, :3, 3] - center[:3, 3]).norm(dim=-1).max()
        radius = float(spread) / 2 if spread > 0 else 0.05
    angles = torch.linspace(0, 2 * math.pi, num_frames + 1, dtype=c2ws.dtype)[:-1]
    offsets = radius * (torch.cos(angles)[:, None] * center[:3, 0] + torch.sin(angles)[:, None] * center[:3, 1])
    path = center.expand(num_frames, 4, 4).clone()
    path[:, :3, 3] = center[:3, 3] + offsets
    return path


def _slerp(q0: Tensor, q1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of unit quaternions q0, q1 [..., 4] at t [...] along the shorter arc."""
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)
    dot = dot.abs().clamp(max=1.0)
    angle = torch.acos(dot)
    t = t[..., None]
    sin = torch.sin(angle)
    # nearly equal rotations: linear interpolation (then normalized) is exact to first order
    w0 = torch.where(sin > 1e-6, torch.sin((1 - t) * angle) / sin.clamp_min(1e-12), 1 - t)
    w1 = torch.where(sin > 1e-6, torch.sin(t * angle) / sin.clamp_min(1e-12), t)
    q = w0 * q0 + w1 * q1
    return q / q.norm(dim=-1, keepdim=True)


def path_through_cameras(c2ws: Tensor, num_frames: int) -> Tensor:
    """A smooth path through the cameras c2ws [V, 4, 4], in their order -> [num_frames, 4, 4].

    Positions follow a Catmull-Rom spline through the camera centers and orientations a slerp
    between neighbours, so the path passes exactly through every camera (the first and last
    frames are the first and last cameras). One camera gives num_frames copies of it.
    """
    count = c2ws.shape[0]
    if count == 1:
        return c2ws.expand(num_frames, 4, 4).clone()
    s = torch.linspace(0, count - 1, num_frames, dtype=c2ws.dtype)
    segment = s.floor().long().clamp(max=count - 2)
    t = s - segment
    centers = c2ws[:, :3, 3]
    # end tangents mirror the neighbouring point so the spline needs no extra cameras
    padded = torch.cat([2 * centers[:1] - centers[1:2], centers, 2 * centers[-1:] - centers[-2:-1]])
    p0, p1, p2, p3 = (padded[segment + k] for k in range(4))
    t1 = t[:, None]
    positions = 0.5 * (2 * p1 + (p2 - p0) * t1 + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t1**2
                       + (3 * p1 - p0 - 3 * p2 + p3) * t1**3)
    quats = matrix_to_quaternion(c2ws[:, :3, :3])
    path = torch.eye(4, dtype=c2ws.dtype).repeat(num_frames, 1, 1)
    path[:, :3, :3] = quaternion_to_matrix(_slerp(quats[segment], quats[segment + 1], t))
    path[:, :3, 3] = positions
    return path


def project_points(points: Tensor, w2c: Tensor, intrinsics: Tensor) -> Tuple[Tensor, Tensor]:
    """World points [..., 3] seen by one camera (w2c [4, 4] OpenCV, intrinsics [4] fx fy cx cy in
    pixels) -> pixel coordinates [..., 2] (x right, y down; pixel centers at +0.5) and depths [...]
    (camera z; <= 0 behind the camera, where the pixels mean nothing)."""
    camera = points @ w2c[:3, :3].transpose(-1, -2) + w2c[:3, 3]
    depth = camera[..., 2]
    safe = torch.where(depth.abs() > 1e-8, depth, torch.full_like(depth, 1e-8))
    fx, fy, cx, cy = intrinsics.unbind(-1)
    pixels = torch.stack([fx * camera[..., 0] / safe + cx, fy * camera[..., 1] / safe + cy], dim=-1)
    return pixels, depth
