"""Evaluation metrics per scene, the SSIM map they share with the training loss, and the LPIPS
network (built once, at start-up, without network).

Images are [B, V, 3, H, W] in [0, 1]: B scenes of V views each; every metric returns [B].
Masked metrics multiply both images by the mask [B, V, 1, H, W] first.

SSIM comes in two definitions, kept apart on purpose: the metric here is scikit-image's
`structural_similarity(gt, pred, win_size=11, gaussian_weights=True, channel_axis=0, data_range=1.0)`
(sample covariance N/(N-1) with N = 11², the 5 px border cropped, mean over channels), so that
scores compare with published ones; the training loss uses fused-ssim's (`losses.fused_ssim_like`).
Both are `ssim_map` with their own padding and covariance normalization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tokengs.errors import UserError

__all__ = ["psnr", "ssim", "lpips", "ssim_map", "ssim_skimage_batched", "build_lpips", "lpips_weights_problem",
           "LPIPSWeightsMissing", "VGG16_WEIGHTS"]

VGG16_WEIGHTS = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, the LPIPS backbone
SSIM_WINDOW_SIZE = 11
SSIM_WINDOW_SIGMA = 1.5
SSIM_C1 = 0.01**2  # (K1 * data_range)^2 with data_range 1
SSIM_C2 = 0.03**2


class LPIPSWeightsMissing(UserError, RuntimeError):
    """torchvision's VGG16 weights are not in the torch hub cache (and nothing may be downloaded)."""


def _apply_mask(pred: Tensor, gt: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return (pred, gt) if mask is None else (pred * mask, gt * mask)


def psnr(pred: Tensor, gt: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """PSNR per scene [B] from the MSE over all of the scene's views and pixels (data range 1)."""
    pred, gt = _apply_mask(pred, gt, mask)
    mse = (pred.float() - gt.float()).square().flatten(1).mean(1)
    return -10 * torch.log10(mse)


def ssim(pred: Tensor, gt: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """scikit-image SSIM per view, averaged over each scene's views -> [B]."""
    pred, gt = _apply_mask(pred, gt, mask)
    return ssim_skimage_batched(pred.float(), gt.float()).mean(1)


def lpips(model: torch.nn.Module, pred: Tensor, gt: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """LPIPS (inputs in [0, 1], normalize=True) per view, averaged over each scene's views -> [B]."""
    pred, gt = _apply_mask(pred, gt, mask)
    values = model(pred.flatten(0, 1).float(), gt.flatten(0, 1).float(), normalize=True)
    return values.view(pred.shape[:2]).mean(1)


# ---- SSIM ------------------------------------------------------------------------------------

def gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalized 1D Gaussian taps [11], sigma 1.5 (also scipy's gaussian_filter taps at truncate 3.5)."""
    x = torch.arange(SSIM_WINDOW_SIZE, dtype=torch.float64) - SSIM_WINDOW_SIZE // 2
    taps = torch.exp(-0.5 * (x / SSIM_WINDOW_SIGMA) ** 2)
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
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov_xy + SSIM_C2)
    denominator = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)
    per_pixel = numerator / denominator
    return per_pixel.reshape(*lead, *per_pixel.shape[-3:])


def ssim_skimage_batched(pred: Tensor, gt: Tensor) -> Tensor:
    """Evaluation SSIM per image [...] of pred, gt [..., C, H, W] in [0, 1], as scikit-image computes it."""
    if min(pred.shape[-2:]) < SSIM_WINDOW_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE}, "
                         f"got {tuple(pred.shape[-2:])}")
    points = SSIM_WINDOW_SIZE**2
    # scikit-image averages each channel's map, then the channels: equal sizes make that one mean
    return ssim_map(pred, gt, padding=0, covariance_norm=points / (points - 1)).mean(dim=(-3, -2, -1))


# ---- LPIPS -----------------------------------------------------------------------------------

def vgg_weights_path() -> Path:
    """Where torchvision looks for (and would download) the VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_WEIGHTS


def lpips_weights_problem() -> Optional[str]:
    """Why LPIPS(VGG) cannot be built here (the VGG16 weights are not in the torch hub cache), or None."""
    path = vgg_weights_path()
    if path.is_file():
        return None
    return (f"LPIPS needs torchvision's VGG16 weights {VGG16_WEIGHTS}, not found at {path}. Copy the file there "
            f"(from https://download.pytorch.org/models/{VGG16_WEIGHTS} on a machine with network), or point "
            f"TORCH_HOME at a cache that holds hub/checkpoints/{VGG16_WEIGHTS}; or run without LPIPS "
            "(--lambda_lpips 0, and drop lpips from --eval_metrics)")


def build_lpips(device: torch.device | str, pretrained: bool = True) -> torch.nn.Module:
    """The LPIPS(VGG) network, frozen, in eval mode, on `device`.

    pretrained=True needs torchvision's VGG16 weights in the torch hub cache; without them this
    raises LPIPSWeightsMissing at once, saying which file to put where (no download is tried).
    pretrained=False gives lpips's randomly initialised VGG backbone (its calibrated linear
    layers ship with the package), the same in every run, for tests on machines without the weights.
    """
    import lpips as lpips_package

    if pretrained and (problem := lpips_weights_problem()):
        raise LPIPSWeightsMissing(problem)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random backbone is the same in every run, without touching the caller's RNG
        model = lpips_package.LPIPS(net="vgg", pretrained=True, pnet_rand=not pretrained, verbose=False)
    model.eval().requires_grad_(False)
    return model.to(device)
