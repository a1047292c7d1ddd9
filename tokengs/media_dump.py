"""Evaluation media for one batch, under the release's names (TAG = batch-process-iteration):
images/{input,pred,gt}_TAG.png, videos/{comparison,pred,gt,input,depth}_TAG.mp4,
depths/depth_TAG.png, gaussians/gaussians_TAG.ply."""

from __future__ import annotations

from pathlib import Path

import torch

from tokengs.gaussians import Gaussians, save_ply
from tokengs.media import colorize_depth, save_image_grid, save_video
from tokengs.options import Options


def dump_media(workspace: Path, tag: str, opt: Options, batch: dict, packed: torch.Tensor, render) -> None:
    """`packed` [1, N, 14] Gaussians of the scene; `render` its target render (images, depths, alphas [1, V, ...])."""
    inputs = batch["images_input"][0].float()
    gt = batch["images_output"][0].float()
    pred = render.images[0].float().clamp(0, 1)
    depth = colorize_depth(render.depths[0], render.alphas[0])
    save_image_grid(workspace / "images" / f"input_{tag}.png", [inputs])
    save_image_grid(workspace / "images" / f"pred_{tag}.png", [pred])
    save_image_grid(workspace / "images" / f"gt_{tag}.png", [gt])
    save_image_grid(workspace / "depths" / f"depth_{tag}.png", [depth])
    fps = 10
    save_video(workspace / "videos" / f"pred_{tag}.mp4", pred, fps)
    save_video(workspace / "videos" / f"gt_{tag}.mp4", gt, fps)
    save_video(workspace / "videos" / f"input_{tag}.mp4", inputs, max(1, fps // 4))
    save_video(workspace / "videos" / f"depth_{tag}.mp4", depth, fps)
    save_video(workspace / "videos" / f"comparison_{tag}.mp4", torch.cat([gt.cpu(), pred.cpu()], dim=-1), fps)
    ply = workspace / "gaussians" / f"gaussians_{tag}.ply"
    ply.parent.mkdir(parents=True, exist_ok=True)  # save_ply writes into an existing folder only
    save_ply(Gaussians.unpack(packed[0].float()), ply)
