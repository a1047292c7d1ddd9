"""Render a smooth camera path through the context cameras of reconstructed scenes, and their PLY.

    python scripts/render_trajectory.py --ckpt C [--preset P | --workspace W] --out_dir O \
        [--root DATASET_ROOT] [--evaluation_json J] [--scene_idx I] [--n_scenes K] [--frames 120] [--fps 24]

Any checkpoint and any dataset of the registry: the options come from a preset (a released
checkpoint's own without --preset) or from a training workspace's config.yaml; --root /
--evaluation_json override the dataset's. A DL3DV root is read in the layout found there
(training or benchmark, data/DATA.md), whichever the options name. Scenes are the evaluation
views of the options' first dataset (the JSON's choice where there is one). Per scene: O/trajectory_<scene>.mp4 and O/gaussians_<scene>.ply.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokengs.cameras import path_through_cameras  # noqa: E402
from tokengs.cli import CommandParser  # noqa: E402
from tokengs.data.types import Batch  # noqa: E402
from tokengs.gaussians import Gaussians  # noqa: E402
from tokengs.media import save_video  # noqa: E402
from tokengs.models import TokenGS  # noqa: E402
from tokengs.options import Options  # noqa: E402
from tokengs.rendering import render_path  # noqa: E402
from tokengs.scene_files import save_scene  # noqa: E402

from render_setup import in_layout_of_root, load_for_rendering, rendering_options, scene_range  # noqa: E402


@torch.no_grad()
def render_scene(model: TokenGS, opt: Options, batch: Batch, frames: int) -> tuple[Tensor, Gaussians]:
    """One scene (on the model's device) -> the path's frames [F, 3, H, W] in [0, 1] and its Gaussians [N, ...]."""
    gaussians = Gaussians.unpack(model.forward_gaussians(batch).float())
    context = batch.context
    path = path_through_cameras(context.c2w[0].double().cpu(), frames).float().to(context.w2c.device)
    return render_path(opt, gaussians, path, context.intrinsics[0, 0]).cpu(), gaussians.scene(0)


def main(argv=None) -> None:
    parser = CommandParser(prog="python scripts/render_trajectory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="model weights (.safetensors, .pt, .pth)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a preset name (python -m tokengs.train --help lists them; default: a "
                                         "released checkpoint's own)")
    source.add_argument("--workspace", help="a training workspace: its config.yaml gives the options")
    parser.add_argument("--out_dir", required=True, type=Path)
    parser.add_argument("--root", help="dataset root (overrides the options' root_path)")
    parser.add_argument("--evaluation_json", help="evaluation JSON (overrides the options')")
    parser.add_argument("--scene_idx", type=int, default=0)
    parser.add_argument("--n_scenes", type=int, default=1)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--fps", type=int, default=24)
    args = parser.parse_args(argv)

    problems: list[str] = []
    opt = rendering_options(Path(args.ckpt), args.preset, args.workspace,
                            {"root_path": args.root, "evaluation_json": args.evaluation_json}, problems)
    if opt is not None:
        opt = in_layout_of_root(opt, problems)
    model, dataset, device = load_for_rendering(opt, Path(args.ckpt), problems, "rendering")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for index in scene_range(dataset, args.scene_idx, args.n_scenes):
        batch = dataset[index].to(device)
        frames, gaussians = render_scene(model, opt, batch, args.frames)
        name = batch.scene_names[0]
        video = save_video(args.out_dir / f"trajectory_{name}.mp4", frames, fps=args.fps)
        ply = save_scene(gaussians, batch.context, args.out_dir / f"gaussians_{name}.ply")
        print(f"scene {index} ({name}): {video}, {ply}")


if __name__ == "__main__":
    main()
