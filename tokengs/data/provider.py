"""The provider: which views of a scene make a sample (`sample_static_views`,
`sample_dynamic_views`), how raw frames and cameras become the model's inputs
(`preprocess_views`), and the dataset that ties readers to both (`SceneDataset`).

Sampling and preprocessing are pure functions of their arguments (the randomness comes in as a
generator), so that a sample is reproducible from (seed, epoch, index) and the pipeline can be
checked number by number against the release's fixtures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tokengs import cameras
from tokengs.data.scene import DataLoadError, SceneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# View sampling
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewChoice:
    """Indices into a scene's frames: the context views first, then the targets."""

    context: Tuple[int, ...]
    targets: Tuple[int, ...]

    @property
    def indices(self) -> List[int]:
        return list(self.context) + list(self.targets)


def _pick(rng: np.random.Generator, pool: Sequence[int], count: int) -> List[int]:
    """count items of pool, without replacement while the pool lasts (short scenes repeat frames)."""
    if count <= 0:
        return []
    pool = list(pool)
    return [int(pool[i]) for i in rng.choice(len(pool), size=count, replace=count > len(pool))]


def _span(rng: np.random.Generator, num_frames: int, gap: Tuple[float, float]) -> Tuple[int, int]:
    """A (start, end) frame span whose length is drawn uniformly from the gap range, clipped to the scene."""
    longest = num_frames - 1
    lo = min(int(gap[0]), longest)
    hi = min(int(gap[1]), longest)
    length = int(rng.integers(lo, hi + 1))
    start = int(rng.integers(0, num_frames - length))
    return start, start + length


def sample_static_views(rng: np.random.Generator, num_frames: int, num_context: int, num_targets: int,
                        gap: Tuple[float, float]) -> ViewChoice:
    """The release's static sampling: a context span with its length drawn between the dataset's
    min and max gap; the context is its two ends plus sorted frames in between; the targets are
    drawn from the whole span (ends included)."""
    if num_frames < 1:
        raise ValueError("a scene with no frames cannot be sampled")
    start, end = _span(rng, num_frames, gap)
    if num_context == 1:
        context = [start]
    else:
        inner = sorted(_pick(rng, range(start + 1, end), num_context - 2)) if end - start > 1 else \
            [start] * (num_context - 2)
        context = [start] + inner + [end]
    targets = _pick(rng, range(start, end + 1), num_targets)
    return ViewChoice(tuple(context), tuple(targets))


def sample_dynamic_views(rng: np.random.Generator, num_cameras: int, num_frames: int, num_context: int,
                         num_targets: int, gap: Tuple[float, float], interpolate_targets: bool) -> ViewChoice:
    """Views of a multi-camera video (index = camera * num_frames + frame): the context is a grid
    of cameras x frames, time-major, at the two ends of a frame span drawn between the gaps (one
    frame when there is one context view); each target is a random camera at a random frame
    inside the span (use_interp_target) or at one of the context frames."""
    start, end = _span(rng, num_frames, gap)
    times = [start, end] if num_context >= 2 else [start]
    per_time = -(-num_context // len(times))
    chosen_cameras = _pick(rng, range(num_cameras), per_time)
    context = [c * num_frames + t for t in times for c in chosen_cameras][:num_context]
    target_times = range(start, end + 1) if interpolate_targets else times
    targets = [int(rng.integers(num_cameras)) * num_frames + _pick(rng, target_times, 1)[0]
               for _ in range(num_targets)]
    return ViewChoice(tuple(context), tuple(targets))


def sample_generator(*keys: int) -> Tuple[np.random.Generator, torch.Generator]:
    """Independent numpy and torch generators seeded by a tuple of integers (e.g. seed, epoch, index)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)
    return np.random.default_rng(int(state[0])), torch.Generator().manual_seed(int(state[1] >> np.uint64(1)))


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def crop_resize(images: Tensor, out_hw: Tuple[int, int]) -> Tensor:
    """[V, C, Hr, Wr] -> [V, C, H, W]: `cameras.center_crop_box`, then bilinear antialiased resize."""
    top, left, crop_h, crop_w = cameras.center_crop_box(tuple(images.shape[-2:]), out_hw)
    cropped = images[..., top:top + crop_h, left:left + crop_w]
    if tuple(cropped.shape[-2:]) == tuple(out_hw):
        return cropped.contiguous()
    return F.interpolate(cropped, size=tuple(out_hw), mode="bilinear", antialias=True, align_corners=False)


def preprocess_views(opt, rgbs: Tensor, masks: Optional[Tensor], depths: Optional[Tensor], c2ws: Tensor,
                     intrinsics: Tensor, timesteps: Tensor, scene_scale: float, training: bool = False,
                     generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
    """Raw views of one sample -> the model's inputs (the release's batch keys, no batch dim).

    rgbs [V, 3, Hr, Wr] in [0, 1]; masks [V, 1, Hr, Wr] or None (all ones); depths [V, 1, Hr, Wr]
    or None (needed only by the pointmap scale); c2ws [V, 4, 4] OpenCV; intrinsics [V, 4] in raw
    pixels; timesteps [V]. The first opt.num_input_views views are the context. Training applies
    random reflection (opt.random_reflect) drawn from generator.

    Returns, with V_in = num_input_views and H, W = opt.img_size: input [V, 3 + T + 6, H, W];
    images_all [V, 3, H, W] and its parts images_input / images_output; intrinsics_all [V, 4]
    and intrinsics_input / intrinsics; cam_view_all [V, 4, 4] and cam_view_input / cam_view;
    cam_to_world_input [V_in, 4, 4]; rays_os, rays_ds [V, 3, H, W]; masks_all [V, 1, H, W],
    masks_output; has_mask (bool tensor); timesteps [V]. The targets (images_output, intrinsics,
    cam_view, masks_output) are the views after the context, or in training with
    opt.use_input_supervision every view, the context first.
    """
    n_in = opt.num_input_views
    out_hw = tuple(opt.img_size)
    raw_hw = tuple(rgbs.shape[-2:])
    height, width = out_hw
    rgbs, c2ws, intrinsics = rgbs.float(), c2ws.float(), intrinsics.float()
    if not (rgbs.shape[0] == c2ws.shape[0] == intrinsics.shape[0] == timesteps.shape[0]):
        raise ValueError(f"preprocess_views: {rgbs.shape[0]} images, {c2ws.shape[0]} cameras, "
                         f"{intrinsics.shape[0]} intrinsics and {timesteps.shape[0]} timesteps must agree")

    images = crop_resize(rgbs, out_hw)
    has_mask = masks is not None
    masks_out = crop_resize(masks.float(), out_hw) if has_mask else torch.ones(images.shape[0], 1, height, width)
    intrinsics_out = cameras.crop_resize_intrinsics(intrinsics, raw_hw, out_hw)

    c2ws = cameras.normalize_cameras(c2ws, n_in, opt.camera_normalization_method)
    factor = cameras.scene_scale_factor(opt.camera_scale_method, c2ws, n_in, scene_scale, depths, intrinsics,
                                        (opt.pointmap_trim_lo, opt.pointmap_trim_hi))
    c2ws = cameras.scale_translations(c2ws, factor)

    if training and opt.random_reflect and torch.rand((), generator=generator) < 0.5:
        images, masks_out = images.flip(-1), masks_out.flip(-1)
        c2ws = cameras.reflect_c2w(c2ws)
        intrinsics_out = cameras.reflect_intrinsics(intrinsics_out, width)

    cam_view = cameras.c2w_to_cam_view(c2ws)
    rays_o, rays_d = cameras.pixel_rays(c2ws, intrinsics_out, height, width)
    mean = images.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = images.new_tensor(IMAGENET_STD)[:, None, None]
    channels = [(images - mean) / std]
    if opt.time_embedding:
        embedding = cameras.time_embedding(timesteps, opt.time_embedding_dim)
        channels.append(embedding[:, :, None, None].expand(-1, -1, height, width))
    channels.append(cameras.plucker(rays_o, rays_d))

    first_target = 0 if training and opt.use_input_supervision else n_in
    return {
        "input": torch.cat(channels, 1),
        "images_all": images, "images_input": images[:n_in], "images_output": images[first_target:],
        "intrinsics_all": intrinsics_out, "intrinsics_input": intrinsics_out[:n_in],
        "intrinsics": intrinsics_out[first_target:],
        "cam_view_all": cam_view, "cam_view_input": cam_view[:n_in], "cam_view": cam_view[first_target:],
        "cam_to_world_input": c2ws[:n_in],
        "rays_os": rays_o, "rays_ds": rays_d,
        "masks_all": masks_out, "masks_output": masks_out[first_target:],
        "has_mask": torch.tensor(has_mask),
        "timesteps": timesteps.float(),
    }


# ---------------------------------------------------------------------------------------------
# The dataset: scenes -> samples, with resilient loading in training
# ---------------------------------------------------------------------------------------------

log = logging.getLogger("tokengs.data")


@dataclass
class Source:
    """One entry of data_mode: a reader, its scenes for this stage, the scene scale, and the
    evaluation JSON's view choice (None: views drawn per index)."""

    name: str
    spec: object
    reader: object
    scale: float
    scenes: list
    repeat: int = 1
    evaluation: Optional[dict] = None


class SceneDataset(torch.utils.data.Dataset):
    """Samples of the scenes of one stage ('train', 'val' or 'eval'), as dicts of tensors (the
    keys of `preprocess_views`, plus scene_name).

    Training draws views and augmentation from (opt.seed, epoch, index) (`set_epoch`); a scene
    that fails to load is logged once, counted and replaced by another, and after
    opt.max_consecutive_load_failures failures in a row `DataLoadError` stops the run.
    'val' and 'eval' draw from (opt.seed, index) and raise `DataLoadError` naming the file at once.
    """

    def __init__(self, opt, sources: List[Source], stage: str):
        self.opt, self.sources, self.stage = opt, sources, stage
        self.entries = [(k, ref) for k, source in enumerate(sources) for _ in range(source.repeat)
                        for ref in source.scenes]
        self.epoch = 0
        self.load_failures = 0
        self.consecutive_failures = 0
        self._logged: set = set()
        self._bad: set = set()
        self._opts: Dict[int, object] = {}
        if stage == "eval":
            for source in sources:
                for name, entry in (source.evaluation or {}).items():
                    if entry is not None and len(entry["context"]) != opt.num_input_views:
                        raise DataLoadError(f"{source.name}: the evaluation JSON gives scene {name} "
                                            f"{len(entry['context'])} context views but num_input_views is "
                                            f"{opt.num_input_views}; use the JSON of that many views")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def _generators(self, index: int):
        keys = (self.opt.seed, self.epoch, index) if self.stage == "train" else (self.opt.seed, index)
        return sample_generator(*keys)

    def _choose(self, rng: np.random.Generator, source: Source, meta) -> ViewChoice:
        opt = self.opt
        if self.stage == "eval" and source.evaluation is not None:
            entry = source.evaluation[meta.name]
            choice = ViewChoice(tuple(int(i) for i in entry["context"]), tuple(int(i) for i in entry["target"]))
            bad = [i for i in choice.indices if not 0 <= i < meta.num_frames]
            if bad:
                raise SceneError(meta.path, f"the evaluation JSON asks for frames {bad} of a scene with "
                                            f"{meta.num_frames} frames")
            return choice
        num_targets = opt.num_views - opt.num_input_views
        if meta.grid is not None:
            return sample_dynamic_views(rng, meta.grid[0], meta.grid[1], opt.num_input_views, num_targets,
                                        source.spec.gap, opt.use_interp_target)
        return sample_static_views(rng, meta.num_frames, opt.num_input_views, num_targets, source.spec.gap)

    def _options(self, num_views: int):
        if num_views not in self._opts:
            self._opts[num_views] = self.opt if num_views == self.opt.num_views else self.opt.evolve(num_views=num_views)
        return self._opts[num_views]

    def view_choice(self, index: int):
        """(the ViewChoice that `load(index)` makes, the scene's metadata), reading no images."""
        k, ref = self.entries[index]
        source = self.sources[k]
        rng, _ = self._generators(index)
        with source.reader.open(ref) as scene:
            return self._choose(rng, source, scene.meta), scene.meta

    def load(self, index: int, targets: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        """The sample of entry index (raises on any failure). targets: frame indices (camera *
        num_frames + frame for multi-camera scenes) that replace the drawn targets, keeping the
        context (render scripts ask for every camera at one time)."""
        k, ref = self.entries[index]
        source = self.sources[k]
        rng, generator = self._generators(index)
        need_depth = self.opt.camera_scale_method == "pointmap"
        with source.reader.open(ref) as scene:
            meta = scene.meta
            problems = meta.problems()
            if problems:
                raise SceneError(meta.path, "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
            choice = self._choose(rng, source, meta)
            if targets is not None:
                choice = ViewChoice(choice.context, tuple(int(i) for i in targets))
            views = scene.views(choice.indices, depth=need_depth)
        indices = choice.indices
        sample = preprocess_views(
            self._options(len(indices)), views.rgbs, views.masks, views.depths,
            torch.from_numpy(meta.c2ws[indices]).float(), torch.from_numpy(meta.intrinsics[indices]).float(),
            torch.from_numpy(meta.timesteps[indices]).float(), source.scale, training=self.stage == "train",
            generator=generator)
        sample["scene_name"] = meta.name
        return sample

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        if self.stage != "train":
            try:
                return self.load(index)
            except DataLoadError:
                raise
            except Exception as exc:
                raise DataLoadError(f"{self.stage}: scene {self.entries[index][1].name} failed to load: "
                                    f"{_describe(exc, self.entries[index][1].path)}") from exc
        replacement = np.random.default_rng([self.opt.seed, self.epoch, index, 1])
        while True:
            try:
                sample = self.load(index)
                self.consecutive_failures = 0
                return sample
            except Exception as exc:  # any failure of one scene must not end a long run
                self._failed(index, exc)
            candidates = len(self.entries) - len(self._bad)
            index = int(replacement.integers(len(self.entries)))
            while index in self._bad and candidates > 0:
                index = int(replacement.integers(len(self.entries)))

    def _failed(self, index: int, exc: Exception) -> None:
        ref = self.entries[index][1]
        reason = _describe(exc, ref.path)
        self.load_failures += 1
        self.consecutive_failures += 1
        self._bad.add(index)
        if ref.path not in self._logged:
            self._logged.add(ref.path)
            log.warning("skipping scene %s (failure %d, %d in a row): %s", ref.name, self.load_failures,
                        self.consecutive_failures, reason)
        if self.consecutive_failures >= self.opt.max_consecutive_load_failures:
            raise DataLoadError(
                f"{self.consecutive_failures} scenes in a row failed to load (max_consecutive_load_failures="
                f"{self.opt.max_consecutive_load_failures}); the last: {reason}. `python -m tokengs.data.check "
                f"NAME --root ROOT` lists every problem of a dataset") from exc


def _describe(exc: Exception, path) -> str:
    """'path: reason' of a failure (SceneErrors already name their file)."""
    if isinstance(exc, SceneError):
        return str(exc)
    return f"{path}: {type(exc).__name__}: {exc}"
