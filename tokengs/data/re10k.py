"""RealEstate10K in pixelSplat's chunks: `<root>/<split>/*.torch` with `<split>/index.json`
mapping scene key -> chunk file. A chunk is a list of scenes, each a dict {key, url, timestamps
[N], cameras [N, 18], images: list of uint8 tensors of JPEG bytes}; a camera row is fx fy cx cy
(fx, cx divided by the width, fy, cy by the height), two zeros, then the world-to-camera 3x4
row-major in OpenCV axes.

Chunks hold many scenes, so the reader keeps the last chunk it loaded (per worker process):
sequential reads (the check CLI) cost one load per chunk; random training access pays one
chunk load per sample, pixelSplat's price for this layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from tokengs import cameras
from tokengs.data.scene import SceneError, SceneMeta, SceneRef, Views, decode_rgb, image_size, stack_views


def _image_bytes(image) -> bytes:
    return image.numpy().tobytes() if torch.is_tensor(image) else bytes(image)


class ChunkScene:
    """One scene of a loaded chunk; a context manager (nothing to close)."""

    has_depth = False

    def __init__(self, meta: SceneMeta, images: list):
        self.meta, self.images = meta, images

    def views(self, indices: Sequence[int], depth: bool = False) -> Views:
        if depth:
            raise SceneError(self.meta.path, "RealEstate10K carries no depth; use camera_scale_method distance, "
                                             "bound or constant")
        names = [self.meta.frame_names[i] for i in indices]
        images = [decode_rgb(_image_bytes(self.images[i]), name) for i, name in zip(indices, names)]
        return Views(stack_views(images, names, self.meta.image_hw))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def scene_meta(scene: dict, chunk: Path) -> SceneMeta:
    """A chunk's scene dict -> SceneMeta (cameras converted to OpenCV c2w, intrinsics to pixels)."""
    key = str(scene.get("key", "?"))
    where = f"{chunk}[{key}]"
    try:
        rows = torch.as_tensor(scene["cameras"], dtype=torch.float64).reshape(-1, 18)
        images = scene["images"]
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise SceneError(where, f"scene lacks or mangles cameras [N, 18] / images ({exc})") from None
    if len(images) != len(rows):
        raise SceneError(where, f"{len(rows)} cameras but {len(images)} images")
    if not images:
        raise SceneError(where, "no frames")
    hw = image_size(_image_bytes(images[0]), f"{where} frame 0")
    intrinsics = cameras.normalized_to_pixel_intrinsics(rows[:, :4], *hw)
    c2ws = cameras.w2c_to_c2w(rows[:, 6:].reshape(-1, 3, 4))
    return SceneMeta(name=key, path=chunk, c2ws=c2ws.numpy(), intrinsics=intrinsics.numpy(),
                     timesteps=np.arange(len(rows), dtype=np.float64), image_hw=hw,
                     frame_names=[f"{where} frame {i}" for i in range(len(rows))])


class RE10KReader:
    """pixelSplat chunks of one split (`train` or `test`)."""

    def __init__(self, root_path: str = "data/re10k", split: str = "train"):
        self.root = Path(root_path)
        self.split = split
        self._index: Optional[Dict[str, str]] = None
        self._chunk: Optional[Path] = None
        self._scenes: Dict[str, dict] = {}

    @property
    def index_path(self) -> Path:
        return self.root / self.split / "index.json"

    def index(self) -> Dict[str, str]:
        if self._index is None:
            if not self.index_path.is_file():
                self._index = {}
            else:
                try:
                    self._index = {str(k): str(v) for k, v in json.loads(self.index_path.read_text()).items()}
                except (ValueError, AttributeError) as exc:
                    raise SceneError(self.index_path, f"not a JSON object of scene key -> chunk file ({exc})") from None
        return self._index

    def scenes(self) -> List[SceneRef]:
        return [SceneRef(key, self.root / self.split / chunk) for key, chunk in sorted(self.index().items())]

    def _load_chunk(self, path: Path) -> None:
        if self._chunk == path:
            return
        self._chunk, self._scenes = None, {}
        try:
            chunk = torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise SceneError(path, "chunk file listed in index.json does not exist") from None
        except Exception as exc:  # torch.load raises many types for a damaged file
            raise SceneError(path, f"unreadable chunk ({type(exc).__name__}: {exc})") from None
        if not isinstance(chunk, list):
            raise SceneError(path, "a chunk must hold a list of scene dicts")
        self._chunk, self._scenes = path, {str(s.get("key")): s for s in chunk if isinstance(s, dict)}

    def open(self, ref: SceneRef) -> ChunkScene:
        self._load_chunk(ref.path)
        if ref.name not in self._scenes:
            raise SceneError(ref.path, f"scene {ref.name} (listed in index.json) is not in this chunk")
        scene = self._scenes[ref.name]
        return ChunkScene(scene_meta(scene, ref.path), scene["images"])
