"""The rendering loss, for training and test-time tuning alike.

Per scene, over that scene's rendered views:
    lambda_rgb * (L1 or L2) + lambda_mask * has_mask * MSE(alpha, mask) + lambda_ssim * (1 - SSIM) / 2
    + lambda_lpips * LPIPS + lambda_visibility * visibility
averaged over scenes, then + lambda_opacity * mean over all Gaussians of -log(opacity + 1e-6).
With dynamic Gaussians and a dynamic-aux weight, the same loss of the dynamic Gaussians rendered
alone is added with that weight. The targets are `Views` (tokengs.data.types): their images,
masks and cameras.

Every image term is a mean over views of a per-view value, so the loss splits exactly into
per-(scene, view) pieces; `backward_loss` uses that to backpropagate in chunks (mean_of_grads)
or from re-rendered views (deferred_bp) while computing the same value as `compute_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .data.types import Views
from .gaussians import Gaussians
from .metrics import SSIM_WINDOW_SIZE, build_lpips, ssim_map
from .options import Options
from .rendering import RenderOutput, render_chunked

try:
    from fused_ssim import fused_ssim as _fused_ssim_kernel
except ImportError:  # optional CUDA extension
    _fused_ssim_kernel = None

OPACITY_EPS = 1e-6
UNPROJECTABLE = 1e6  # a projection at +-infinity counts as this many pixels away


@dataclass
class LossOutput:
    loss: Tensor  # scalar: what is minimised
    per_scene: dict[str, Tensor]  # term -> [B], unweighted; "total" is each scene's weighted loss
    opacity: Optional[Tensor]  # scalar, unweighted opacity term (None when lambda_opacity is 0)
    psnr: Tensor  # [B] of the render against the composited targets, all views' pixels
    render: RenderOutput
    dyn: Optional["LossOutput"] = None  # the dynamic Gaussians' own loss, when it was added

    def detach(self) -> "LossOutput":
        return LossOutput(loss=self.loss.detach(), per_scene={k: v.detach() for k, v in self.per_scene.items()},
                          opacity=_detach_optional(self.opacity), psnr=self.psnr.detach(), render=self.render.map(Tensor.detach),
                          dyn=None if self.dyn is None else self.dyn.detach())


def _detach_optional(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def _full_precision(t: Tensor) -> Tensor:
    """Half-precision values (autocast outputs) in float32; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ---- the terms --------------------------------------------------------------------------------

def visibility_loss(means: Tensor, w2c: Tensor, intrinsics: Tensor, image_hw: tuple[int, int], threshold: float) -> Tensor:
    """How far outside the target images the Gaussians' centers project [B].

    means [B, N, 3]; w2c [B, V, 4, 4]; intrinsics [B, V, 4]. Per Gaussian, the distance outside
    the image in normalized coordinates ([-1, 1] across the image), at its nearest view; clamped
    at `threshold` when it is > 0; the mean over Gaussians.
    """
    height, width = image_hw
    cam = torch.einsum("bvij,bnj->bvni", w2c[..., :3, :3], means) + w2c[:, :, None, :3, 3]  # [B, V, N, 3]
    fx, fy, cx, cy = (c[:, :, None] for c in intrinsics.unbind(-1))
    # (f·x) / z, in the release's order of operations
    u, v = _divide_by_depth(torch.stack([fx * cam[..., 0], fy * cam[..., 1]], dim=-1), cam[..., 2:])
    u = torch.nan_to_num(u + cx, nan=0.0, posinf=UNPROJECTABLE, neginf=-UNPROJECTABLE)
    v = torch.nan_to_num(v + cy, nan=0.0, posinf=UNPROJECTABLE, neginf=-UNPROJECTABLE)
    u_n, v_n = 2 * u / width - 1, 2 * v / height - 1
    excess = torch.relu(u_n.abs() - 1) + torch.relu(v_n.abs() - 1)  # [B, V, N]
    nearest = excess.min(dim=1).values  # [B, N]
    if threshold > 0:
        nearest = nearest.clamp(max=threshold)
    return nearest.mean(dim=-1)


def _divide_by_depth(xy: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """xy [..., 2] / z [..., 1], split into its two columns, with the plain quotient's values (±inf
    or NaN where z is 0) and a gradient only where the quotient is finite. A center in a camera's
    plane (z exactly 0, which bf16 means hit about once in 17 training steps on an H200) otherwise
    makes the division's backward 0·x/0² = NaN even though the term is clamped there, and that NaN
    reached every weight."""
    quotient = xy / z
    # the backward of xy / z needs xy / z² too: finite as well, or a tiny z (|z| < ~1e-18) overflows it
    finite = torch.isfinite(quotient) & torch.isfinite(quotient / z)
    differentiable = xy / torch.where(finite, z, torch.ones_like(z))
    return torch.where(finite, differentiable, quotient.detach()).unbind(-1)


def fused_ssim_like(pred: Tensor, gt: Tensor) -> Tensor:
    """The loss's SSIM per image [...] of pred, gt [..., C, H, W]; gradients flow to pred.

    fused-ssim's definition (11x11 Gaussian window, sigma 1.5, zero padding "same", population
    statistics, mean over the whole map), which the released models were trained with; on CUDA
    its `fused_ssim` kernel runs when installed, elsewhere `metrics.ssim_map` computes the same
    numbers. (The SSIM metric is scikit-image's, `metrics.ssim_skimage_batched`.)
    """
    if pred.is_cuda and _fused_ssim_kernel is not None:
        # the kernel returns the mean over its whole batch, and differentiates its first argument
        flat_pred, flat_gt = (t.reshape(-1, *t.shape[-3:]).float() for t in (pred, gt))
        values = [_fused_ssim_kernel(p[None].contiguous(), g[None].contiguous(), padding="same", train=True)
                  for p, g in zip(flat_pred, flat_gt)]
        return torch.stack(values).reshape(pred.shape[:-3])
    return ssim_map(pred, gt, padding=SSIM_WINDOW_SIZE // 2, covariance_norm=1.0).mean(dim=(-3, -2, -1))


def composited(targets: Views) -> Tensor:
    """The target images over white where the mask is off: gt * mask + (1 - mask) [B, V, 3, H, W]."""
    return targets.images * targets.masks + (1 - targets.masks)


def opacity_loss(opacities: Tensor) -> Tensor:
    """Mean over all Gaussians of -log(opacity + 1e-6): pushes opacities up (scalar)."""
    return -torch.log(opacities + OPACITY_EPS).mean()


def view_terms(opt: Options, images: Tensor, alphas: Tensor, targets: Views,
               lpips_model: Optional[torch.nn.Module]) -> dict[str, Tensor]:
    """Unweighted image terms per scene and view [B, V]; only those with a nonzero lambda, plus
    "mse" (no gradient, for PSNR). images [B, V, 3, H, W], alphas [B, V, 1, H, W]."""
    gt = composited(targets)
    per_view = lambda t: t.flatten(2).mean(-1)
    error = images - gt
    terms = {"mse": per_view(error.detach().square()),
             "rgb": per_view(error.abs() if opt.rgb_loss_type == "l1" else error.square())}
    if opt.lambda_mask > 0:
        terms["mask"] = per_view((alphas - targets.masks).square()) * targets.has_mask
    if opt.lambda_ssim > 0:
        terms["ssim"] = (1 - fused_ssim_like(images, gt)) / 2
    if opt.lambda_lpips > 0:
        if lpips_model is None:
            raise ValueError("lambda_lpips > 0 needs the LPIPS network: build it once at start-up with "
                             "tokengs.metrics.build_lpips(device) and pass it as lpips_model")
        # LPIPS sees the target as it is, not composited on white
        values = lpips_model(images.flatten(0, 1), targets.images.flatten(0, 1), normalize=True)
        terms["lpips"] = values.view(images.shape[:2])
    return terms


def _weighted_view_loss(opt: Options, terms: dict[str, Tensor]) -> Tensor:
    """sum of lambda * term over the image terms [B, V]."""
    lambdas = {"rgb": opt.lambda_rgb, "mask": opt.lambda_mask, "ssim": opt.lambda_ssim, "lpips": opt.lambda_lpips}
    return sum(lambdas[name] * value for name, value in terms.items() if name in lambdas)


def _gaussian_terms(opt: Options, gaussians: Gaussians, targets: Views) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The terms that need no render: visibility [B] and opacity (scalar), None where their lambda is 0."""
    visibility = opacity = None
    if opt.lambda_visibility > 0:
        visibility = visibility_loss(gaussians.means, targets.w2c, targets.intrinsics, targets.image_hw,
                                     opt.visibility_distance_threshold)
    if opt.lambda_opacity > 0:
        opacity = opacity_loss(gaussians.opacities)
    return visibility, opacity


def _gaussian_loss(opt: Options, visibility: Optional[Tensor], opacity: Optional[Tensor]) -> Optional[Tensor]:
    """Those terms' share of the loss (scalar), None when both are off."""
    parts = []
    if visibility is not None:
        parts.append(opt.lambda_visibility * visibility.mean())
    if opacity is not None:
        parts.append(opt.lambda_opacity * opacity)
    return sum(parts) if parts else None


def _assemble(opt: Options, terms: dict[str, Tensor], visibility: Optional[Tensor], opacity: Optional[Tensor],
              rendered: RenderOutput) -> LossOutput:
    """Per-view terms [B, V] and the Gaussian terms -> LossOutput (the loss is the mean of the
    per-scene totals plus the opacity term)."""
    per_scene = {name: value.mean(1) for name, value in terms.items() if name != "mse"}
    total = _weighted_view_loss(opt, terms).mean(1)
    if visibility is not None:
        per_scene["visibility"] = visibility
        total = total + opt.lambda_visibility * visibility
    per_scene["total"] = total
    loss = total.mean() + (opt.lambda_opacity * opacity if opacity is not None else 0)
    psnr = -10 * torch.log10(terms["mse"].mean(1))
    return LossOutput(loss=loss, per_scene=per_scene, opacity=opacity, psnr=psnr, render=rendered)


def _with_dyn(main: LossOutput, dyn: LossOutput, weight: float) -> LossOutput:
    """Add the dynamic Gaussians' loss with `weight` (its per-scene total shows as "dyn_aux")."""
    per_scene = dict(main.per_scene, dyn_aux=dyn.per_scene["total"],
                     total=main.per_scene["total"] + weight * dyn.per_scene["total"])
    return replace(main, loss=main.loss + weight * dyn.loss, per_scene=per_scene, dyn=dyn)



def _uses_dyn(dyn_gaussians: Optional[Gaussians], dyn_aux_weight: float) -> bool:
    return dyn_gaussians is not None and dyn_aux_weight > 0


# ---- the plain path ---------------------------------------------------------------------------

def _scene_loss(opt: Options, gaussians: Gaussians, targets: Views, lpips_model,
                rendered: Optional[RenderOutput] = None) -> LossOutput:
    """The loss of one set of Gaussians; `rendered` when the caller already rendered them."""
    rendered = render_chunked(opt, gaussians, targets, depth=False) if rendered is None else rendered
    with torch.autocast(device_type=rendered.images.device.type, enabled=False):  # SSIM moments need fp32
        terms = view_terms(opt, rendered.images, rendered.alphas, targets, lpips_model)
        visibility, opacity = _gaussian_terms(opt, gaussians.map(_full_precision), targets)
    return _assemble(opt, terms, visibility, opacity, rendered)


def compute_loss(opt: Options, gaussians: Gaussians, targets: Views, lpips_model: Optional[torch.nn.Module] = None,
                 dyn_gaussians: Optional[Gaussians] = None, dyn_aux_weight: float = 0.0) -> LossOutput:
    """The loss of Gaussians [B, N] rendered into the target views [B, V], with its graph.

    lpips_model: from tokengs.metrics.build_lpips, needed when lambda_lpips > 0. dyn_gaussians
    [B, N_dyn]: the dynamic Gaussians alone, whose loss is added with dyn_aux_weight (the
    schedule's value).
    """
    out = _scene_loss(opt, gaussians, targets, lpips_model)
    if _uses_dyn(dyn_gaussians, dyn_aux_weight):
        out = _with_dyn(out, _scene_loss(opt, dyn_gaussians, targets, lpips_model), dyn_aux_weight)
    return out


# ---- backpropagating differently: deferred_bp, mean_of_grads ---------------------------------

def _backward_deferred(opt: Options, leaf: Gaussians, targets: Views, lpips_model, weight: float) -> LossOutput:
    """Render every view without a graph, backpropagate the loss to the images, then re-render one
    view at a time (all scenes together) with a graph and push the image gradients into `leaf`."""
    with torch.no_grad():
        rendered = render_chunked(opt, leaf, targets, depth=False)
    images, alphas = rendered.images.requires_grad_(), rendered.alphas.requires_grad_()
    out = _scene_loss(opt, leaf, targets, lpips_model, replace(rendered, images=images, alphas=alphas))
    (weight * out.loss).backward()
    for v in range(targets.num_views):
        view = render_chunked(opt, leaf, targets.select(views=slice(v, v + 1)), depth=False)
        pairs = [(out_t, grad[:, v:v + 1]) for out_t, grad in ((view.images, images.grad), (view.alphas, alphas.grad))
                 if grad is not None]
        if pairs:  # no image term on: nothing to push back
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return out.detach()


def _chunk_slices(total: int, step: Optional[int]) -> list[slice]:
    step = total if step is None else step
    return [slice(s, s + step) for s in range(0, total, step)]


def _backward_mean_of_grads(opt: Options, leaf: Gaussians, targets: Views, lpips_model, weight: float) -> LossOutput:
    """Render and backpropagate chunk by chunk into `leaf`, each chunk's graph freed before the next.

    per-scene: chunks of mean_of_grads_scene_chunk_size scenes with all their views; per-view:
    chunks of those scenes times mean_of_grads_view_chunk_size views (None: one view). Each chunk
    contributes its weighted per-view terms / (B V), so the chunks sum to the plain loss.
    """
    num_scenes, num_views = targets.w2c.shape[:2]
    view_step = None if opt.mean_of_grads == "per-scene" else (opt.mean_of_grads_view_chunk_size or 1)
    with torch.autocast(device_type=leaf.means.device.type, enabled=False):
        visibility, opacity = _gaussian_terms(opt, leaf, targets)
    gaussian_loss = _gaussian_loss(opt, visibility, opacity)
    if gaussian_loss is not None:
        (weight * gaussian_loss).backward()
    scene_terms, scene_renders = [], []
    for scenes in _chunk_slices(num_scenes, opt.mean_of_grads_scene_chunk_size):
        chunk_gaussians = leaf.map(lambda t: t[scenes])
        view_terms_, view_renders = [], []
        for views in _chunk_slices(num_views, view_step):
            chunk_targets = targets.select(scenes, views)
            rendered = render_chunked(opt, chunk_gaussians, chunk_targets, depth=False)
            with torch.autocast(device_type=rendered.images.device.type, enabled=False):
                terms = view_terms(opt, rendered.images, rendered.alphas, chunk_targets, lpips_model)
            (weight * _weighted_view_loss(opt, terms).sum() / (num_scenes * num_views)).backward()
            view_terms_.append({name: value.detach() for name, value in terms.items()})
            view_renders.append(rendered.map(Tensor.detach))
        scene_terms.append({name: torch.cat([t[name] for t in view_terms_], dim=1) for name in view_terms_[0]})
        scene_renders.append(RenderOutput.cat(view_renders, dim=1))
    terms = {name: torch.cat([t[name] for t in scene_terms], dim=0) for name in scene_terms[0]}
    return _assemble(opt, terms, _detach_optional(visibility), _detach_optional(opacity),
                     RenderOutput.cat(scene_renders, dim=0))


def backward_loss(opt: Options, gaussians: Gaussians, targets: Views, lpips_model: Optional[torch.nn.Module] = None,
                  dyn_gaussians: Optional[Gaussians] = None, dyn_aux_weight: float = 0.0,
                  backward: Callable[[Tensor], None] = Tensor.backward) -> LossOutput:
    """Compute the loss of `compute_loss` and backpropagate it as the options say; returns it detached.

    Plain: `backward(loss)`. deferred_bp / mean_of_grads: the gradients are first gathered on
    detached copies of the Gaussians' fields, then sent through the model in ONE call,
    `backward(sum(field * gradient))` (a surrogate whose gradient is the loss's), so a caller's
    backward (e.g. accelerator.backward) runs once per step as with the plain path.
    """
    if not opt.deferred_bp and opt.mean_of_grads == "none":
        out = compute_loss(opt, gaussians, targets, lpips_model, dyn_gaussians, dyn_aux_weight)
        backward(out.loss)
        return out.detach()
    strategy = _backward_deferred if opt.deferred_bp else _backward_mean_of_grads
    sets = [(gaussians, 1.0)] + ([(dyn_gaussians, dyn_aux_weight)] if _uses_dyn(dyn_gaussians, dyn_aux_weight) else [])
    outputs, surrogate = [], []
    for source, weight in sets:
        leaf = source.map(lambda t: _full_precision(t.detach()).requires_grad_())
        outputs.append(strategy(opt, leaf, targets, lpips_model, weight))
        for f in fields(Gaussians):
            grad = getattr(leaf, f.name).grad
            if grad is not None and getattr(source, f.name).requires_grad:
                surrogate.append((getattr(source, f.name) * grad.to(getattr(source, f.name).dtype)).sum())
    if surrogate:
        backward(torch.stack(surrogate).sum())
    return outputs[0] if len(outputs) == 1 else _with_dyn(outputs[0], outputs[1], dyn_aux_weight)


# ---- the loss with its LPIPS network, for the training loop, validation and test-time tuning --

GaussiansLike = Union[Gaussians, Tensor]


class LossComputer:
    """The options' loss with the LPIPS network it needs, built once at start-up (so missing VGG
    weights fail there, not hours in). Takes Gaussians or packed [B, N, 14] tensors, and the
    target Views.

    num_static: the first num_static Gaussians are static, the rest dynamic (the model's
    num_static_gaussians); with dyn_aux_weight > 0 (training's schedule, `train.dyn_aux_weight`)
    the loss of the dynamic ones rendered alone is added with that weight.
    """

    def __init__(self, opt: Options, device: Union[torch.device, str] = "cpu",
                 lpips_model: Optional[torch.nn.Module] = None):
        self.opt = opt
        if lpips_model is None and opt.lambda_lpips > 0:
            lpips_model = build_lpips(device)
        self.lpips_model = lpips_model

    def _split(self, gaussians: GaussiansLike, dyn_aux_weight: float,
               num_static: Optional[int]) -> tuple[Gaussians, Optional[Gaussians]]:
        if isinstance(gaussians, Tensor):
            gaussians = Gaussians.unpack(gaussians)
        if num_static is None or dyn_aux_weight <= 0 or num_static >= gaussians.num_gaussians:
            return gaussians, None
        return gaussians, gaussians.select(slice(num_static, None))

    def __call__(self, gaussians: GaussiansLike, targets: Views, dyn_aux_weight: float = 0.0,
                 num_static: Optional[int] = None) -> LossOutput:
        """The loss with its graph (test-time tuning steps on it)."""
        static, dynamic = self._split(gaussians, dyn_aux_weight, num_static)
        return compute_loss(self.opt, static, targets, self.lpips_model, dynamic, dyn_aux_weight)

    def backward(self, gaussians: GaussiansLike, targets: Views, dyn_aux_weight: float = 0.0,
                 num_static: Optional[int] = None, backward: Callable[[Tensor], None] = Tensor.backward) -> LossOutput:
        """Backpropagate as opt.deferred_bp / opt.mean_of_grads say (see `backward_loss`); detached result."""
        static, dynamic = self._split(gaussians, dyn_aux_weight, num_static)
        return backward_loss(self.opt, static, targets, self.lpips_model, dynamic, dyn_aux_weight, backward)

    @torch.no_grad()
    def evaluate(self, gaussians: GaussiansLike, targets: Views) -> LossOutput:
        """The loss and PSNR without a graph (validation)."""
        return self(gaussians, targets).detach()
