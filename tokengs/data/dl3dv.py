"""DL3DV training scenes: `<root>/<subset>/<scene>.zip` (subsets 1K ... 11K), each holding
`<scene>/transforms.json` (nerfstudio) and the frames in `<scene>/images/` (DL3DV-ALL-960P) or
`<scene>/images_4/`.

transforms.json: fl_x, fl_y, cx, cy refer to the JSON's w x h (often the 3840x2160 capture)
and are rescaled to the images actually read; a frame may override any of them (nerfstudio
allows per-frame intrinsics). transform_matrix is nerfstudio's (OpenGL axes, permuted world),
converted by `cameras.nerfstudio_to_opencv`. Frames keep the order of the JSON's frames list
(the evaluation JSONs index it as stored).
"""

from __future__ import annotations

import json
import posixpath
import re
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from tokengs import cameras
from tokengs.data.scene import SceneError, SceneMeta, SceneRef, Views, decode_rgb, image_size, stack_views

SUBSETS = tuple(f"{k}K" for k in range(1, 12))
IMAGE_DIRS = ("images", "images_4")
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy")


def parse_transforms(transforms: dict, image_hw: Tuple[int, int], where: str) -> Tuple[np.ndarray, np.ndarray]:
    """nerfstudio transforms.json -> (c2ws [N, 4, 4] OpenCV, intrinsics [N, 4] in pixels of image_hw images)."""
    try:
        frames = transforms["frames"]
        matrices = np.array([frame["transform_matrix"] for frame in frames], dtype=np.float64).reshape(-1, 4, 4)
        intrinsics = np.array([[float(frame.get(key, transforms.get(key))) for key in _INTRINSIC_KEYS]
                               for frame in frames], dtype=np.float64).reshape(-1, 4)
        declared = np.array([[float(frame.get("w", transforms.get("w"))), float(frame.get("h", transforms.get("h")))]
                             for frame in frames], dtype=np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise SceneError(where, f"transforms.json lacks or mangles a field ({type(exc).__name__}: {exc}); it needs "
                                "frames[].transform_matrix and fl_x, fl_y, cx, cy, w, h") from None
    height, width = image_hw
    scale = np.stack([width / declared[:, 0], height / declared[:, 1]], -1)
    intrinsics = intrinsics * np.concatenate([scale, scale], -1)
    c2ws = cameras.nerfstudio_to_opencv(torch.from_numpy(matrices)).numpy()
    return c2ws, intrinsics


class ZipScene:
    """An open scene archive whose frames are image members; a context manager."""

    has_depth = False

    def __init__(self, archive: zipfile.ZipFile, meta: SceneMeta, members: List[str]):
        self.archive, self.meta, self.members = archive, meta, members

    def read(self, member: str) -> bytes:
        try:
            return self.archive.read(member)
        except KeyError:
            raise SceneError(self.meta.path, f"missing file {member}") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SceneError(self.meta.path, f"cannot read {member} ({exc})") from None

    def rgbs(self, indices: Sequence[int]) -> torch.Tensor:
        names = [f"{self.meta.path}:{self.members[i]}" for i in indices]
        images = [decode_rgb(self.read(self.members[i]), name) for i, name in zip(indices, names)]
        return stack_views(images, names, self.meta.image_hw)

    def views(self, indices: Sequence[int], depth: bool = False) -> Views:
        if depth:
            raise SceneError(self.meta.path, "DL3DV training scenes carry no depth; camera_scale_method pointmap "
                                             "needs dl3dv_eval (COLMAP points) or kubric")
        return Views(self.rgbs(indices))

    def close(self) -> None:
        self.archive.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SceneError(path, f"unreadable zip archive ({exc})") from None


def read_transforms(archive: zipfile.ZipFile, path: Path, suffix: str) -> Tuple[str, dict]:
    """Find the member `<scene>/<suffix>` (the shallowest one ending so) -> (its folder, parsed JSON)."""
    candidates = sorted((m for m in archive.namelist() if m == suffix or m.endswith("/" + suffix)), key=len)
    if not candidates:
        raise SceneError(path, f"no {suffix} in the archive")
    member = candidates[0]
    try:
        return posixpath.dirname(member), json.loads(archive.read(member))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise SceneError(f"{path}:{member}", f"unreadable ({exc})") from None


def open_nerfstudio_scene(ref: SceneRef, transforms_member: str, image_dirs: Sequence[str]) -> Tuple[ZipScene, dict]:
    """Open a zip holding a nerfstudio transforms.json and its frames in the first of image_dirs
    (next to transforms.json) that holds the first frame -> (the open scene, the parsed JSON)."""
    archive = open_zip(ref.path)
    try:
        folder, transforms = read_transforms(archive, ref.path, transforms_member)
        frames = transforms.get("frames") or []
        basenames = [posixpath.basename(str(frame.get("file_path", ""))) for frame in frames]
        names = set(archive.namelist())
        image_dir = next((d for d in image_dirs if basenames and posixpath.join(folder, d, basenames[0]) in names),
                         image_dirs[0])
        members = [posixpath.join(folder, image_dir, b) for b in basenames]
        missing = [i for i, m in enumerate(members) if m not in names]
        present = next((m for m in members if m in names), None)
        if present is None:
            raise SceneError(ref.path, f"none of the frames listed in transforms.json is in "
                                       f"{posixpath.join(folder, image_dir)}/ (looked in {', '.join(image_dirs)})")
        hw = image_size(archive.read(present), f"{ref.path}:{present}")
        c2ws, intrinsics = parse_transforms(transforms, hw, f"{ref.path}:{transforms_member}")
        declared = (int(transforms["h"]), int(transforms["w"])) if "h" in transforms and "w" in transforms else None
        meta = SceneMeta(name=ref.name, path=ref.path, c2ws=c2ws, intrinsics=intrinsics,
                         timesteps=np.arange(len(frames), dtype=np.float64), image_hw=hw, frame_names=members,
                         declared_hw=declared, missing=missing)
        return ZipScene(archive, meta, members), transforms
    except BaseException:
        archive.close()
        raise


def _subset_key(name: str) -> int:
    return int(name[:-1])


class DL3DVReader:
    """DL3DV training zips. subsets: a comma-separated list (default: every 1K ... 11K present);
    image_dir: force `images` or `images_4` (default: `images`, else `images_4`)."""

    def __init__(self, root_path: str = "data/dl3dv", subsets: Optional[str] = None, image_dir: Optional[str] = None):
        self.root = Path(root_path)
        self.subsets = tuple(s.strip() for s in subsets.split(",")) if subsets else None
        self.image_dirs = (image_dir,) if image_dir else IMAGE_DIRS

    def scenes(self) -> List[SceneRef]:
        if self.subsets is not None:
            subsets = list(self.subsets)
        else:
            present = [p.name for p in self.root.iterdir() if p.is_dir() and re.fullmatch(r"\d+K", p.name)] \
                if self.root.is_dir() else []
            subsets = sorted(present, key=_subset_key)
        return [SceneRef(path.stem, path) for subset in subsets for path in sorted((self.root / subset).glob("*.zip"))]

    def open(self, ref: SceneRef) -> ZipScene:
        return open_nerfstudio_scene(ref, "transforms.json", self.image_dirs)[0]
