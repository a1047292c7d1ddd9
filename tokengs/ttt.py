"""Test-time tuning: an evaluation procedure that adapts the reconstruction of each scene to its
own context views.

The scene is encoded once; then either a copy of the Gaussian tokens (token-tuning) or the scene
latents (scene-latent-tuning, latent-bottleneck models) are optimised so that the decoded
Gaussians, rendered into the CONTEXT views, minimise the options' training loss against the
context images. The model's weights take no part: their requires_grad is turned off for the
duration and restored afterwards, so they come out bit-identical.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from tokengs.data.types import Views
from tokengs.models.tokengs import SceneEncoding, TokenGS
from tokengs.options import Options

__all__ = ["context_targets", "test_time_tune"]

# forward/backward passes make_graphed_callables runs before capture (library and kernel set-up)
GRAPH_WARMUP = 2


def context_targets(context: Views) -> Views:
    """The context views [B, V_in] as the tuning loss's targets: their whole images, masks all
    ones and the mask term off. Tuning fits the images the model was given, background included,
    which is also how the release tunes, so that tuned scores compare with its own."""
    return replace(context, masks=torch.ones_like(context.masks), has_mask=torch.zeros_like(context.has_mask))


def test_time_tune(model: TokenGS, encoding: SceneEncoding, context: Views, opt: Options,
                   loss_fn: Callable) -> Tensor:
    """Tune the tokens or scene latents of `encoding`'s B scenes on their context views [B, V_in]
    (those `encoding` was made from); return the Gaussians decoded from the tuned values, packed
    [B, N, 14], without a graph.

    opt.resolved_ttt_mode picks what is tuned: "token-tuning" optimises per-scene copies of the
    learned tokens [B, num_gs_tokens (+ dynamic), D]; "scene-latent-tuning" optimises a copy of
    encoding.scene_latents [B, num_latents, D] (re-projected to keys/values by every decode), the
    tokens staying the learned ones. Adam (default betas), lr opt.ttt_lr, opt.ttt_n_steps steps.
    loss_fn(packed, targets) -> an object with .loss (a tokengs.losses.LossComputer) is the training
    loss; its dynamic-only auxiliary term is left out: its weight follows the training step, and
    tuning one scene has no training step.
    Every decode leaves out the target time embedding: the context views are rendered while
    tuning. The targets are then rendered from that same time-free decode, which is how the
    release scores tuned models: tuned scores stay comparable with its published ones.

    Nothing in the loop reads a value back to the host, so GPU steps queue without waiting.
    With opt.ttt_cuda_graph, scene-latent tuning on CUDA captures the decode, forward and
    backward, as CUDA graphs once per call and replays them every step (same kernels, no Python
    per layer); token-tuning's decode keeps the GPU busy on its own and runs as it is.
    """
    targets = context_targets(context)
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
