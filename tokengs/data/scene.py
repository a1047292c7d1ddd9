"""What every reader hands to the provider: scene references, scene metadata, decoded views, and
the errors that name the file that failed.

A reader lists `SceneRef`s cheaply (directory listing only) and opens one scene at a time:

    with reader.open(ref) as scene:       # reads the metadata, no pixels
        scene.meta.problems()             # [] for a usable scene
        views = scene.views([0, 5, 9], depth=False)

Cameras in `SceneMeta` are OpenCV camera-to-world in float64; intrinsics are (fx, fy, cx, cy) in
pixels of the images as stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

from tokengs.errors import UserError

# Decoding runs in DataLoader workers, one process per core: more OpenCV threads only contend.
cv2.setNumThreads(1)


class DataLoadError(UserError, RuntimeError):
    """Data could not be loaded and the run cannot go on (the message names the file and the limit)."""


class SceneError(UserError, ValueError):
    """One scene cannot be used; `path` is the file at fault and `reason` says why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class SceneRef:
    """A scene on disk: its name (unique within a reader) and the file or folder that holds it."""

    name: str
    path: Path


@dataclass
class SceneMeta:
    """Everything about a scene but its pixels.

    c2ws [N, 4, 4] OpenCV camera-to-world (float64); intrinsics [N, 4] (fx, fy, cx, cy) in pixels
    of the stored images; timesteps [N]; image_hw the stored image size (of the first frame);
    frame_names [N] the archive member of each frame (for messages); grid (cameras, frames) for
    multi-camera videos, whose frame index is camera * frames + frame; declared_hw the size the
    metadata declares, when it declares one (checked against image_hw up to its aspect ratio);
    missing the indices of frames whose files are absent.
    """

    name: str
    path: Path
    c2ws: np.ndarray
    intrinsics: np.ndarray
    timesteps: np.ndarray
    image_hw: Tuple[int, int]
    frame_names: List[str]
    grid: Optional[Tuple[int, int]] = None
    declared_hw: Optional[Tuple[int, int]] = None
    missing: List[int] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.c2ws)

    def problems(self) -> List[str]:
        """Every reason this scene cannot be used as it is ([] when it can)."""
        found = [f"missing frame {self.frame_names[i]}" for i in self.missing]
        if self.num_frames == 0:
            found.append("no frames")
        bad = ~np.isfinite(self.c2ws).all(axis=(1, 2))
        found += [f"non-finite pose of frame {self.frame_names[i]}" for i in np.flatnonzero(bad)]
        rotations = np.where(bad[:, None, None], np.eye(3), self.c2ws[:, :3, :3])
        orthogonal = np.abs(rotations.transpose(0, 2, 1) @ rotations - np.eye(3)).max(axis=(1, 2)) < 1e-3
        proper = np.abs(np.linalg.det(rotations) - 1) < 1e-3
        bottom = np.abs(np.where(bad[:, None], [0, 0, 0, 1], self.c2ws[:, 3]) - [0, 0, 0, 1]).max(-1) < 1e-6
        for i in np.flatnonzero(~(orthogonal & proper & bottom)):
            found.append(f"degenerate pose of frame {self.frame_names[i]} (rotation not orthonormal or last row "
                         "not 0 0 0 1)")
        bad_k = ~(np.isfinite(self.intrinsics).all(-1) & (self.intrinsics[:, :2] > 0).all(-1))
        found += [f"bad intrinsics {self.intrinsics[i].tolist()} of frame {self.frame_names[i]}"
                  for i in np.flatnonzero(bad_k)]
        if self.declared_hw is not None:
            (h, w), (dh, dw) = self.image_hw, self.declared_hw
            if abs(h - w * dh / dw) > 1.0:
                found.append(f"stored images are {w}x{h} but the metadata declares {dw}x{dh} (aspect ratio differs)")
        return found


@dataclass
class Views:
    """Decoded views: rgbs [V, 3, H, W] float in [0, 1]; masks [V, 1, H, W] or None; depths [V, 1, H, W] or None."""

    rgbs: Tensor
    masks: Optional[Tensor] = None
    depths: Optional[Tensor] = None


def decode_image(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG/TIFF bytes -> [H, W, C] array as stored (RGB(A) order; float TIFFs stay float)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SceneError(where, "cannot decode the image (truncated or not an image)")
    if image.ndim == 2:
        return image[:, :, None]
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    """Encoded bytes -> [H, W, 3] of the stored dtype: alpha dropped, a grey image in all three channels."""
    image = decode_image(data, where)
    return image[:, :, :3] if image.shape[2] >= 3 else np.repeat(image, 3, 2)


def check_frame_size(image: np.ndarray, name: str, expected_hw: Tuple[int, int]) -> None:
    """SceneError naming the frame when image [H, W, C] is not the scene's (first frame's) size."""
    if tuple(image.shape[:2]) != tuple(expected_hw):
        raise SceneError(name, f"image is {image.shape[1]}x{image.shape[0]}, the scene's first frame "
                               f"{expected_hw[1]}x{expected_hw[0]} (frames of mixed size: resize the photos "
                               "to one size, with their intrinsics)")


def image_size(data: bytes, where: str) -> Tuple[int, int]:
    """(H, W) of an encoded image from its header, without decoding the pixels."""
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as image:
            width, height = image.size
    except Exception as exc:  # PIL raises many types for a bad header
        raise SceneError(where, f"cannot read the image header ({exc})") from None
    return height, width


def stack_views(images: Sequence[np.ndarray], names: Sequence[str], expected_hw: Tuple[int, int]) -> Tensor:
    """[H, W, C] arrays of one dtype -> [V, C, H, W] float32 tensor, integers scaled to [0, 1] by
    their dtype's range; raises SceneError for a frame of another size."""
    for image, name in zip(images, names):
        check_frame_size(image, name, expected_hw)
    if len({image.dtype for image in images}) > 1:  # e.g. 8- and 16-bit PNGs in one scene
        images = [_unit_float(image) for image in images]
    # One pass per frame: copy_ converts the dtype and the HWC -> CHW layout together.
    height, width, channels = images[0].shape
    stacked = torch.empty(len(images), channels, height, width)
    for target, image in zip(stacked, images):
        target.copy_(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    return stacked.div_(_range(images[0].dtype))


def _range(dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _unit_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / _range(image.dtype)
