"""What the encoder reads of each view, made from the typed views (`tokengs.data.types`):

- the RGB image, normalized with ImageNet's mean and std (the statistics the released weights
  were trained with);
- the view's time as T constant channels (T = time_embedding_dim, with time_embedding): the
  embedding of its timestep among all of the scene's views, context and targets, so that one
  time means the same for the context and for the target time the Gaussians are decoded at;
- the Plücker rays (6 channels), as the views carry them.

Each goes through its own patch embedding. The release packed the three into one tensor per
view, [3 + T + 6, H, W] in that order; `tokengs.data.release_batch` packs and unpacks that layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokengs import cameras
from tokengs.data.types import Batch

RGB_CHANNELS = 3
PLUCKER_CHANNELS = 6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalized_rgb(images: Tensor) -> Tensor:
    """[..., 3, H, W] in [0, 1] -> (images - ImageNet mean) / ImageNet std, per channel."""
    mean = images.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = images.new_tensor(IMAGENET_STD)[:, None, None]
    return (images - mean) / std


def rgb_of_normalized(normalized: Tensor) -> Tensor:
    """The inverse of `normalized_rgb`: [..., 3, H, W] normalized -> RGB."""
    mean = normalized.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = normalized.new_tensor(IMAGENET_STD)[:, None, None]
    return normalized * std + mean


def view_time_embeddings(batch: Batch, dim: int) -> Tensor:
    """[B, V_in + V_out, dim]: the time embedding of every view, context first, the timesteps
    rescaled over each scene's views (`cameras.time_embedding`)."""
    return cameras.time_embedding(torch.cat([batch.context.timesteps, batch.target.timesteps], dim=1), dim)


def time_channels(embeddings: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """[..., T] -> [..., T, H, W]: each embedding constant over the image."""
    return embeddings[..., None, None].expand(*embeddings.shape, *image_hw)
