"""Synthetic scenes in every raw layout, so that the readers, the demo and the tests run with no
download.

    python -m tokengs.data.synthetic --layout {dl3dv,dl3dv_eval,re10k,kubric} --out DIR
        [--scenes N --seed S --frames F --height H --width W --cameras C --eval_context K]

A scene is a handful of textured primitives (a room or a ground and a sky dome, boxes, spheres)
ray-cast with numpy through pixel centers; textures are scikit-image's sample photographs (a
dependency, so that a seed makes the same scenes on every install). Camera paths follow each dataset: a walk
through a room (DL3DV), forward motion down a long room (RealEstate10K), static cameras on a ring
around moving objects (Kubric). Output is deterministic for a seed.

What each layout writes (DIR is then a dataset root: `--dataset_kwargs root_path DIR`):
- dl3dv: DIR/1K/<scene>.zip with <scene>/transforms.json (nerfstudio: OpenGL axes, permuted
  world, fl_x ... cy at 4x the stored size as DL3DV's 4K capture) and <scene>/images/*.png;
- dl3dv_eval: DIR/<scene>.zip with <scene>/gaussian_splat/{transforms.json (with
  applied_transform), images_4/*.png, sparse/0/points3D.bin} and DIR/evaluation.json;
- re10k: DIR/{train,test}/*.torch chunks with index.json (N scenes for train, max(1, N // 4) for
  test) and DIR/evaluation.json for the test split;
- kubric: DIR/v0/<scene>/output_{camera:03d}.tar with ./metadata.json, ./rgba_%05d.png and
  ./depth_%05d.tiff (float32 z depth).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import multiprocessing
import tarfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from tokengs import cameras
from tokengs.cli import CommandParser

LAYOUTS = ("dl3dv", "dl3dv_eval", "re10k", "kubric")
# (frames, height, width) per layout: small enough to generate in seconds on one core.
DEFAULTS = {"dl3dv": (48, 96, 160), "dl3dv_eval": (24, 96, 160), "re10k": (64, 90, 160), "kubric": (24, 96, 96)}
# The CLI's scene count per layout. dl3dv and dl3dv_eval: the demo's training and held-out counts,
# because the demo reuses whatever scenes it finds under data/synthetic/ (its presets hold out a
# batch of 8 or 16 training scenes); re10k and kubric: a few batches, in under half a minute.
DEFAULT_SCENES = {"dl3dv": 48, "dl3dv_eval": 6, "re10k": 8, "kubric": 8}
DL3DV_CAPTURE_FACTOR = 4  # DL3DV's transforms.json describes the 4x larger capture
KUBRIC_FOCAL_MM, KUBRIC_SENSOR_MM = 35.0, 32.0  # Kubric's default camera
UP = np.array([0.0, 0.0, 1.0])  # the generator's world is z-up


# ---------------------------------------------------------------------------------------------
# Textures
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _photographs() -> Tuple[np.ndarray, ...]:
    """Nine uint8 RGB photographs shipped inside scikit-image (no download)."""
    try:
        import skimage.data as samples
    except ImportError as exc:
        raise ImportError("the synthetic scenes are textured with scikit-image's sample photographs; "
                          "`pip install scikit-image` (a dependency of tokengs)") from exc
    colour = [samples.astronaut(), samples.coffee(), samples.chelsea(), samples.rocket(),
              samples.immunohistochemistry(), samples.colorwheel()]
    tinted = [(samples.brick(), (0.85, 0.55, 0.45)), (samples.grass(), (0.45, 0.8, 0.4)),
              (samples.gravel(), (0.8, 0.78, 0.7))]
    images = [image[:, :, :3] for image in colour]
    images += [np.stack([gray * t for t in tint], -1) for gray, tint in tinted]
    return tuple(images)


def make_textures(width: int) -> List[np.ndarray]:
    """Float [h, w, 3] textures in [0, 1], prefiltered to about the image width (no aliasing
    when a surface fills the view)."""
    side = int(np.clip(width, 64, 512))
    return [cv2.resize(image.astype(np.float32) / 255.0, (side, side), interpolation=cv2.INTER_AREA)
            for image in _photographs()]


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with wrap-around: uv [M, 2] in tiles -> [M, 3]."""
    h, w = texture.shape[:2]
    x, y = uv[:, 0] * w - 0.5, uv[:, 1] * h - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.astype(np.int64) % w, y0.astype(np.int64) % h
    x1, y1 = (x0 + 1) % w, (y0 + 1) % h
    return ((texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx) * (1 - fy)
            + (texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx) * fy)


# ---------------------------------------------------------------------------------------------
# Primitives: intersect(o [3], d [R, 3]) -> t [R] (inf on a miss; d is not unit, so t is the
# camera z depth when d has z = 1 in the camera frame); surface(p [M, 3]) -> normals, uv, texture ids.
# ---------------------------------------------------------------------------------------------

_EPS = 1e-6


@dataclass
class Room:
    """The inside of an axis-aligned box: floor, ceiling and four walls, one texture each."""

    lo: np.ndarray
    hi: np.ndarray
    textures: Tuple[int, ...]  # -x, +x, -y, +y, floor, ceiling
    tile: float = 2.0

    def intersect(self, o, d):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.maximum((self.lo - o) / d, (self.hi - o) / d)
        t = np.where(np.isnan(t), np.inf, t)
        return t.min(1)

    def surface(self, p):
        gaps = np.stack([p - self.lo, self.hi - p], 1)  # [M, 2, 3]: distance to each face
        face = gaps.reshape(len(p), 6).argmin(1)  # 0..2 low faces, 3..5 high faces
        axis, high = face % 3, face >= 3
        normals = np.zeros_like(p)
        normals[np.arange(len(p)), axis] = np.where(high, -1.0, 1.0)
        other = np.array([[1, 2], [0, 2], [0, 1]])[axis]
        uv = np.take_along_axis(p, other, 1) / self.tile
        texture_index = np.array([[0, 2, 4], [1, 3, 5]])[high.astype(int), axis]
        return normals, uv, np.asarray(self.textures)[texture_index]


@dataclass
class Ground:
    """The plane z = 0, seen from above."""

    texture: int
    tile: float = 2.0

    def intersect(self, o, d):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -o[2] / d[:, 2]
        return np.where(t > _EPS, t, np.inf)

    def surface(self, p):
        return np.tile(UP, (len(p), 1)), p[:, :2] / self.tile, np.full(len(p), self.texture)


@dataclass
class Sphere:
    """A sphere, seen from outside, or from inside (`inside`, a sky dome)."""

    center: np.ndarray
    radius: float
    texture: int
    inside: bool = False

    def intersect(self, o, d):
        oc = o - self.center
        a = (d * d).sum(1)
        b = 2 * d @ oc
        c = oc @ oc - self.radius ** 2
        disc = b * b - 4 * a * c
        root = np.sqrt(np.maximum(disc, 0))
        near, far = (-b - root) / (2 * a), (-b + root) / (2 * a)
        t = far if self.inside else np.where(near > _EPS, near, far)
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def surface(self, p):
        n = (p - self.center) / self.radius
        uv = np.stack([np.arctan2(n[:, 1], n[:, 0]) / (2 * np.pi) * 2, np.arccos(np.clip(n[:, 2], -1, 1)) / np.pi], 1)
        return (-n if self.inside else n), uv, np.full(len(p), self.texture)


@dataclass
class Box:
    """A box turned by yaw about the z axis; half sizes per local axis."""

    center: np.ndarray
    half: np.ndarray
    yaw: float
    texture: int

    def _rotation(self):
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def intersect(self, o, d):
        r = self._rotation()
        ol, dl = (o - self.center) @ r, d @ r
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (-self.half - ol) / dl, (self.half - ol) / dl
        near = np.nanmax(np.minimum(t1, t2), 1)
        far = np.nanmin(np.maximum(t1, t2), 1)
        return np.where((near <= far) & (near > _EPS), near, np.inf)

    def surface(self, p):
        r = self._rotation()
        local = (p - self.center) @ r
        axis = np.abs(local / self.half).argmax(1)
        normals_local = np.zeros_like(p)
        normals_local[np.arange(len(p)), axis] = np.sign(local[np.arange(len(p)), axis])
        other = np.array([[1, 2], [0, 2], [0, 1]])[axis]
        uv = (np.take_along_axis(local, other, 1) + 1.0) / (2 * self.half.max())
        return normals_local @ r.T, uv, np.full(len(p), self.texture)


LIGHT = np.array([0.35, 0.5, 0.8]) / np.linalg.norm([0.35, 0.5, 0.8])


def render(primitives: Sequence, textures: Sequence[np.ndarray], c2w: np.ndarray, intrinsics: Sequence[float],
           hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Ray-cast through pixel centers: c2w [4, 4] OpenCV, intrinsics (fx, fy, cx, cy) ->
    (rgb [H, W, 3] float32 in [0, 1], z depth [H, W] float32, 0 where nothing is hit)."""
    height, width = hw
    fx, fy, cx, cy = intrinsics
    v, u = np.mgrid[0:height, 0:width] + 0.5
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1).reshape(-1, 3)
    d = rays @ c2w[:3, :3].T  # camera z = 1, so t is z depth
    o = c2w[:3, 3]
    hits = np.stack([p.intersect(o, d) for p in primitives])
    nearest = hits.argmin(0)
    depth = hits[nearest, np.arange(len(d))]
    rgb = np.zeros((len(d), 3))
    for k, primitive in enumerate(primitives):
        chosen = np.flatnonzero((nearest == k) & np.isfinite(depth))
        if chosen.size == 0:
            continue
        points = o + d[chosen] * depth[chosen, None]
        normals, uv, texture_ids = primitive.surface(points)
        facing = np.sign(-(normals * d[chosen]).sum(1, keepdims=True))  # light the side the camera sees
        shade = 0.55 + 0.45 * np.clip((normals * facing) @ LIGHT, 0, 1)
        colour = np.zeros((len(chosen), 3))
        for texture_id in np.unique(texture_ids):
            sel = texture_ids == texture_id
            colour[sel] = sample_texture(textures[texture_id], uv[sel])
        rgb[chosen] = colour * shade[:, None]
    depth = np.where(np.isfinite(depth), depth, 0.0)
    return (np.clip(rgb, 0, 1).reshape(height, width, 3).astype(np.float32),
            depth.reshape(height, width).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Scenes and camera paths
# ---------------------------------------------------------------------------------------------

def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world [4, 4] at eye looking at target, the world's z up."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, UP)
    right = right / np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def default_intrinsics(rng: np.random.Generator, hw: Tuple[int, int]) -> np.ndarray:
    """A ~65-75 degree horizontal field of view, square pixels, a slightly off-center principal point."""
    height, width = hw
    focal = width / (2 * np.tan(np.radians(rng.uniform(32.5, 37.5))))
    return np.array([focal, focal, width / 2 + rng.uniform(-0.03, 0.03) * width,
                     height / 2 + rng.uniform(-0.03, 0.03) * height])


def _furniture(rng, textures: int, lo, hi, count: int) -> list:
    """Boxes standing on the floor and spheres, kept off the walls."""
    items = []
    for _ in range(count):
        x, y = rng.uniform(lo[0] + 1.2, hi[0] - 1.2), rng.uniform(lo[1] + 1.2, hi[1] - 1.2)
        if rng.random() < 0.6:
            half = rng.uniform([0.25, 0.25, 0.2], [0.7, 0.7, 0.8])
            items.append(Box(np.array([x, y, half[2]]), half, rng.uniform(0, np.pi), int(rng.integers(textures))))
        else:
            radius = rng.uniform(0.25, 0.6)
            items.append(Sphere(np.array([x, y, radius + rng.uniform(0, 1.0)]), radius, int(rng.integers(textures))))
    return items


def room_scene(rng, textures: int, size) -> Tuple[list, np.ndarray, np.ndarray]:
    lo = np.array([-size[0] / 2, -size[1] / 2, 0.0])
    hi = np.array([size[0] / 2, size[1] / 2, size[2]])
    walls = Room(lo, hi, tuple(int(i) for i in rng.integers(textures, size=6)), tile=rng.uniform(1.5, 3.0))
    return [walls] + _furniture(rng, textures, lo, hi, int(rng.integers(3, 7))), lo, hi


def room_walk(rng, frames: int, lo, hi) -> np.ndarray:
    """DL3DV-like handheld walk: an arc around the room's middle, looking across it, with sway. [F, 4, 4]."""
    start, sweep = rng.uniform(0, 2 * np.pi), rng.choice([-1, 1]) * rng.uniform(0.6, 1.1) * np.pi
    radius = 0.3 * (hi[:2] - lo[:2])
    poses = []
    for s in np.linspace(0, 1, frames):
        angle = start + sweep * s
        eye = np.array([radius[0] * np.cos(angle), radius[1] * np.sin(angle), 1.5 + 0.05 * np.sin(9 * s)])
        across = -eye[:2] * 1.8 + 0.6 * np.array([np.cos(angle + np.pi / 2), np.sin(angle + np.pi / 2)])
        poses.append(look_at(eye, np.array([across[0], across[1], 1.1 + 0.2 * np.sin(5 * s)])))
    return np.stack(poses)


def forward_walk(rng, frames: int, lo, hi) -> np.ndarray:
    """RealEstate10K-like forward motion down a long room with a gentle sway and pan. [F, 4, 4]."""
    length = hi[0] - lo[0]
    poses = []
    for s in np.linspace(0, 1, frames):
        eye = np.array([lo[0] + (0.15 + 0.5 * s) * length, 0.4 * np.sin(3 * s + rng.uniform(0, 1)), 1.4])
        pan = 0.35 * np.sin(2 * np.pi * s * rng.uniform(0.5, 1.0))
        target = eye + np.array([np.cos(pan), np.sin(pan), -0.08]) * 3
        poses.append(look_at(eye, target))
    return np.stack(poses)


def _moving_objects(rng, textures: int, count: int) -> List[Callable[[float], object]]:
    """Kubric-like objects: each a function of time in [0, 1] -> a primitive (linear drift, a
    bounce, a spin)."""
    movers = []
    for _ in range(count):
        start = np.array([*rng.uniform(-2.0, 2.0, 2), 0.0])
        velocity = np.array([*rng.uniform(-1.5, 1.5, 2), 0.0])
        texture, bounce = int(rng.integers(textures)), rng.uniform(0.3, 1.2)
        if rng.random() < 0.5:
            half = rng.uniform(0.4, 0.9, 3)
            spin = rng.uniform(-2, 2)
            movers.append(lambda t, s=start, v=velocity, h=half, w=spin, k=texture, b=bounce: Box(
                s + v * t + np.array([0, 0, h[2] + b * abs(np.sin(np.pi * 2 * t))]), h, w * t, k))
        else:
            radius = rng.uniform(0.45, 0.9)
            movers.append(lambda t, s=start, v=velocity, r=radius, k=texture, b=bounce: Sphere(
                s + v * t + np.array([0, 0, r + b * abs(np.sin(np.pi * 2 * t))]), r, k))
    return movers


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

@dataclass
class GeneratedScene:
    """What the generator made, in our conventions: c2ws [N, 4, 4] OpenCV, intrinsics [N, 4] in
    pixels of the stored images (N = cameras x frames for Kubric, camera-major)."""

    name: str
    path: Path
    c2ws: np.ndarray
    intrinsics: np.ndarray
    image_hw: Tuple[int, int]
    depths: Optional[np.ndarray] = field(default=None, repr=False)


def _png(rgb: np.ndarray, alpha: bool = False) -> bytes:
    image = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    if alpha:
        image = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], -1)
        ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA))
    else:
        ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def _jpeg(rgb: np.ndarray) -> bytes:
    image = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return data.tobytes()


def _tiff(depth: np.ndarray) -> bytes:
    # PIL, not OpenCV, so that the reader's OpenCV decoding is checked against another writer.
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(depth.astype(np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def _scene_name(layout: str, seed: int, index: int) -> str:
    return hashlib.sha256(f"tokengs-synthetic-{layout}-{seed}-{index}".encode()).hexdigest()


def _render_all(primitives, textures, c2ws, intrinsics, hw):
    pairs = [render(primitives, textures, c2w, k, hw) for c2w, k in zip(c2ws, intrinsics)]
    return [p[0] for p in pairs], np.stack([p[1] for p in pairs])


def _nerfstudio_transforms(c2ws, intrinsics, hw, basenames, image_ids, applied_transform: bool) -> dict:
    """transforms.json as DL3DV ships it: intrinsics at the 4x capture size, nerfstudio poses."""
    factor = DL3DV_CAPTURE_FACTOR
    fx, fy, cx, cy = (float(v) * factor for v in intrinsics[0])
    matrices = cameras.opencv_to_nerfstudio(torch.from_numpy(c2ws)).numpy()
    transforms = {"w": hw[1] * factor, "h": hw[0] * factor, "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy,
                  "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "camera_model": "OPENCV",
                  "frames": [{"file_path": f"images/{name}", "transform_matrix": m.tolist(), "colmap_im_id": int(i)}
                             for name, m, i in zip(basenames, matrices, image_ids)]}
    if applied_transform:
        transforms["applied_transform"] = cameras.NERFSTUDIO_TO_COLMAP_WORLD[:3].tolist()
    return transforms


def write_dl3dv(out: Path, rng, textures, index: int, seed: int, frames: int, hw, evaluation: bool) -> GeneratedScene:
    layout = "dl3dv_eval" if evaluation else "dl3dv"
    name = _scene_name(layout, seed, index)
    primitives, lo, hi = room_scene(rng, len(textures), rng.uniform([6, 5, 2.8], [10, 8, 3.4]))
    c2ws = room_walk(rng, frames, lo, hi)
    intrinsics = np.tile(default_intrinsics(rng, hw), (frames, 1))
    images, depths = _render_all(primitives, textures, c2ws, intrinsics, hw)
    basenames = [f"frame_{i + 1:05d}.png" for i in range(frames)]
    image_ids = rng.permutation(frames) + 1  # COLMAP's ids follow its own order, not the frames'
    folder = f"{name}/gaussian_splat" if evaluation else name
    image_dir = "images_4" if evaluation else "images"
    path = out / f"{name}.zip" if evaluation else out / "1K" / f"{name}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    transforms = _nerfstudio_transforms(c2ws, intrinsics, hw, basenames, image_ids, evaluation)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        _zip_add(archive, f"{folder}/transforms.json", json.dumps(transforms, indent=1).encode())
        for basename, image in zip(basenames, images):
            _zip_add(archive, f"{folder}/{image_dir}/{basename}", _png(image))
        if evaluation:
            from tokengs.data.dl3dv_eval import write_points3d_bin

            xyz, rgb, tracks = _colmap_points(rng, c2ws, intrinsics, images, depths, image_ids)
            _zip_add(archive, f"{folder}/sparse/0/points3D.bin", write_points3d_bin(xyz, rgb, tracks))
    return GeneratedScene(name, path, c2ws, intrinsics, hw, depths)


def _colmap_points(rng, c2ws, intrinsics, images, depths, image_ids, per_frame: int = 150):
    """COLMAP-like sparse points: pixels of every frame lifted with their depth; a point's track
    holds every frame that sees it unoccluded (its depth within 1% of that frame's depth map)."""
    height, width = depths.shape[1:]
    xyz, rgb = [], []
    for c2w, k, image, depth in zip(c2ws, intrinsics, images, depths):
        v, u = rng.integers(height, size=per_frame), rng.integers(width, size=per_frame)
        z = depth[v, u].astype(np.float64)
        camera = np.stack([(u + 0.5 - k[2]) / k[0] * z, (v + 0.5 - k[3]) / k[1] * z, z], -1)
        xyz.append(camera @ c2w[:3, :3].T + c2w[:3, 3])
        rgb.append(np.round(image[v, u] * 255).astype(np.uint8))
    xyz, rgb = np.concatenate(xyz), np.concatenate(rgb)
    seen = []
    for c2w, k, depth in zip(c2ws, intrinsics, depths):
        w2c = np.linalg.inv(c2w)
        camera = xyz @ w2c[:3, :3].T + w2c[:3, 3]
        z = camera[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.floor(k[0] * camera[:, 0] / z + k[2]).astype(np.int64)
            v = np.floor(k[1] * camera[:, 1] / z + k[3]).astype(np.int64)
        inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        visible = np.zeros(len(xyz), bool)
        visible[inside] = np.abs(depth[v[inside], u[inside]] - z[inside]) < 0.01 * z[inside]
        seen.append(visible)
    seen = np.stack(seen, 1)
    return xyz, rgb, [image_ids[np.flatnonzero(row)].tolist() for row in seen]


def write_re10k_scene(rng, textures, name: str, frames: int, hw) -> Tuple[dict, GeneratedScene]:
    primitives, lo, hi = room_scene(rng, len(textures), rng.uniform([12, 4, 2.8], [16, 6, 3.2]))
    c2ws = forward_walk(rng, frames, lo, hi)
    intrinsics = np.tile(default_intrinsics(rng, hw), (frames, 1))
    images, depths = _render_all(primitives, textures, c2ws, intrinsics, hw)
    normalized = cameras.pixel_to_normalized_intrinsics(torch.from_numpy(intrinsics), *hw)
    w2c = torch.linalg.inv(torch.from_numpy(c2ws))[:, :3].reshape(frames, 12)
    rows = torch.cat([normalized, torch.zeros(frames, 2, dtype=torch.float64), w2c], 1).float()
    scene = {"key": name, "url": f"https://example.invalid/{name}",
             "timestamps": torch.arange(frames, dtype=torch.int64) * 33_366,
             "cameras": rows,
             "images": [torch.frombuffer(bytearray(_jpeg(image)), dtype=torch.uint8) for image in images]}
    return scene, GeneratedScene(name, Path(), c2ws, intrinsics, hw, depths)


def write_re10k(out: Path, scenes: int, seed: int, frames: int, hw, per_chunk: int = 4) -> List[GeneratedScene]:
    made = []
    for split, count in (("train", scenes), ("test", max(1, scenes // 4))):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        index, evaluation = {}, {}
        for first in range(0, count, per_chunk):
            chunk_name = f"{first // per_chunk:06d}.torch"
            chunk = []
            for i in range(first, min(first + per_chunk, count)):
                rng = _scene_rng(seed, f"re10k-{split}", i)
                name = _scene_name(f"re10k-{split}", seed, i)[:16]
                scene, generated = write_re10k_scene(rng, make_textures(hw[1]), name, frames, hw)
                generated.path = folder / chunk_name
                chunk.append(scene)
                made.append(generated)
                index[name] = chunk_name
                a, b = 0, frames - 1
                evaluation[name] = {"context": [a, b], "target": sorted({a + (b - a) * j // 4 for j in (1, 2, 3)})}
            torch.save(chunk, folder / chunk_name)
        (folder / "index.json").write_text(json.dumps(index, indent=1))
        if split == "test":
            (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1))
    return made


def write_kubric(out: Path, rng, textures, index: int, seed: int, frames: int, hw, num_cameras: int) -> GeneratedScene:
    name = f"{index:05d}"
    folder = out / "v0" / name
    folder.mkdir(parents=True, exist_ok=True)
    statics = [Ground(int(rng.integers(len(textures))), tile=rng.uniform(1.0, 2.5)),
               Sphere(np.zeros(3), 30.0, int(rng.integers(len(textures))), inside=True)]
    movers = _moving_objects(rng, len(textures), int(rng.integers(3, 6)))
    height, width = hw
    intrinsics = np.array([KUBRIC_FOCAL_MM * width / KUBRIC_SENSOR_MM, KUBRIC_FOCAL_MM * height / KUBRIC_SENSOR_MM,
                           width / 2, height / 2])
    azimuths = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, num_cameras, endpoint=False) \
        + rng.uniform(-0.2, 0.2, num_cameras)
    all_c2ws, all_depths = [], []
    scenes_over_time = [statics + [m(t) for m in movers] for t in np.linspace(0, 1, frames)]
    for camera, azimuth in enumerate(azimuths):
        elevation, distance = rng.uniform(0.3, 0.6), rng.uniform(6.5, 8.5)
        eye = distance * np.array([np.cos(azimuth) * np.cos(elevation), np.sin(azimuth) * np.cos(elevation),
                                   np.sin(elevation)])
        c2w = look_at(eye, np.array([0.0, 0.0, 0.5]))
        gl = cameras.opencv_to_opengl(torch.from_numpy(c2w))
        quaternion = cameras.matrix_to_quaternion(gl[:3, :3]).tolist()
        metadata = {"metadata": {"resolution": [height, width], "num_frames": frames, "frame_rate": 24},
                    "camera": {"focal_length": KUBRIC_FOCAL_MM, "sensor_width": KUBRIC_SENSOR_MM,
                               "field_of_view": float(2 * np.arctan(KUBRIC_SENSOR_MM / (2 * KUBRIC_FOCAL_MM))),
                               "positions": [eye.tolist()] * frames, "quaternions": [quaternion] * frames}}
        with tarfile.open(folder / f"output_{camera:03d}.tar", "w") as archive:
            _add(archive, "./metadata.json", json.dumps(metadata).encode())
            for t, primitives in enumerate(scenes_over_time):
                rgb, depth = render(primitives, textures, c2w, intrinsics, hw)
                _add(archive, f"./rgba_{t:05d}.png", _png(rgb, alpha=True))
                _add(archive, f"./depth_{t:05d}.tiff", _tiff(depth))
                all_depths.append(depth)
        all_c2ws += [c2w] * frames
    return GeneratedScene(f"v0/{name}", folder, np.stack(all_c2ws), np.tile(intrinsics, (len(all_c2ws), 1)), hw,
                          np.stack(all_depths))


def _zip_add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    """A member with a fixed date (writestr by name stamps the current time): the same seed gives
    the same bytes."""
    archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _scene_rng(seed: int, layout: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, int.from_bytes(layout.encode(), "little") % 2**32, index])


def generate(layout: str, out, scenes: int, seed: int = 0, frames: Optional[int] = None, height: Optional[int] = None,
             width: Optional[int] = None, cameras_per_scene: int = 9, eval_context: int = 2,
             eval_span: Optional[int] = None, progress: bool = False, workers: int = 1) -> List[GeneratedScene]:
    """Write `scenes` synthetic scenes of a layout under the dataset root `out` (see the module
    docstring) and return what was made, in our conventions, for checks. Scenes are independent:
    `workers` processes make them in parallel, with the same result as one. dl3dv_eval's
    evaluation.json takes `eval_context` views over `eval_span` frames (`evaluation_views`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    default_frames, default_h, default_w = DEFAULTS[layout]
    frames, hw = frames or default_frames, (height or default_h, width or default_w)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "re10k":
        return write_re10k(out, scenes, seed, frames, hw)
    make = functools.partial(_write_scene, layout, out, seed, frames, hw, cameras_per_scene)
    bar = dict(total=scenes, desc=f"synthetic {layout} scenes", disable=not progress, dynamic_ncols=True)
    if workers > 1 and scenes > 1:
        # an executor, not multiprocessing.Pool: a Pool replaces workers that die at start-up
        # forever, so a caller whose main module cannot be re-imported would hang
        spawn = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(min(workers, scenes), mp_context=spawn) as pool:
                made = list(tqdm(pool.map(make, range(scenes)), **bar))
        except BrokenProcessPool as exc:
            raise RuntimeError(
                f"generate(workers={workers}): the worker processes died. Spawned workers re-import the "
                "caller's main module, so call generate from a script file under `if __name__ == "
                "'__main__':` (not from a script read from stdin), or pass workers=1") from exc
    else:
        made = [make(i) for i in tqdm(range(scenes), **bar)]
    if layout == "dl3dv_eval":
        context, targets = evaluation_views(frames, eval_context, eval_span)
        index = {scene.name: {"context": context, "target": targets} for scene in made}
        (out / "evaluation.json").write_text(json.dumps(index, indent=1))
    return made


def evaluation_views(frames: int, context: int, span: Optional[int] = None) -> Tuple[List[int], List[int]]:
    """(context, target) frame indices of a synthetic benchmark scene.

    span None: `context` frames evenly over the whole clip, every frame a target (context frames
    included). span S: `context` frames evenly over S + 1 frames in the middle of the clip and the
    frames strictly between them as targets, as the RealEstate10K and DL3DV benchmarks sample them:
    every target lies between two nearby context views."""
    if span is None:
        return sorted({round(j * (frames - 1) / max(context - 1, 1)) for j in range(context)}), list(range(frames))
    if not context - 1 <= span <= frames - 1 or context < 2:
        raise ValueError(f"eval_span {span}: {context} context views need a span of {context - 1} to "
                         f"{frames - 1} frames (the clip has {frames})")
    start = (frames - 1 - span) // 2
    chosen = sorted({start + round(j * span / (context - 1)) for j in range(context)})
    return chosen, [f for f in range(chosen[0], chosen[-1] + 1) if f not in chosen]


def _write_scene(layout: str, out: Path, seed: int, frames: int, hw, cameras_per_scene: int,
                 index: int) -> GeneratedScene:
    rng = _scene_rng(seed, layout, index)
    textures = make_textures(hw[1])
    if layout == "kubric":
        return write_kubric(out, rng, textures, index, seed, frames, hw, cameras_per_scene)
    return write_dl3dv(out, rng, textures, index, seed, frames, hw, evaluation=layout == "dl3dv_eval")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = CommandParser(prog="python -m tokengs.data.synthetic", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--out", required=True, help="dataset root to write (created)")
    parser.add_argument("--scenes", type=int, help="scenes to write (re10k: train scenes, and a quarter as many, at "
                        "least 1, for test); default per layout: "
                        + ", ".join(f"{layout} {count}" for layout, count in DEFAULT_SCENES.items()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, help="frames per scene (per camera for kubric); default per layout")
    parser.add_argument("--height", type=int, help="image height; default per layout (small)")
    parser.add_argument("--width", type=int, help="image width; default per layout (small)")
    parser.add_argument("--cameras", type=int, default=9, help="kubric: cameras per scene")
    parser.add_argument("--eval_context", "--eval-context", type=int, default=2,
                        help="dl3dv_eval: context views in evaluation.json")
    parser.add_argument("--workers", type=int, default=1, help="processes making scenes in parallel")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    scenes = DEFAULT_SCENES[args.layout] if args.scenes is None else args.scenes
    made = generate(args.layout, args.out, scenes, args.seed, args.frames, args.height, args.width,
                    args.cameras, args.eval_context, progress=True, workers=args.workers)
    print(f"wrote {len(made)} {args.layout} scenes to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
