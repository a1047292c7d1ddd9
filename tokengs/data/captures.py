"""Your own captures: posed photos in the formats other tools write, read as scenes.

| format        | what PATH is                                                              |
| colmap        | a COLMAP sparse model, binary or text (`sparse/0/`, `sparse/` or a folder  |
|               | holding them), with its photos in `images/` beside `sparse/`; read by      |
|               | pycolmap (the `captures` extra)                                            |
| nerfstudio    | a `transforms.json` (or its folder): fl_x fl_y cx cy w h, global or per     |
|               | frame, frames[].file_path and transform_matrix                             |
| instant_ngp   | the same file with camera_angle_x (optional camera_angle_y, cx, cy, w, h)  |
|               | in place of fl_x / fl_y; a file_path without a suffix finds the image      |
| dl3dv         | a DL3DV scene zip, read by the DL3DV reader (`tokengs.data.dl3dv`); its    |
|               | unzipped folder is a nerfstudio capture (a benchmark scene's: the folder   |
|               | holding `gaussian_splat/`, or that folder)                                 |

`open_capture` returns a `CaptureScene` whose `meta` is the `SceneMeta` every reader produces
(OpenCV camera-to-world, intrinsics in pixels of the images as read), so that
`python -m tokengs.data.check` and `tokengs.reconstruct` share it. Conventions:
- cameras: COLMAP's world-to-camera (OpenCV axes) is inverted; transforms.json matrices are
  camera-to-world in OpenGL axes and only their axes are converted (`cameras.opengl_to_opencv`),
  so the world is the file's own (the reconstruction depends only on the cameras relative to
  each other). instant-ngp's scale/offset and aabb_scale place its NeRF box and are ignored;
- intrinsics are given for the declared image size (COLMAP's camera width/height, the JSON's
  w/h) and scaled to the size of the images actually read;
- lenses: PINHOLE and SIMPLE_PINHOLE are used as they are; SIMPLE_RADIAL, RADIAL, OPENCV,
  FULL_OPENCV (the JSON's camera_model OPENCV with k1 k2 k3 p1 p2) and OPENCV_FISHEYE (the
  JSON's OPENCV_FISHEYE or is_fisheye, k1..k4) are undistorted with OpenCV into a pinhole camera
  of the same image size whose pixels are all valid; any other model is reported by name;
- frames are in file-name order (numbers compared as numbers); a DL3DV zip keeps the order of
  its transforms.json.
Problems beyond SceneMeta's own (a lens that cannot be undistorted, images in the photo folder
that no camera poses) are in `CaptureMeta.capture_problems`, so that `meta.problems()` lists them all.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from tokengs import cameras
from tokengs.data.dl3dv import IMAGE_DIRS, open_nerfstudio_scene
from tokengs.data.scene import (SceneError, SceneMeta, SceneRef, Views, check_frame_size, decode_rgb, image_size,
                                 stack_views)

FORMATS = ("colmap", "nerfstudio", "instant_ngp", "dl3dv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TRANSFORMS = "transforms.json"
DL3DV_BENCHMARK_DIR = "gaussian_splat"  # an unzipped DL3DV benchmark scene holds its capture in <hash>/gaussian_splat/
COLMAP_INSTALL = 'pip install -e ".[captures]"'
# COLMAP camera models: their intrinsics, then the lens they become (see colmap_camera)
COLMAP_PINHOLE = ("SIMPLE_PINHOLE", "PINHOLE")
COLMAP_UNDISTORTED = ("SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV", "OPENCV_FISHEYE")


# ---------------------------------------------------------------------------------------------
# Lenses and undistortion
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lens:
    """A camera's distortion: kind "pinhole" (none), "opencv" (cv2.undistort's k1 k2 p1 p2
    [k3 [k4 k5 k6]]) or "fisheye" (cv2.fisheye's k1 k2 k3 k4)."""

    kind: str = "pinhole"
    coefficients: Tuple[float, ...] = ()

    @property
    def distorted(self) -> bool:
        return self.kind != "pinhole" and any(c != 0.0 for c in self.coefficients)


PINHOLE = Lens()


def colmap_camera(model: str, params: Sequence[float]) -> Tuple[np.ndarray, Lens]:
    """A COLMAP camera -> (fx, fy, cx, cy) [4] and its lens; ValueError for a model OpenCV cannot undistort."""
    values = [float(v) for v in params]
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        f, cx, cy, *radial = values
        intrinsics = [f, f, cx, cy]
        # one or two radial terms, no tangential: OpenCV's k1 k2 p1 p2 with the rest zero
        lens = Lens("opencv", tuple(radial) + (0.0,) * (4 - len(radial))) if radial else PINHOLE
    elif model in ("PINHOLE", "OPENCV", "FULL_OPENCV", "OPENCV_FISHEYE"):
        fx, fy, cx, cy, *distortion = values
        intrinsics = [fx, fy, cx, cy]
        # COLMAP's OPENCV / FULL_OPENCV / OPENCV_FISHEYE parameters are OpenCV's, in OpenCV's order
        lens = Lens("fisheye" if model == "OPENCV_FISHEYE" else "opencv", tuple(distortion)) if distortion else PINHOLE
    else:
        raise ValueError(f"camera model {model} cannot be undistorted here (supported: "
                         f"{', '.join(COLMAP_PINHOLE + COLMAP_UNDISTORTED)}); undistort the images with "
                         "`colmap image_undistorter` and read its output")
    return np.array(intrinsics, dtype=np.float64), lens


def json_lens(value: Callable[[str], object]) -> Lens:
    """The lens of a transforms.json frame (`value(key)`: the frame's value, else the file's, else
    None); ValueError for one OpenCV cannot undistort."""
    coefficient = lambda key: float(value(key) or 0.0)
    k1, k2, k3, k4, p1, p2 = (coefficient(k) for k in ("k1", "k2", "k3", "k4", "p1", "p2"))
    model = "OPENCV_FISHEYE" if value("is_fisheye") else str(value("camera_model") or "OPENCV").upper()
    if model == "OPENCV_FISHEYE":
        return Lens("fisheye", (k1, k2, k3, k4))
    if model not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE"):
        raise ValueError(f"camera_model {model} cannot be undistorted here (supported: OPENCV, OPENCV_FISHEYE, "
                         "PINHOLE)")
    if k4 != 0.0:
        raise ValueError(f"k4={k4} of camera_model {model} (an r^8 term) has no OpenCV equivalent")
    return Lens("opencv", (k1, k2, p1, p2, k3))


@dataclass
class Undistortion:
    """What undistorting one camera's images takes: the pinhole intrinsics [4] of the result and
    OpenCV's remap tables (x and y [H, W] float32), None for a lens without distortion."""

    intrinsics: np.ndarray
    maps: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def apply(self, image: np.ndarray) -> np.ndarray:
        """[H, W, C] image as read -> the same image seen by the pinhole camera."""
        if self.maps is None:
            return image
        return cv2.remap(image, *self.maps, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# OpenCV puts pixel centers at integer coordinates; COLMAP, nerfstudio and we put them at +0.5.
_CENTER_SHIFT = np.array([0.0, 0.0, 0.5, 0.5])


def undistortion(intrinsics: np.ndarray, lens: Lens, hw: Tuple[int, int]) -> Undistortion:
    """The pinhole camera (same image size, every pixel inside the photo) that sees what a camera
    of `intrinsics` [4] and `lens` saw in hw = (H, W) images, and the tables that resample them."""
    if not lens.distorted:
        return Undistortion(intrinsics)
    height, width = hw
    fx, fy, cx, cy = intrinsics - _CENTER_SHIFT
    matrix = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    coefficients = np.array(lens.coefficients, dtype=np.float64)
    if lens.kind == "fisheye":
        new = cv2.fisheye.estimateNewCameraMatrixForUndistortRectify(matrix, coefficients, (width, height), np.eye(3),
                                                                     balance=0.0)
        maps = cv2.fisheye.initUndistortRectifyMap(matrix, coefficients, np.eye(3), new, (width, height), cv2.CV_32FC1)
    else:
        new, _ = cv2.getOptimalNewCameraMatrix(matrix, coefficients, (width, height), alpha=0.0)
        maps = cv2.initUndistortRectifyMap(matrix, coefficients, None, new, (width, height), cv2.CV_32FC1)
    pinhole = np.array([new[0, 0], new[1, 1], new[0, 2], new[1, 2]]) + _CENTER_SHIFT
    return Undistortion(pinhole, maps)


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

@dataclass
class CaptureMeta(SceneMeta):
    """A capture's SceneMeta: its format and the problems only a capture has (see the module docstring)."""

    format: str = ""
    capture_problems: List[str] = field(default_factory=list)

    def problems(self) -> List[str]:
        return super().problems() + self.capture_problems


class CaptureScene:
    """An open capture (a context manager, like the dataset readers' scenes): `meta`, and its
    frames decoded and undistorted. read(i) returns frame i's encoded bytes or raises SceneError;
    undistortions[i] is frame i's (None: every frame as read)."""

    has_depth = False

    def __init__(self, meta: CaptureMeta, read: Callable[[int], bytes],
                 undistortions: Optional[List[Undistortion]] = None, close: Callable[[], None] = lambda: None):
        self.meta, self._read, self._undistortions, self._close = meta, read, undistortions, close

    def image(self, index: int) -> np.ndarray:
        """Frame `index` as an [H, W, 3] array of its stored dtype, undistorted; SceneError naming its file."""
        name = self.meta.frame_names[index]
        rgb = decode_rgb(self._read(index), name)
        check_frame_size(rgb, name, self.meta.image_hw)  # before undistortion, whose tables have the first frame's size
        return rgb if self._undistortions is None else self._undistortions[index].apply(rgb)

    def views(self, indices: Sequence[int], depth: bool = False) -> Views:
        if depth:
            raise SceneError(self.meta.path, "captures carry no depth; use a camera_scale_method other than pointmap")
        names = [self.meta.frame_names[i] for i in indices]
        return Views(stack_views([self.image(i) for i in indices], names, self.meta.image_hw))

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_frames(scene: CaptureScene, indices: Sequence[int], workers: int) -> Tuple[List[np.ndarray], List[str]]:
    """Frames decoded by `workers` threads (OpenCV decodes without holding the GIL) -> (the
    images, in order, when every one decodes; each frame's problem otherwise)."""
    def one(index: int):
        try:
            return scene.image(index), None
        except SceneError as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, indices))
    problems = [problem for _, problem in results if problem is not None]
    return ([] if problems else [image for image, _ in results]), problems


# ---------------------------------------------------------------------------------------------
# Finding a capture
# ---------------------------------------------------------------------------------------------

def _is_colmap_model(folder: Path) -> bool:
    return any((folder / f"cameras.{suffix}").is_file() for suffix in ("bin", "txt"))


def colmap_model_dir(path: Path) -> Optional[Path]:
    """The sparse model at path: path itself, path/sparse/0 or path/sparse, else None."""
    return next((d for d in (path, path / "sparse" / "0", path / "sparse") if _is_colmap_model(d)), None)


def transforms_file(path: Path) -> Optional[Path]:
    """path when it is a .json file, else path/transforms.json when present, else None."""
    if path.is_file() and path.suffix.lower() == ".json":
        return path
    return path / TRANSFORMS if (path / TRANSFORMS).is_file() else None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SceneError(path, f"unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise SceneError(path, "not a transforms.json: it needs a 'frames' list")
    return data


def json_flavour(data: dict) -> str:
    """instant_ngp when the file gives camera_angle_x and no fl_x (globally or in its first frame), else nerfstudio."""
    first = data["frames"][0] if data["frames"] and isinstance(data["frames"][0], dict) else {}
    has = lambda key: key in data or key in first
    return "instant_ngp" if has("camera_angle_x") and not has("fl_x") else "nerfstudio"


def capture_name(path: Path) -> str:
    """A name for the capture: the folder that holds it (a zip: its stem)."""
    if path.suffix.lower() == ".zip":
        return path.stem
    folder = path.parent if path.is_file() else path
    while folder.name in ("0", "sparse", DL3DV_BENCHMARK_DIR) and folder.parent != folder:
        folder = folder.parent
    return folder.resolve().name or "capture"


def open_capture(path: Path, fmt: Optional[str] = None) -> CaptureScene:
    """Open the capture at path in format fmt (None: recognised: a zip is DL3DV's, a transforms.json
    nerfstudio's or instant-ngp's, else a COLMAP model); SceneError naming the file when it cannot
    be read at all (its per-frame problems are in meta.problems())."""
    path = Path(path)
    if not path.exists():
        raise SceneError(path, "no such file or folder")
    name = capture_name(path)
    if path.is_dir() and (path / DL3DV_BENCHMARK_DIR).is_dir():
        path = path / DL3DV_BENCHMARK_DIR
    if fmt == "dl3dv" or (fmt is None and path.is_file() and path.suffix.lower() == ".zip"):
        return _open_dl3dv(SceneRef(name, path))
    if fmt in ("nerfstudio", "instant_ngp") or (fmt is None and transforms_file(path) is not None):
        return _open_transforms(name, path, fmt)  # its reader tells the two apart when fmt is None
    if fmt == "colmap" or (fmt is None and path.is_dir() and colmap_model_dir(path) is not None):
        return _open_colmap(name, path)
    raise SceneError(path, "not a capture: expected a COLMAP model (sparse/0/ beside images/), a transforms.json "
                           "(nerfstudio or instant-ngp) or a DL3DV scene zip")


class CaptureReader:
    """One capture as a dataset of one scene, for `tokengs.data.check` (the readers' interface)."""

    def __init__(self, fmt: str, root: Path):
        if fmt not in FORMATS:
            raise ValueError(f"unknown capture format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.format, self.root = fmt, Path(root)

    def scenes(self) -> List[SceneRef]:
        return [SceneRef(capture_name(self.root), self.root)] if self.root.exists() else []

    def open(self, ref: SceneRef) -> CaptureScene:
        return open_capture(ref.path, self.format)


# ---------------------------------------------------------------------------------------------
# The readers
# ---------------------------------------------------------------------------------------------

@dataclass
class PosedImages:
    """What a capture's metadata says, before any image is read: per frame its image file, c2w
    [4, 4] OpenCV, intrinsics [4] in pixels of the declared size (H, W) and lens."""

    paths: List[Path]
    c2ws: np.ndarray
    intrinsics: np.ndarray
    declared_hw: np.ndarray  # [N, 2]
    lenses: List[Lens]


def natural_key(path: Path) -> list:
    """Sort key: numbers in the name compare as numbers (frame_2 before frame_10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _first_image_hw(paths: Sequence[Path], where: Path) -> Tuple[int, int]:
    present = next((p for p in paths if p.is_file()), None)
    if present is None:
        first = f"; the first it looked for: {paths[0]}" if paths else ""
        raise SceneError(where, f"none of its {len(paths)} images is there{first}")
    try:
        return image_size(present.read_bytes(), str(present))
    except OSError as exc:
        raise SceneError(present, f"cannot read ({exc.strerror or exc})") from None


def _unposed_images(paths: Sequence[Path], metadata: Path) -> List[str]:
    """A problem naming the images in the photo folders that no camera of `metadata` poses."""
    posed = {p.resolve() for p in paths}
    found = [f for folder in {p.parent for p in paths} if folder.is_dir() for f in folder.iterdir()
             if f.suffix.lower() in IMAGE_SUFFIXES]
    extra = sorted((f for f in found if f.resolve() not in posed), key=natural_key)
    return [unposed_problem(str(extra[0].parent), len(found), len(posed), str(metadata), [f.name for f in extra])] \
        if extra else []


def unposed_problem(folder: str, images: int, cameras: int, metadata: str, unposed: Sequence[str]) -> str:
    """The problem of a capture whose image folder holds images that its metadata gives no camera."""
    shown = ", ".join(unposed[:3]) + (", ..." if len(unposed) > 3 else "")
    return (f"{images} images in {folder} but {cameras} cameras in {metadata} "
            f"({len(unposed)} unposed: {shown}); pose them or move them out")


def _folder_capture(name: str, metadata: Path, fmt: str, posed: PosedImages, problems: List[str],
                    hw: Optional[Tuple[int, int]] = None) -> CaptureScene:
    """Posed image files -> an open scene in file-name order, intrinsics scaled to the images' size
    (hw, when the caller has read it already; every frame must have it) and undistorted;
    `problems` (the metadata's own) go with the scene's."""
    if not posed.paths:
        raise SceneError(metadata, "no frames: it poses no image")
    order = sorted(range(len(posed.paths)), key=lambda i: natural_key(posed.paths[i]))
    paths = [posed.paths[i] for i in order]
    hw = hw or _first_image_hw(paths, metadata)
    declared = posed.declared_hw[order]
    scale = np.stack([hw[1] / declared[:, 1], hw[0] / declared[:, 0]], -1)
    raw = posed.intrinsics[order] * np.concatenate([scale, scale], -1)
    cache: Dict[tuple, Undistortion] = {}
    undistortions = []
    for intrinsics, lens in zip(raw, (posed.lenses[i] for i in order)):
        key = (tuple(intrinsics), lens)
        if key not in cache:  # one table per camera, not per frame
            cache[key] = undistortion(intrinsics, lens, hw)
        undistortions.append(cache[key])
    meta = CaptureMeta(name=name, path=metadata, c2ws=posed.c2ws[order],
                       intrinsics=np.stack([u.intrinsics for u in undistortions]),
                       timesteps=np.arange(len(paths), dtype=np.float64), image_hw=hw,
                       frame_names=[str(p) for p in paths],
                       declared_hw=tuple(int(v) for v in declared[0]),
                       missing=[i for i, p in enumerate(paths) if not p.is_file()], format=fmt,
                       capture_problems=problems + _unposed_images(paths, metadata))

    def read(index: int) -> bytes:
        try:
            return paths[index].read_bytes()
        except OSError as exc:
            raise SceneError(paths[index], f"cannot read ({exc.strerror or exc})") from None

    return CaptureScene(meta, read, undistortions)


def _open_colmap(name: str, path: Path) -> CaptureScene:
    model = colmap_model_dir(path)
    if model is None:
        raise SceneError(path, "no COLMAP model here: expected cameras.bin/.txt, images.bin/.txt in it, in sparse/0/ "
                               "or in sparse/")
    try:
        import pycolmap
    except ImportError:
        raise SceneError(model, f"reading a COLMAP model needs pycolmap: {COLMAP_INSTALL}") from None
    try:
        reconstruction = pycolmap.Reconstruction(str(model))
    except Exception as exc:  # pycolmap raises its own types for a damaged model
        raise SceneError(model, f"unreadable COLMAP model ({exc})") from None
    images_dir = next((d / "images" for d in (model, model.parent, model.parent.parent) if (d / "images").is_dir()),
                      model.parent.parent / "images")
    registered = [image for image in reconstruction.images.values() if image.has_pose]
    problems: List[str] = []
    c2ws, intrinsics, declared, lenses = [], [], [], []
    for image in registered:
        camera = image.camera
        c2ws.append(cameras.w2c_to_c2w(torch.from_numpy(image.cam_from_world().matrix())).numpy())
        try:
            k, lens = colmap_camera(camera.model_name, camera.params)
        except ValueError as exc:
            problems.append(f"camera {camera.camera_id}: {exc}")
            # a placeholder that keeps the other problems coming: the capture is refused for this one
            k, lens = np.array([camera.width, camera.width, camera.width / 2, camera.height / 2], float), PINHOLE
        intrinsics.append(k)
        declared.append((camera.height, camera.width))
        lenses.append(lens)
    posed = PosedImages(paths=[images_dir / image.name for image in registered],
                        c2ws=np.array(c2ws, dtype=np.float64).reshape(-1, 4, 4),
                        intrinsics=np.array(intrinsics, dtype=np.float64).reshape(-1, 4),
                        declared_hw=np.array(declared, dtype=np.float64).reshape(-1, 2), lenses=lenses)
    return _folder_capture(name, model, "colmap", posed, list(dict.fromkeys(problems)))


def _number(value, key: str, frame: int, where: Path) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SceneError(where, f"frame {frame}: {key} is {value!r}, not a number") from None
    return number


# Downscaled copies beside images/ (nerfstudio's ns-process-data writes them; DL3DV ships images_4/
# alone): a frame listed under images/ is read from the first of these that holds it. The
# intrinsics are scaled to the size of the image read.
DOWNSCALED_DIRS = ("images_2", "images_4", "images_8")


def _image_path(folder: Path, file_path: str) -> Path:
    """A frame's image: file_path relative to the JSON's folder, else its copy in a downscaled
    folder (DOWNSCALED_DIRS); one without a suffix (NeRF's synthetic scenes, instant-ngp) is the
    first image file of that name."""
    path = folder / file_path
    parts = Path(file_path).parts
    candidates = [path]
    if len(parts) > 1 and parts[0] == "images":
        candidates += [folder.joinpath(downscaled, *parts[1:]) for downscaled in DOWNSCALED_DIRS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if not candidate.suffix:
            found = next((candidate.with_suffix(s) for s in IMAGE_SUFFIXES if candidate.with_suffix(s).is_file()), None)
            if found is not None:
                return found
    return path


def _open_transforms(name: str, path: Path, fmt: Optional[str]) -> CaptureScene:
    """A nerfstudio or instant-ngp capture (fmt None: told apart by `json_flavour`)."""
    metadata = transforms_file(path)
    if metadata is None:
        zipped = " (a DL3DV scene zip is the dl3dv format; reconstruct recognises it)" if path.suffix == ".zip" else ""
        raise SceneError(path, f"no {TRANSFORMS} here (nerfstudio or instant-ngp){zipped}")
    data = read_json(metadata)
    fmt = fmt or json_flavour(data)
    frames = data["frames"]
    for i, frame in enumerate(frames):
        if not (isinstance(frame, dict) and isinstance(frame.get("file_path"), str) and "transform_matrix" in frame):
            raise SceneError(metadata, f"frame {i} needs file_path and transform_matrix")
    paths = [_image_path(metadata.parent, frame["file_path"]) for frame in frames]
    height, width = _first_image_hw(paths, metadata)
    problems: List[str] = []
    c2ws, intrinsics, declared, lenses = [], [], [], []
    for i, frame in enumerate(frames):
        value = lambda key: frame.get(key, data.get(key))
        number = lambda key, default=None: _number(value(key) if value(key) is not None else default, key, i, metadata)
        matrix = np.asarray(frame["transform_matrix"], dtype=object)
        if matrix.shape not in ((4, 4), (3, 4)):
            raise SceneError(metadata, f"frame {i}: transform_matrix is not 4x4 or 3x4")
        c2w = np.eye(4)
        c2w[:matrix.shape[0]] = [[_number(v, "transform_matrix", i, metadata) for v in row] for row in matrix]
        c2ws.append(cameras.opengl_to_opencv(torch.from_numpy(c2w)).numpy())
        w, h = number("w", width), number("h", height)
        if value("fl_x") is not None:
            fx = number("fl_x")
        elif value("camera_angle_x") is not None:
            fx = 0.5 * w / math.tan(0.5 * number("camera_angle_x"))
        else:
            raise SceneError(metadata, f"frame {i}: no focal length; give fl_x (nerfstudio) or camera_angle_x "
                                       "(instant-ngp)")
        if value("fl_y") is not None:
            fy = number("fl_y")
        else:
            fy = 0.5 * h / math.tan(0.5 * number("camera_angle_y")) if value("camera_angle_y") is not None else fx
        intrinsics.append([fx, fy, number("cx", w / 2), number("cy", h / 2)])
        declared.append((h, w))
        try:
            lenses.append(json_lens(value))
        except ValueError as exc:
            problems.append(str(exc))  # once per distinct lens, not per frame
            lenses.append(PINHOLE)
    posed = PosedImages(paths=paths, c2ws=np.array(c2ws).reshape(-1, 4, 4),
                        intrinsics=np.array(intrinsics, dtype=np.float64).reshape(-1, 4),
                        declared_hw=np.array(declared, dtype=np.float64).reshape(-1, 2), lenses=lenses)
    return _folder_capture(name, metadata, fmt, posed, list(dict.fromkeys(problems)), (height, width))


def _open_dl3dv(ref: SceneRef) -> CaptureScene:
    """A DL3DV scene zip through the DL3DV reader, its frames named `zip:member`."""
    zipped, _ = open_nerfstudio_scene(ref, TRANSFORMS, IMAGE_DIRS)
    members = zipped.members
    image_dir = posixpath.dirname(members[0]) if members else ""
    listed = set(members)
    extra = [m for m in zipped.archive.namelist() if posixpath.dirname(m) == image_dir and m not in listed
             and posixpath.splitext(m)[1].lower() in IMAGE_SUFFIXES]
    problems = [unposed_problem(f"{ref.path}:{image_dir}/", len(extra) + len(listed), len(listed),
                                f"{ref.path}:{TRANSFORMS}", [posixpath.basename(m) for m in extra])] if extra else []
    values = {f.name: getattr(zipped.meta, f.name) for f in fields(SceneMeta)}
    values["frame_names"] = [f"{ref.path}:{m}" for m in members]
    meta = CaptureMeta(**values, format="dl3dv", capture_problems=problems)
    return CaptureScene(meta, lambda index: zipped.read(members[index]), close=zipped.close)
