"""Test-time tuning (DESIGN.md "Test-time tuning (evaluation)").

The scene is encoded once; then either a copy of the Gaussian tokens (token-tuning) or the scene
latents (scene-latent-tuning, latent-bottleneck models) are optimised so that the decoded
Gaussians, rendered into the CONTEXT views, minimise the options' training loss against the
context images. The model's weights take no part: their requires_grad is turned off for the
duration and restored afterwards, so they come out bit-identical.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Mapping

import torch
from torch import Tensor

from tokengs.losses import RenderTargets
from tokengs.models.tokengs import SceneEncoding, TokenGS
from tokengs.options import Options
from tokengs.rendering.common import w2c_from_cam_view

__all__ = ["context_targets", "test_time_tune"]

# forward/backward passes make_graphed_callables runs before capture (library and kernel set-up)
GRAPH_WARMUP = 2


def context_targets(batch: Mapping[str, Tensor]) -> RenderTargets:
    """The context views as render targets: images_input [B, V_in, 3, H, W], their cameras
    (cam_view_input [B, V_in, 4, 4], else the inverse of cam_to_world_input) and intrinsics_input
    [B, V_in, 4]. Masks are all ones and never apply (has_mask False), as in the release: the
    context images are supervised everywhere."""
    images = batch["images_input"]
    if "cam_view_input" in batch:
        w2c = w2c_from_cam_view(batch["cam_view_input"])
    else:
        w2c = torch.linalg.inv(batch["cam_to_world_input"])
    return RenderTargets(images=images, masks=torch.ones_like(images[:, :, :1]),
                         has_mask=torch.zeros(images.shape[0], dtype=torch.bool, device=images.device),
                         w2c=w2c, intrinsics=batch["intrinsics_input"])


def test_time_tune(model: TokenGS, encoding: SceneEncoding, batch: Mapping[str, Tensor], opt: Options,
                   loss_fn: Callable) -> Tensor:
    """Tune the tokens or scene latents of `encoding`'s B scenes on their context views; return the
    Gaussians decoded from the tuned values, packed [B, N, 14], without a graph.

    opt.resolved_ttt_mode picks what is tuned: "token-tuning" optimises per-scene copies of the
    learned tokens [B, num_gs_tokens (+ dynamic), D]; "scene-latent-tuning" optimises a copy of
    encoding.scene_latents [B, num_latents, D] (re-projected to keys/values by every decode), the
    tokens staying the learned ones. Adam (default betas), lr opt.ttt_lr, opt.ttt_n_steps steps.
    loss_fn(packed, targets) -> an object with .loss (a tokengs.losses.LossComputer) is the training
    loss; its dynamic-only auxiliary term, a training schedule, is not used, as in the release.
    Every decode leaves out the target time embedding: the context views are rendered while
    tuning, and the release renders the targets from that same time-free decode.

    Nothing in the loop reads a value back to the host, so GPU steps queue without waiting.
    With opt.ttt_cuda_graph, scene-latent tuning on CUDA captures the decode, forward and
    backward, as CUDA graphs once per call and replays them every step (same kernels, no Python
    per layer); token-tuning's decode keeps the GPU busy on its own and runs as it is.
    """
    targets = context_targets(batch)
    if opt.resolved_ttt_mode == "scene-latent-tuning":
        tuned = encoding.scene_latents.detach().clone().requires_grad_(True)
        decode = lambda latents: model.decode(encoding, scene_latents=latents, use_target_time=False)
        graphed = opt.ttt_cuda_graph and tuned.is_cuda
    else:
        tokens = model.learned_tokens().detach()
        tuned = tokens.unsqueeze(0).repeat(encoding.batch_size, 1, 1).requires_grad_(True)
        decode = lambda gs_tokens: model.decode(encoding, gs_tokens=gs_tokens, use_target_time=False)
        graphed = False  # its decode keeps the GPU busy: capture costs more than it saves

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([tuned], lr=opt.ttt_lr)
    try:
        # frozen weights: backward computes only the gradient of `tuned`, and no weight gets a .grad
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad(), (_autocast_without_cache(tuned.device) if graphed else nullcontext()):
            step_decode = (torch.cuda.make_graphed_callables(decode, (tuned,), num_warmup_iters=GRAPH_WARMUP)
                           if graphed else decode)
            for _ in range(opt.ttt_n_steps):
                optimizer.zero_grad(set_to_none=True)
                loss_fn(step_decode(tuned), targets).loss.backward()
                optimizer.step()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    with torch.no_grad():
        return decode(tuned)


def _autocast_without_cache(device: torch.device):
    """The caller's autocast state with its weight-cast cache off, as make_graphed_callables
    requires (a cast cached while capturing would live in the graph's private memory)."""
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                          enabled=torch.is_autocast_enabled(device.type), cache_enabled=False)
