"""The provider: which views of a scene make a sample (`sample_static_views`,
`sample_dynamic_views`), how raw frames and cameras become typed views (`preprocess_views`), and
the dataset that ties readers to both (`SceneDataset`), whose items are `Batch`es of one scene.

Sampling and preprocessing are pure functions of their arguments (the randomness comes in as a
generator), so that a sample is reproducible from (seed, epoch, index) and the pipeline can be
checked number by number against the release's fixtures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tokengs import cameras
from tokengs.data.scene import DataLoadError, SceneError
from tokengs.data.types import Batch, Views


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
                     generator: Optional[torch.Generator] = None, raw_hw: Optional[Tuple[int, int]] = None) -> Views:
    """Raw views of one scene -> its Views, a batch of one [1, V, ...] at opt.img_size.

    rgbs [V, 3, Hr, Wr] in [0, 1]; masks [V, 1, Hr, Wr] or None (all ones, has_mask False); depths
    [V, 1, Hr, Wr] or None (needed only by the pointmap scale); c2ws [V, 4, 4] OpenCV; intrinsics
    [V, 4] in raw pixels (raw_hw: the size they are for, default the images'; images already
    cropped and resized by `crop_resize` pass the size they had); timesteps [V]. The first
    opt.num_input_views views are the context: the cameras are normalized to their frame and scaled by opt.camera_scale_method. Training applies
    random reflection (opt.random_reflect) drawn from generator.
    """
    n_in = opt.num_input_views
    out_hw = tuple(opt.img_size)
    raw_hw = tuple(raw_hw or rgbs.shape[-2:])
    height, width = out_hw
    rgbs, intrinsics = rgbs.float(), intrinsics.float()
    if not (rgbs.shape[0] == c2ws.shape[0] == intrinsics.shape[0] == timesteps.shape[0]):
        raise ValueError(f"preprocess_views: {rgbs.shape[0]} images, {c2ws.shape[0]} cameras, "
                         f"{intrinsics.shape[0]} intrinsics and {timesteps.shape[0]} timesteps must agree")

    images = crop_resize(rgbs, out_hw)
    has_mask = masks is not None
    masks_out = crop_resize(masks.float(), out_hw) if has_mask else torch.ones(images.shape[0], 1, height, width)
    intrinsics_out = cameras.crop_resize_intrinsics(intrinsics, raw_hw, out_hw)

    # normalized in float64: georeferenced captures (UTM: 1e6 m) keep their relative poses, which
    # float32 rounds to half a metre before normalization brings them near the origin
    c2ws = cameras.normalize_cameras(c2ws.double(), n_in, opt.camera_normalization_method)
    factor = cameras.scene_scale_factor(opt.camera_scale_method, c2ws.float(), n_in, scene_scale, depths, intrinsics,
                                        (opt.pointmap_trim_lo, opt.pointmap_trim_hi))
    c2ws = cameras.scale_translations(c2ws, factor).float()

    if training and opt.random_reflect and torch.rand((), generator=generator) < 0.5:
        images, masks_out = images.flip(-1), masks_out.flip(-1)
        c2ws = cameras.reflect_c2w(c2ws)
        intrinsics_out = cameras.reflect_intrinsics(intrinsics_out, width)

    rays_o, rays_d = cameras.pixel_rays(c2ws, intrinsics_out, height, width)
    views = Views(images=images, masks=masks_out, has_mask=torch.full(timesteps.shape, has_mask),
                  w2c=torch.linalg.inv(c2ws), intrinsics=intrinsics_out, timesteps=timesteps.float(),
                  rays=cameras.plucker(rays_o, rays_d))
    return views.map(lambda t: t.unsqueeze(0))


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
    """Samples of the scenes of one stage ('train', 'val' or 'eval'), each a `Batch` of one scene
    (`tokengs.data.types.collate` joins them).

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

    def view_choice(self, index: int):
        """(the ViewChoice that `load(index)` makes, the scene's metadata), reading no images."""
        k, ref = self.entries[index]
        source = self.sources[k]
        rng, _ = self._generators(index)
        with source.reader.open(ref) as scene:
            return self._choose(rng, source, scene.meta), scene.meta

    def load(self, index: int, targets: Optional[Sequence[int]] = None) -> Batch:
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
        prepared = preprocess_views(
            self.opt, views.rgbs, views.masks, views.depths,
            torch.from_numpy(meta.c2ws[indices]).float(), torch.from_numpy(meta.intrinsics[indices]).float(),
            torch.from_numpy(meta.timesteps[indices]).float(), source.scale, training=self.stage == "train",
            generator=generator)
        return Batch.from_views(prepared, self.opt.num_input_views, [meta.name])

    def __getitem__(self, index: int) -> Batch:
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
                f"{self.consecutive_failures} loads in a row failed ({len(self._logged)} distinct scene(s) failed "
                f"so far; max_consecutive_load_failures="
                f"{self.opt.max_consecutive_load_failures}); the last: {reason}. `python -m tokengs.data.check "
                f"NAME --root ROOT` lists every problem of a dataset") from exc


def _describe(exc: Exception, path) -> str:
    """'path: reason' of a failure (SceneErrors already name their file)."""
    if isinstance(exc, SceneError):
        return str(exc)
    return f"{path}: {type(exc).__name__}: {exc}"
