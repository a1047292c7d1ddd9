"""The batch that goes from the data to the loss: `Views` of B scenes, and `Batch` (their context
and target views and the scenes' names).

Every tensor is batched [B, V, ...] (B scenes, V views each); a dataset's item is a batch of one
scene, and `collate` joins items along the scenes. The model reads the context views and the
targets' timesteps; rendering, the loss and the metrics read the target views.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

Device = Union[torch.device, str]


@dataclass
class Views:
    """V posed views of each of B scenes; every field has the leading dims [B, V]."""

    images: Tensor  # [B, V, 3, H, W] RGB in [0, 1]
    masks: Tensor  # [B, V, 1, H, W] foreground masks in [0, 1]; all ones where has_mask is False
    has_mask: Tensor  # [B, V] bool: the mask came from the data (else the mask loss leaves the view out)
    w2c: Tensor  # [B, V, 4, 4] world-to-camera, OpenCV axes (x right, y down, z forward), normalized world
    intrinsics: Tensor  # [B, V, 4] fx, fy, cx, cy in pixels of the H x W images
    timesteps: Tensor  # [B, V] each view's time (its frame index in the raw scene)
    rays: Tensor  # [B, V, 6, H, W] the ray through each pixel's center in Plücker coordinates (o x d, d), |d| = 1

    @property
    def num_views(self) -> int:
        return self.images.shape[1]

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def c2w(self) -> Tensor:
        """[B, V, 4, 4] camera-to-world: w2c inverted at each call (camera paths start from it)."""
        return torch.linalg.inv(self.w2c)

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Views":
        return Views(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def select(self, scenes: slice = slice(None), views: slice = slice(None)) -> "Views":
        """A range of the scenes and of their views."""
        return self.map(lambda t: t[scenes, views])

    @staticmethod
    def cat(parts: Sequence["Views"], dim: int) -> "Views":
        """Join along the scenes (dim 0) or the views (dim 1)."""
        return Views(**{f.name: torch.cat([getattr(p, f.name) for p in parts], dim=dim) for f in fields(Views)})

    def to(self, device: Device, non_blocking: bool = False) -> "Views":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Views":
        return self.map(Tensor.pin_memory)


@dataclass
class Batch:
    """B scenes: their context views (the model's input) and target views (rendered and scored)."""

    context: Views  # [B, V_in, ...], V_in = num_input_views
    target: Views  # [B, V_out, ...], the views after the context
    scene_names: tuple[str, ...]  # [B]

    @classmethod
    def from_views(cls, views: Views, num_context: int, scene_names: Sequence[str]) -> "Batch":
        """The first num_context views as the context, the rest as the targets."""
        return cls(context=views.select(views=slice(None, num_context)),
                   target=views.select(views=slice(num_context, None)), scene_names=tuple(scene_names))

    def all_views(self) -> Views:
        """[B, V_in + V_out, ...]: the context views, then the targets."""
        return Views.cat([self.context, self.target], dim=1)

    def to(self, device: Device, non_blocking: bool = False) -> "Batch":
        return replace(self, context=self.context.to(device, non_blocking), target=self.target.to(device, non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies (DataLoader's pin_memory calls this), so that `to(cuda, non_blocking=True)` overlaps."""
        return replace(self, context=self.context.pin_memory(), target=self.target.pin_memory())


def collate(items: Sequence[Batch]) -> Batch:
    """Batches (a dataset's items) -> one batch of all their scenes; DataLoader's collate_fn."""
    return Batch(context=Views.cat([b.context for b in items], dim=0),
                 target=Views.cat([b.target for b in items], dim=0),
                 scene_names=tuple(name for b in items for name in b.scene_names))
