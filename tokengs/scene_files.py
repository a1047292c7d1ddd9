"""Small files that travel beside a scene's PLY so that a viewer can show more than the Gaussians.

cameras.json: the cameras a reconstruction was made from, and their images.

    {"format": "tokengs.cameras/1",
     "cameras": [{"name": "view_00",
                  "c2w": [[...4...], [...], [...], [0, 0, 0, 1]],   camera-to-world, OpenCV axes
                  "fx": 280.0, "fy": 280.0, "cx": 128.0, "cy": 128.0,  pixels of the image
                  "width": 256, "height": 256,
                  "image": "scene.cameras/view_00.png"}, ...]}       optional, relative to the JSON

Camera axes are the project's (tokengs.cameras): x right, y down, z forward. The file for
`X.ply` is `X.cameras.json` beside it (`cameras_path_for`); a folder's plain `cameras.json`
serves the PLYs of that folder that have no file of their own (`cameras_beside`).

One line writes it where a PLY is written, e.g. after `save_ply(gaussians.scene(0), ply)`:

    write_cameras(cameras_path_for(ply), batch.context.c2w[0], batch.context.intrinsics[0], batch.context.images[0])

tracks.npz (scripts/render_kubric_dyn.py) is the other such file; `tracks_beside` finds it.
The module needs numpy and Pillow only: torch tensors are accepted wherever arrays are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tokengs.errors import UserError

CAMERAS_FORMAT = "tokengs.cameras/1"
CAMERAS_FILE = "cameras.json"  # a folder's shared cameras file
TRACKS_FILE = "tracks.npz"


class SceneFileError(UserError, ValueError):
    """A scene file that cannot be read; the message names the file and what is wrong with it."""


@dataclass
class CameraRecord:
    """One camera of a cameras.json."""

    c2w: np.ndarray  # [4, 4] float64 camera-to-world, OpenCV axes (x right, y down, z forward)
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    name: str = ""
    image: Optional[Path] = None  # absolute path of its image (resolved against the JSON's folder)

    @property
    def vertical_fov(self) -> float:
        """Vertical field of view in radians."""
        return 2.0 * float(np.arctan2(self.height / 2.0, self.fy))


def cameras_path_for(ply) -> Path:
    """The cameras file that belongs to one PLY: X.ply -> X.cameras.json beside it."""
    ply = Path(ply)
    return ply.with_name(ply.stem + ".cameras.json")


def cameras_beside(ply) -> Optional[Path]:
    """The cameras file that describes `ply`: its own, else its folder's cameras.json, else None."""
    for candidate in (cameras_path_for(ply), Path(ply).with_name(CAMERAS_FILE)):
        if candidate.is_file():
            return candidate
    return None


def tracks_beside(ply) -> Optional[Path]:
    """X.tracks.npz beside X.ply, else the folder's tracks.npz, else None."""
    ply = Path(ply)
    for candidate in (ply.with_name(ply.stem + ".tracks.npz"), ply.with_name(TRACKS_FILE)):
        if candidate.is_file():
            return candidate
    return None


def _numpy(array) -> np.ndarray:
    """A numpy copy of a numpy array or a torch tensor (any device, any dtype)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().float().numpy()
    return np.asarray(array)


def _uint8_hwc(image: np.ndarray) -> np.ndarray:
    """[3, H, W] or [H, W, 3], float in [0, 1] or uint8 -> [H, W, 3] uint8."""
    if image.ndim != 3:
        raise ValueError(f"an image must be [3, H, W] or [H, W, 3], got shape {image.shape}")
    if image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(image)


def write_cameras(path, c2w, intrinsics, images=None, *, width: Optional[int] = None, height: Optional[int] = None,
                  names: Optional[Sequence[str]] = None) -> Path:
    """Write a cameras.json; returns its path.

    c2w [V, 4, 4] camera-to-world (OpenCV axes); intrinsics [V, 4] fx, fy, cx, cy in pixels;
    images (optional) [V, 3, H, W] floats in [0, 1] or [V, H, W, 3] uint8, written as PNGs in the
    folder named like the JSON without its suffix (X.cameras.json -> X.cameras/view_00.png);
    without images, width and height give the image size the intrinsics are in.
    """
    from PIL import Image

    path = Path(path)
    c2w, intrinsics = _numpy(c2w).astype(np.float64), _numpy(intrinsics).astype(np.float64)
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or intrinsics.shape != (len(c2w), 4):
        raise ValueError(f"write_cameras takes c2w [V, 4, 4] and intrinsics [V, 4], got {c2w.shape} and {intrinsics.shape}")
    pictures = [_uint8_hwc(image) for image in _numpy(images)] if images is not None else None
    if pictures is not None and len(pictures) != len(c2w):
        raise ValueError(f"write_cameras got {len(c2w)} cameras but {len(pictures)} images")
    if pictures is None and (width is None or height is None):
        raise ValueError("write_cameras needs width and height where it gets no images")
    names = list(names) if names is not None else [f"view_{i:02d}" for i in range(len(c2w))]

    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = path.with_name(path.name[: -len(".json")] if path.name.endswith(".json") else path.name + "_images")
    records = []
    for i, (pose, (fx, fy, cx, cy)) in enumerate(zip(c2w, intrinsics)):
        record = {"name": names[i], "c2w": pose.tolist(), "fx": fx, "fy": fy, "cx": cx, "cy": cy,
                  "width": int(width) if pictures is None else pictures[i].shape[1],
                  "height": int(height) if pictures is None else pictures[i].shape[0]}
        if pictures is not None:
            image_dir.mkdir(exist_ok=True)
            Image.fromarray(pictures[i]).save(image_dir / f"{names[i]}.png")
            record["image"] = f"{image_dir.name}/{names[i]}.png"
        records.append(record)
    # one camera a line: readable, and diffs show which camera changed
    lines = ",\n".join("  " + json.dumps(record) for record in records)
    path.write_text(f'{{"format": "{CAMERAS_FORMAT}",\n "cameras": [\n{lines}\n]}}\n')
    return path


def read_cameras(path) -> list[CameraRecord]:
    """Read a cameras.json written by `write_cameras`; SceneFileError where it is not one."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
        cameras = content["cameras"]
        records = []
        for entry in cameras:
            c2w = np.asarray(entry["c2w"], dtype=np.float64)
            if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
                raise ValueError(f"c2w must be a finite 4x4 matrix, got shape {c2w.shape}")
            image = entry.get("image")
            records.append(CameraRecord(
                c2w=c2w, fx=float(entry["fx"]), fy=float(entry["fy"]), cx=float(entry["cx"]), cy=float(entry["cy"]),
                width=int(entry["width"]), height=int(entry["height"]), name=str(entry.get("name", "")),
                image=(path.parent / image) if image else None))
    except (OSError, ValueError, KeyError, TypeError) as error:
        kind = type(error).__name__ if isinstance(error, (KeyError, TypeError)) else ""
        raise SceneFileError(f"{path} is not a readable {CAMERAS_FORMAT} file ({kind + ': ' if kind else ''}{error})") from None
    return records


def save_scene(gaussians, context, ply) -> Path:
    """A reconstructed scene for people to open: its Gaussians as a PLY (`gaussians` of one scene)
    and, beside it, the context views it came from (`context`: Views of one scene, [1, V, ...]) as
    cameras with their images, in the Gaussians' world frame. Returns the PLY's path."""
    from tokengs.gaussians import save_ply

    ply = Path(ply)
    ply.parent.mkdir(parents=True, exist_ok=True)  # save_ply writes into an existing folder only
    save_ply(gaussians, ply)
    write_cameras(cameras_path_for(ply), context.c2w[0], context.intrinsics[0], context.images[0])
    return ply
