"""The release's batch dict <-> our `Batch`: the one place where the release's keys are read or written.

The release's provider returned one dict per batch; its reference fixtures hold such dicts:
    input [B, V, 3 + T + 6, H, W]   per view, ImageNet-normalized RGB | T time channels | Plücker rays
    images_all, images_input, images_output      [B, V | V_in | V_out, 3, H, W] in [0, 1]
    intrinsics_all, intrinsics_input, intrinsics  [B, V | V_in | V_out, 4]
    cam_view_all, cam_view_input, cam_view        [B, V | V_in | V_out, 4, 4] world-to-camera TRANSPOSED
    cam_to_world_input [B, V_in, 4, 4]; rays_os, rays_ds [B, V, 3, H, W]
    masks_all, masks_output [B, V | V_out, 1, H, W]; has_mask [B]
V = V_in + V_out: the context views, then the targets (the layout of evaluation; the release's
training with use_input_supervision repeated the context among the targets, which a `Batch`
keeps apart). Ours also wrote timesteps [B, V] and scene_name [B].
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from tokengs.data.types import Batch, Views
from tokengs.models.encoder_input import (PLUCKER_CHANNELS, RGB_CHANNELS, normalized_rgb, rgb_of_normalized,
                                          time_channels, view_time_embeddings)
from tokengs.options import Options

RAY_DIRECTIONS = slice(PLUCKER_CHANNELS // 2, PLUCKER_CHANNELS)  # Plücker (o x d, d): the last three are d


def to_release_dict(batch: Batch, opt: Options) -> dict:
    """The release's dict of `batch`; `input` holds time channels when opt.time_embedding."""
    views = batch.all_views()
    n_in = batch.context.num_views
    channels = [normalized_rgb(views.images)]
    if opt.time_embedding:
        channels.append(time_channels(view_time_embeddings(batch, opt.time_embedding_dim), views.image_hw))
    channels.append(views.rays)
    cam_view = views.w2c.transpose(-1, -2)
    c2w = views.c2w
    directions = views.rays[:, :, RAY_DIRECTIONS]
    return {
        "input": torch.cat(channels, dim=2),
        "images_all": views.images, "images_input": batch.context.images, "images_output": batch.target.images,
        "intrinsics_all": views.intrinsics, "intrinsics_input": batch.context.intrinsics,
        "intrinsics": batch.target.intrinsics,
        "cam_view_all": cam_view, "cam_view_input": cam_view[:, :n_in], "cam_view": cam_view[:, n_in:],
        "cam_to_world_input": c2w[:, :n_in],
        # every pixel's ray starts at its camera's center
        "rays_os": c2w[..., :3, 3, None, None].expand_as(directions), "rays_ds": directions,
        "masks_all": views.masks, "masks_output": batch.target.masks,
        "has_mask": views.has_mask.all(dim=1),
        "timesteps": views.timesteps, "scene_name": list(batch.scene_names),
    }


def from_release_dict(release: Mapping[str, Tensor]) -> Batch:
    """A release dict -> Batch.

    What the release's model read comes from `input`: the context images (un-normalized) and
    every view's rays; in the release's own batches the images equal images_input, while the
    model fixtures' `input` is noise of its own. The times come from `timesteps`, else from the
    time channels of `input`. The targets' images, masks and cameras come from images_output,
    masks_output, cam_view and intrinsics; the context's cameras from cam_to_world_input and
    intrinsics_input, its masks from masks_all (all ones where the dict has none).
    """
    packed = release["input"]
    num_views, n_in = packed.shape[1], release["intrinsics_input"].shape[1]
    if num_views != n_in + release["intrinsics"].shape[1]:
        raise ValueError(f"the release batch's input holds {num_views} views; its {n_in} context and "
                         f"{release['intrinsics'].shape[1]} target cameras need both in it")
    time_width = packed.shape[2] - RGB_CHANNELS - PLUCKER_CHANNELS
    rgb, time, rays = packed.split([RGB_CHANNELS, time_width, PLUCKER_CHANNELS], dim=2)
    timesteps = release["timesteps"] if "timesteps" in release else _times_of_channels(time)
    scene_has_mask = release["has_mask"].bool()[:, None]  # [B, 1]
    target_masks = release["masks_output"]
    if "masks_all" in release:
        context_masks, context_has_mask = release["masks_all"][:, :n_in], scene_has_mask.expand(-1, n_in)
    else:
        context_masks = torch.ones_like(rgb[:, :n_in, :1])
        context_has_mask = torch.zeros_like(scene_has_mask).expand(-1, n_in)
    context = Views(images=rgb_of_normalized(rgb[:, :n_in]), masks=context_masks, has_mask=context_has_mask,
                    w2c=torch.linalg.inv(release["cam_to_world_input"]), intrinsics=release["intrinsics_input"],
                    timesteps=timesteps[:, :n_in], rays=rays[:, :n_in])
    target = Views(images=release["images_output"], masks=target_masks,
                   has_mask=scene_has_mask.expand(-1, num_views - n_in), w2c=release["cam_view"].transpose(-1, -2),
                   intrinsics=release["intrinsics"], timesteps=timesteps[:, n_in:], rays=rays[:, n_in:])
    names = release.get("scene_name", [str(i) for i in range(packed.shape[0])])
    return Batch(context=context, target=target, scene_names=tuple(names))


def _times_of_channels(time: Tensor) -> Tensor:
    """[B, V, T, H, W] time channels (constant per view) -> [B, V] times that embed to them again.

    The channels are [cos(t f_k), sin(t f_k)] with f_0 = 1 and t rescaled to [0, 1] over the
    scene's views, so t = atan2(sin(t), cos(t)); a rescaled t keeps its values when rescaled
    again. Without time channels every view is at time 0.
    """
    if time.shape[2] == 0:
        return torch.zeros(time.shape[:2], dtype=time.dtype, device=time.device)
    half = time.shape[2] // 2
    return torch.atan2(time[:, :, half, 0, 0], time[:, :, 0, 0, 0])


# ---- batch files: one release dict in a safetensors file -----------------------------------------

SCENE_NAMES_METADATA = "scene_name"  # the scenes' names, a JSON list in the file's metadata (not a tensor)


def save_release_batch(batch: Batch, opt: Options, path) -> None:
    """Write `batch` as the release's dict (`to_release_dict`'s tensors, float32, on the CPU) to
    a safetensors file; the scene names go into its metadata."""
    import json

    from safetensors.torch import save_file

    release = to_release_dict(batch, opt)
    names = release.pop("scene_name")
    save_file({key: value.detach().cpu().contiguous() for key, value in release.items()}, str(path),
              metadata={SCENE_NAMES_METADATA: json.dumps(names)})


def load_release_batch(path) -> Batch:
    """A batch file (the release's keys, as `save_release_batch` writes them or the release's own
    batches saved with safetensors) -> Batch on the CPU, through `from_release_dict`."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        release = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata() or {}
    if SCENE_NAMES_METADATA in metadata:
        release[SCENE_NAMES_METADATA] = json.loads(metadata[SCENE_NAMES_METADATA])
    return from_release_dict(release)
