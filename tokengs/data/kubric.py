"""Kubric multi-camera videos: `<root>/<split>/<scene>/output_{camera:03d}.tar` (splits v0 v1 v2),
one tar per camera holding `metadata.json`, `rgba_{frame:05d}.png` and `depth_{frame:05d}.tiff`
(float z depth). Members may be named `./metadata.json` etc.: they are matched by basename.

metadata.json: camera {focal_length, sensor_width, positions [F, 3], quaternions [F, 4] w x y z,
OpenGL axes}, metadata {resolution [H, W]}. Intrinsics as the release computes them: fx =
focal * W / sensor_width, fy = focal * H / sensor_width, cx = W / 2, cy = H / 2 (W, H of the
stored images). A frame index is camera * frames + frame.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tokengs import cameras
from tokengs.data.scene import SceneError, SceneMeta, SceneRef, Views, decode_image, image_size, stack_views

SPLITS = ("v0", "v1", "v2")
_TAR = re.compile(r"output_(\d{3})\.tar")


def camera_tars(scene_dir: Path) -> List[Path]:
    """The scene's per-camera tars in camera order."""
    return sorted((p for p in scene_dir.iterdir() if _TAR.fullmatch(p.name)), key=lambda p: int(p.name[7:10]))


def kubric_intrinsics(focal_length: float, sensor_width: float, hw: Tuple[int, int]) -> np.ndarray:
    """(fx, fy, cx, cy) in pixels of H x W images, the release's formula (both focals over the sensor WIDTH)."""
    height, width = hw
    return np.array([focal_length * width / sensor_width, focal_length * height / sensor_width,
                     width / 2.0, height / 2.0])


class KubricScene:
    """An open Kubric scene (all its camera tars); a context manager."""

    has_depth = True

    def __init__(self, ref: SceneRef):
        self.ref = ref
        self.tars: List[tarfile.TarFile] = []
        self.members: List[Dict[str, tarfile.TarInfo]] = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        paths = camera_tars(self.ref.path)
        if not paths:
            raise SceneError(self.ref.path, "no output_XXX.tar in the scene folder")
        c2ws, intrinsics, names, missing = [], [], [], []
        frames = hw = declared = None
        for camera, path in enumerate(paths):
            try:
                archive = tarfile.open(path)
                self.tars.append(archive)
                by_name = {posixpath.basename(m.name): m for m in archive.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise SceneError(path, f"unreadable tar archive ({exc})") from None
            self.members.append(by_name)
            metadata = self._json(camera, "metadata.json")
            try:
                camera_meta = metadata["camera"]
                positions = torch.tensor(camera_meta["positions"], dtype=torch.float64).reshape(-1, 3)
                quaternions = torch.tensor(camera_meta["quaternions"], dtype=torch.float64).reshape(-1, 4)
                focal, sensor = float(camera_meta["focal_length"]), float(camera_meta["sensor_width"])
                resolution = tuple(int(v) for v in metadata["metadata"]["resolution"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise SceneError(f"{path}:metadata.json", "lacks or mangles camera.positions / quaternions / "
                                 f"focal_length / sensor_width or metadata.resolution ({exc})") from None
            if frames is None:
                frames, declared = len(positions), resolution
                first = f"rgba_{0:05d}.png"
                if first not in by_name:
                    raise SceneError(path, f"missing {first}")
                hw = image_size(self._read(camera, first), f"{path}:{first}")
            if len(positions) != frames or len(quaternions) != frames:
                raise SceneError(f"{path}:metadata.json", f"{len(positions)} positions and {len(quaternions)} "
                                 f"quaternions; camera 0 has {frames} frames")
            c2ws.append(cameras.kubric_to_opencv(positions, quaternions).numpy())
            intrinsics.append(np.tile(kubric_intrinsics(focal, sensor, hw), (frames, 1)))
            for t in range(frames):
                names.append(f"{path}:rgba_{t:05d}.png")
                if f"rgba_{t:05d}.png" not in by_name or f"depth_{t:05d}.tiff" not in by_name:
                    missing.append(len(names) - 1)
        self.meta = SceneMeta(name=self.ref.name, path=self.ref.path, c2ws=np.concatenate(c2ws),
                              intrinsics=np.concatenate(intrinsics),
                              timesteps=np.tile(np.arange(frames, dtype=np.float64), len(paths)), image_hw=hw,
                              frame_names=names, grid=(len(paths), frames), declared_hw=declared, missing=missing)

    def _read(self, camera: int, name: str) -> bytes:
        where = f"{self.ref.path / f'output_{camera:03d}.tar'}:{name}"
        member = self.members[camera].get(name)
        if member is None:
            raise SceneError(where, "missing file")
        try:
            return self.tars[camera].extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SceneError(where, f"unreadable ({exc})") from None

    def _json(self, camera: int, name: str) -> dict:
        try:
            return json.loads(self._read(camera, name))
        except ValueError as exc:
            raise SceneError(f"{self.ref.path / f'output_{camera:03d}.tar'}:{name}", f"not JSON ({exc})") from None

    def views(self, indices: Sequence[int], depth: bool = False) -> Views:
        frames = self.meta.grid[1]
        rgbas, depths, names = [], [], []
        for index in indices:
            camera, t = divmod(index, frames)
            names.append(self.meta.frame_names[index])
            rgba = decode_image(self._read(camera, f"rgba_{t:05d}.png"), names[-1])
            if rgba.shape[2] == 3:  # an opaque PNG without alpha
                opaque = np.iinfo(rgba.dtype).max if np.issubdtype(rgba.dtype, np.integer) else 1
                rgba = np.concatenate([rgba, np.full_like(rgba[:, :, :1], opaque)], -1)
            rgbas.append(rgba)
            if depth:
                depths.append(decode_image(self._read(camera, f"depth_{t:05d}.tiff"), names[-1])[:, :, :1]
                              .astype(np.float32))
        stacked = stack_views(rgbas, names, self.meta.image_hw)
        return Views(stacked[:, :3], stacked[:, 3:4],
                     stack_views(depths, names, self.meta.image_hw) if depth else None)

    def close(self) -> None:
        for archive in self.tars:
            archive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KubricReader:
    """Kubric scenes of the given splits (comma-separated; default every one of v0 v1 v2 present)."""

    def __init__(self, root_path: str = "data/kubric", splits: Optional[str] = None):
        self.root = Path(root_path)
        self.splits = tuple(s.strip() for s in splits.split(",")) if splits else SPLITS

    def scenes(self) -> List[SceneRef]:
        found = []
        for split in self.splits:
            folder = self.root / split
            if folder.is_dir():
                found += [SceneRef(f"{split}/{d.name}", d) for d in sorted(folder.iterdir())
                          if d.is_dir() and (d / "output_000.tar").exists()]
        return found

    def open(self, ref: SceneRef) -> KubricScene:
        return KubricScene(ref)
