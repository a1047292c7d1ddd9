"""Evaluation metrics per scene, and the LPIPS network (built once, at start-up, without network).

Images are [B, V, 3, H, W] in [0, 1]: B scenes of V views each; every metric returns [B].
Masked metrics multiply both images by the mask [B, V, 1, H, W] first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .rendering.ssim import ssim_skimage_batched

__all__ = ["psnr", "ssim", "lpips", "ssim_skimage_batched", "build_lpips", "lpips_weights_problem",
           "LPIPSWeightsMissing", "VGG16_WEIGHTS"]

VGG16_WEIGHTS = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, the LPIPS backbone


class LPIPSWeightsMissing(RuntimeError):
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
