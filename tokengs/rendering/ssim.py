"""Two SSIMs, kept apart on purpose (DESIGN.md):

- `fused_ssim_like`: the training loss's SSIM, fused-ssim's definition (11x11 Gaussian window,
  sigma 1.5, zero padding "same", population statistics, mean over the whole map). On CUDA the
  `fused_ssim` kernel is used when installed; our PyTorch version computes the same numbers.
- `ssim_skimage_batched`: the evaluation metric, scikit-image's
  `structural_similarity(gt, pred, win_size=11, gaussian_weights=True, channel_axis=0, data_range=1.0)`
  (sample covariance N/(N-1) with N = 11^2, the 5 px border cropped, mean over channels),
  batched and on any device.
Both take images [..., C, H, W] in [0, 1] and return one value per image [...].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from fused_ssim import fused_ssim as _fused_ssim_kernel
except ImportError:  # optional CUDA extension
    _fused_ssim_kernel = None

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
C1 = 0.01**2  # (K1 * data_range)^2 with data_range 1
C2 = 0.03**2


def gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalized 1D Gaussian taps [11], sigma 1.5 (also scipy's gaussian_filter taps at truncate 3.5)."""
    x = torch.arange(WINDOW_SIZE, dtype=torch.float64) - WINDOW_SIZE // 2
    taps = torch.exp(-0.5 * (x / WINDOW_SIGMA) ** 2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _blur(images: Tensor, padding: int) -> Tensor:
    """Separable Gaussian filter of every channel: [M, K, H, W] -> [M, K, H', W']."""
    channels = images.shape[1]
    taps = gaussian_window(images.dtype, images.device)
    rows = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    images = F.conv2d(images, rows, padding=(padding, 0), groups=channels)
    return F.conv2d(images, cols, padding=(0, padding), groups=channels)


def ssim_map(pred: Tensor, gt: Tensor, padding: int, covariance_norm: float) -> Tensor:
    """Per-pixel SSIM [..., C, H', W'] of images [..., C, H, W].

    padding 5 = zero padding "same" (fused-ssim), 0 = only windows inside the image (the region
    scikit-image keeps after cropping); covariance_norm 1 = population, N/(N-1) = sample statistics.
    """
    lead, (channels, height, width) = pred.shape[:-3], pred.shape[-3:]
    x = pred.reshape(-1, channels, height, width)
    y = gt.reshape(-1, channels, height, width)
    # the five local moments of every channel in one grouped convolution
    moments = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), padding).unflatten(1, (5, channels))
    mu_x, mu_y, xx, yy, xy = moments.unbind(1)
    var_x = covariance_norm * (xx - mu_x * mu_x)
    var_y = covariance_norm * (yy - mu_y * mu_y)
    cov_xy = covariance_norm * (xy - mu_x * mu_y)
    numerator = (2 * mu_x * mu_y + C1) * (2 * cov_xy + C2)
    denominator = (mu_x * mu_x + mu_y * mu_y + C1) * (var_x + var_y + C2)
    ssim = numerator / denominator
    return ssim.reshape(*lead, *ssim.shape[-3:])


def fused_ssim_like(pred: Tensor, gt: Tensor) -> Tensor:
    """Training SSIM per image [...] of pred, gt [..., C, H, W]; gradients flow to pred."""
    if pred.is_cuda and _fused_ssim_kernel is not None:
        # the kernel returns the mean over its whole batch, and differentiates its first argument
        flat_pred, flat_gt = (t.reshape(-1, *t.shape[-3:]).float() for t in (pred, gt))
        values = [_fused_ssim_kernel(p[None].contiguous(), g[None].contiguous(), padding="same", train=True)
                  for p, g in zip(flat_pred, flat_gt)]
        return torch.stack(values).reshape(pred.shape[:-3])
    return ssim_map(pred, gt, padding=WINDOW_SIZE // 2, covariance_norm=1.0).mean(dim=(-3, -2, -1))


def ssim_skimage_batched(pred: Tensor, gt: Tensor) -> Tensor:
    """Evaluation SSIM per image [...] of pred, gt [..., C, H, W] in [0, 1], as scikit-image computes it."""
    if min(pred.shape[-2:]) < WINDOW_SIZE:
        raise ValueError(f"SSIM needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE}, got {tuple(pred.shape[-2:])}")
    points = WINDOW_SIZE**2
    # scikit-image averages each channel's map, then the channels: equal sizes make that one mean
    return ssim_map(pred, gt, padding=0, covariance_norm=points / (points - 1)).mean(dim=(-3, -2, -1))
