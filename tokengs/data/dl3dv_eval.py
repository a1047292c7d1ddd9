"""The DL3DV benchmark: `<root>/<scene>.zip` holding `<scene>/gaussian_splat/transforms.json`,
`<scene>/gaussian_splat/images_4/` and `<scene>/gaussian_splat/sparse/0/points3D.bin` (COLMAP).

The view choice comes from an evaluation JSON (see `tokengs.data.registry`); depth, needed only
by the pointmap scene scale, is the COLMAP points seen by each frame projected into it.
"""

from __future__ import annotations

import posixpath
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from tokengs import cameras
from tokengs.data.dl3dv import ZipScene, open_nerfstudio_scene
from tokengs.data.scene import SceneError, SceneRef, Views

TRANSFORMS = "gaussian_splat/transforms.json"
POINTS = "sparse/0/points3D.bin"

# One points3D.bin record: id (u64), xyz (3 f64), rgb (3 u8), error (f64), track length (u64),
# then track length x (image id i32, point2D index i32).
_RECORD_HEAD = struct.Struct("<Q3d3BdQ")


@dataclass
class ColmapPoints:
    """COLMAP 3D points: xyz [P, 3] (float64, COLMAP's world), rgb [P, 3] uint8, and the tracks
    as pairs: track_point [T] (index into xyz) and track_image [T] (COLMAP image id)."""

    xyz: np.ndarray
    rgb: np.ndarray
    track_point: np.ndarray
    track_image: np.ndarray

    def seen_by(self, image_id: int) -> np.ndarray:
        """xyz [M, 3] of the points whose track holds image_id."""
        return self.xyz[np.unique(self.track_point[self.track_image == image_id])]


def read_points3d_bin(data: bytes, where: str = "points3D.bin") -> ColmapPoints:
    """Parse COLMAP's binary points3D format. Only the record offsets are found in a Python loop;
    the fields are then gathered with numpy (fast for the benchmark's ~10^5 points)."""
    try:
        (count,) = struct.unpack_from("<Q", data, 0)
        offsets = np.empty(count, dtype=np.int64)
        lengths = np.empty(count, dtype=np.int64)
        offset = 8
        for i in range(count):
            offsets[i] = offset
            (lengths[i],) = struct.unpack_from("<Q", data, offset + 43)
            offset += _RECORD_HEAD.size + 8 * int(lengths[i])
    except struct.error:
        raise SceneError(where, "truncated points3D.bin") from None
    if offset != len(data):
        raise SceneError(where, f"points3D.bin holds {len(data)} bytes but its {count} records span {offset}")
    buffer = np.frombuffer(data, dtype=np.uint8)
    byte_index = offsets[:, None] + np.arange(8, 32)[None]
    xyz = buffer[byte_index].copy().view("<f8").reshape(count, 3)
    rgb = buffer[offsets[:, None] + np.arange(32, 35)[None]].copy()
    track_point = np.repeat(np.arange(count), lengths)
    entry = np.arange(len(track_point)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    starts = np.repeat(offsets + _RECORD_HEAD.size, lengths) + 8 * entry
    track_image = buffer[starts[:, None] + np.arange(4)[None]].copy().view("<i4").reshape(-1)
    return ColmapPoints(xyz, rgb, track_point, track_image)


def write_points3d_bin(xyz: np.ndarray, rgb: np.ndarray, tracks: Sequence[Sequence[int]]) -> bytes:
    """COLMAP binary points3D bytes: xyz [P, 3], rgb [P, 3] uint8, tracks[p] the image ids seeing point p."""
    chunks = [struct.pack("<Q", len(xyz))]
    for i, (point, color, track) in enumerate(zip(xyz, rgb, tracks)):
        chunks.append(_RECORD_HEAD.pack(i + 1, *map(float, point), *map(int, color), 0.0, len(track)))
        chunks.append(np.array([(image, j) for j, image in enumerate(track)], dtype="<i4").tobytes())
    return b"".join(chunks)


def colmap_points_to_world(xyz: np.ndarray, applied_transform: Optional[Sequence[Sequence[float]]]) -> np.ndarray:
    """COLMAP points -> the world of the reader's OpenCV cameras: applied_transform (3x4, when the
    JSON has one) to nerfstudio's world, then the same un-permutation as the cameras."""
    if applied_transform is not None:
        transform = np.asarray(applied_transform, dtype=np.float64).reshape(3, 4)
        xyz = xyz @ transform[:, :3].T + transform[:, 3]
    return cameras.nerfstudio_points_to_colmap(torch.from_numpy(xyz)).numpy()


def project_depth(points: np.ndarray, c2w: np.ndarray, intrinsics: np.ndarray, hw) -> np.ndarray:
    """Sparse depth map [H, W] (0 where no point lands): points [M, 3] world, c2w [4, 4] OpenCV,
    intrinsics (fx, fy, cx, cy); each point goes to its nearest pixel (numpy round), the nearest depth wins."""
    height, width = hw
    w2c = np.linalg.inv(c2w)
    camera = points @ w2c[:3, :3].T + w2c[:3, 3]
    z = camera[:, 2]
    front = z > 0
    camera, z = camera[front], z[front]
    fx, fy, cx, cy = intrinsics
    u = np.round(fx * camera[:, 0] / z + cx).astype(np.int64)
    v = np.round(fy * camera[:, 1] / z + cy).astype(np.int64)
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    depth = np.full((height, width), np.inf)
    np.minimum.at(depth, (v[inside], u[inside]), z[inside])
    depth[np.isinf(depth)] = 0.0
    return depth


class EvalScene(ZipScene):
    """A benchmark scene; depth comes from the COLMAP points of each frame."""

    has_depth = True

    def __init__(self, scene: ZipScene, transforms: dict, folder: str):
        super().__init__(scene.archive, scene.meta, scene.members)
        self.transforms, self.folder = transforms, folder

    def depths(self, indices: Sequence[int]) -> torch.Tensor:
        member = posixpath.join(self.folder, POINTS)
        points = read_points3d_bin(self.read(member), f"{self.meta.path}:{member}")
        world = colmap_points_to_world(points.xyz, self.transforms.get("applied_transform"))
        points.xyz = world
        maps = []
        for i in indices:
            frame = self.transforms["frames"][i]
            if "colmap_im_id" not in frame:
                raise SceneError(self.meta.path, f"frame {self.members[i]} has no colmap_im_id (needed to find "
                                                 "the COLMAP points it sees)")
            seen = points.seen_by(int(frame["colmap_im_id"]))
            maps.append(project_depth(seen, self.meta.c2ws[i], self.meta.intrinsics[i], self.meta.image_hw))
        return torch.from_numpy(np.stack(maps)[:, None]).float()

    def views(self, indices: Sequence[int], depth: bool = False) -> Views:
        return Views(self.rgbs(indices), depths=self.depths(indices) if depth else None)


class DL3DVEvalReader:
    """Benchmark zips directly under the root."""

    def __init__(self, root_path: str = "data/dl3dv_eval"):
        self.root = Path(root_path)

    def scenes(self) -> List[SceneRef]:
        return [SceneRef(p.stem, p) for p in sorted(self.root.glob("*.zip"))] if self.root.is_dir() else []

    def open(self, ref: SceneRef) -> EvalScene:
        scene, transforms = open_nerfstudio_scene(ref, TRANSFORMS, ("images_4",))
        folder = posixpath.dirname(scene.members[0]) if scene.members else ""
        return EvalScene(scene, transforms, posixpath.dirname(folder))

