"""Render a dynamic (Kubric) model over time: reconstruction, static/dynamic decomposition and
scene flow.

    python scripts/render_kubric_dyn.py --ckpt C [--preset P | --workspace W] --kubric_root R \
        --out_dir O [--scene_idx 0] [--n_scenes 1] [--fps 8] [--trajectory_frames 48] [--tracks 200]

The options come from a preset (finetune_dl3dv_kubric_dyn_release by default) or a finetuned
workspace's config.yaml. Each scene's context views are those evaluation draws (the cameras at
the two ends of a frame span); the context is encoded once, and the Gaussians are decoded at
every frame of the span through the target time embedding. The dynamic Gaussians keep their
index from one time to the next, so their means form trajectories (scene flow).

Per scene, under O/<scene>/:
    fixed_camera.mp4      the reconstruction over time, seen from the first context camera
    trajectory.mp4        a camera path through the context cameras while time runs
    dynamic_only.mp4      only the Gaussians of the dynamic tokens (first context camera)
    static_only.mp4       only those of the static tokens
    inputs_vs_gt.mp4      every context camera over time, renders (top row) above ground truth
    tracks.mp4            the reconstruction with the tracks of the most opaque dynamic Gaussians
    tracks.npz            means [T, N_dyn, 3], opacities [T, N_dyn], colors [T, N_dyn, 3], frames [T],
                          pixels [T, N_dyn, 2] and depths [T, N_dyn] in the first context camera,
                          motion [N_dyn] (track length), on_moving_pixels [N_dyn]
and O/summary.json: per scene, the files and the mean track motion of the visible dynamic
Gaussians that start on pixels where the ground truth moves vs elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokengs.cameras import path_through_cameras, project_points  # noqa: E402
from tokengs.cli import CommandParser  # noqa: E402
from tokengs.data.types import Batch  # noqa: E402
from tokengs.gaussians import Gaussians  # noqa: E402
from tokengs.media import save_video, to_uint8  # noqa: E402
from tokengs.rendering import render_chunked, render_path  # noqa: E402
from tokengs.scene_files import save_scene  # noqa: E402

from render_setup import load_for_rendering, rendering_options, scene_range  # noqa: E402

DEFAULT_PRESET = "finetune_dl3dv_kubric_dyn_release"
VISIBLE_OPACITY = 0.1  # tracks drawn and counted: dynamic Gaussians at least this opaque on average
MOVING_PIXEL_CHANGE = 0.1  # a pixel "moves" where the ground truth changes by this much (max over channels)


def dynamic_model_problems(opt) -> list[str]:
    problems = []
    if opt.num_dynamic_gs_tokens <= 0 or not opt.time_embedding:
        problems.append(f"the options have num_dynamic_gs_tokens={opt.num_dynamic_gs_tokens} and "
                        f"time_embedding={opt.time_embedding}: this script renders dynamic models (a Kubric "
                        f"dynamic preset such as {DEFAULT_PRESET}, or its workspace); for static models use "
                        "scripts/render_trajectory.py")
    if not any(name.startswith("kubric") for name, _ in opt.data_mode):
        problems.append(f"data_mode {opt.data_mode} has no kubric dataset; the script reads multi-camera videos")
    return problems


@torch.no_grad()
def decode_over_time(model, batches: list[Batch]) -> list[Gaussians]:
    """The context (identical in every batch) encoded once, decoded at each batch's first target
    time -> one Gaussians [1, N] per batch."""
    encoding = model.encode(batches[0])
    decoded = []
    for batch in batches:
        at_time = dataclasses.replace(encoding, target_time_tokens=model.target_time_tokens(batch))
        decoded.append(Gaussians.unpack(model.decode(at_time).float()))
    return decoded


def render_views(opt, gaussians: Gaussians, batch: Batch, views: slice = slice(None)) -> Tensor:
    """Gaussians [1, N] seen from the batch's target cameras (a slice of them) -> [V, 3, H, W]."""
    return render_chunked(opt, gaussians, batch.target.select(views=views), chunk_size=8, depth=False).images[0].clamp(0, 1)


def draw_tracks(frame: np.ndarray, pixels: np.ndarray, depths: np.ndarray, upto: int, colors: np.ndarray) -> np.ndarray:
    """Polylines of pixels[:upto + 1, n] for every track n in front of the camera, on a copy of frame."""
    frame = np.ascontiguousarray(frame.copy())
    for n in range(pixels.shape[1]):
        visible = depths[: upto + 1, n] > 0
        points = np.round(pixels[: upto + 1, n][visible]).astype(np.int32)
        if len(points) >= 2:
            cv2.polylines(frame, [points.reshape(-1, 1, 2)], False, colors[n].tolist(), 1, cv2.LINE_AA)
        if len(points):
            cv2.circle(frame, tuple(points[-1].tolist()), 1, colors[n].tolist(), -1, cv2.LINE_AA)
    return frame


def scene_flow(opt, over_time: list[Gaussians], batches: list[Batch], dynamic: Tensor) -> dict[str, Tensor]:
    """The dynamic Gaussians' means over time [T, N_dyn, 3], their opacities and colors, projected
    into the first context camera; each track's length; whether it starts on a pixel where the
    ground truth of that camera changes over the span, and whether it is visible there."""
    means = torch.stack([g.means[0, dynamic] for g in over_time]).cpu()
    opacities = torch.stack([g.opacities[0, dynamic] for g in over_time]).cpu()
    colors = torch.stack([g.colors[0, dynamic] for g in over_time]).cpu()
    targets = batches[0].target  # the first is the first context camera
    pixels, depths = project_points(means, targets.w2c[0, 0].cpu(), targets.intrinsics[0, 0].cpu())
    motion = (means[1:] - means[:-1]).norm(dim=-1).sum(0) if len(means) > 1 else torch.zeros(means.shape[1])
    height, width = opt.img_size
    gt = torch.stack([b.target.images[0, 0] for b in batches]).cpu()  # [T, 3, H, W]
    moving_pixels = (gt - gt[:1]).abs().amax(dim=(0, 1)) > MOVING_PIXEL_CHANGE
    centers = pixels - 0.5  # pixel (i, j) is centered at (i + 0.5, j + 0.5)
    u, v = centers[0, :, 0].round().long(), centers[0, :, 1].round().long()
    inside = (depths[0] > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    on_moving = torch.zeros_like(inside)
    on_moving[inside] = moving_pixels[v[inside], u[inside]]
    return {"means": means, "opacities": opacities, "colors": colors, "pixels": pixels, "depths": depths,
            "motion": motion, "on_moving_pixels": on_moving,
            "visible": inside & (opacities.mean(0) >= VISIBLE_OPACITY)}


def tracks_video(fixed: Tensor, flow: dict[str, Tensor], count: int) -> np.ndarray:
    """The fixed-camera frames [T, 3, H, W] with the tracks of the `count` most opaque visible
    dynamic Gaussians drawn up to each frame -> [T, H, W, 3] uint8."""
    visible = torch.nonzero(flow["visible"]).flatten()
    drawn = visible[flow["opacities"].mean(0)[visible].argsort(descending=True)[:count]]
    hues = np.linspace(0, 179, max(len(drawn), 1), endpoint=False).astype(np.uint8)
    palette = cv2.cvtColor(np.stack([hues, np.full_like(hues, 255), np.full_like(hues, 255)], -1)[None],
                           cv2.COLOR_HSV2RGB)[0]
    centers, depths = (flow["pixels"][:, drawn] - 0.5).numpy(), flow["depths"][:, drawn].numpy()
    base = to_uint8(fixed.cpu())
    return np.stack([draw_tracks(base[t], centers, depths, t, palette) for t in range(len(base))])


def render_scene(model, opt, dataset, index: int, out: Path, args, device: torch.device) -> dict:
    choice, meta = dataset.view_choice(index)
    _, num_frames = meta.grid
    context_cameras = list(dict.fromkeys(i // num_frames for i in choice.context))
    context_frames = sorted({i % num_frames for i in choice.context})
    frames = list(range(context_frames[0], context_frames[-1] + 1))
    # every context camera at each frame of the span: the first target (the first context camera)
    # sets the decoding time; all of them give the ground truth for inputs_vs_gt
    batches = [dataset.load(index, targets=[c * num_frames + f for c in context_cameras]).to(device) for f in frames]
    name = batches[0].scene_names[0]
    out = out / name.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    over_time = decode_over_time(model, batches)
    dynamic = model.dynamic_gaussian_mask().to(device)
    first_camera = slice(0, 1)

    def each_time(render) -> Tensor:
        return torch.stack([render(g, b) for g, b in zip(over_time, batches)]).cpu()

    fixed = each_time(lambda g, b: render_views(opt, g, b, first_camera)[0])
    videos = {
        "fixed_camera": fixed,
        "dynamic_only": each_time(lambda g, b: render_views(opt, g.select(dynamic), b, first_camera)[0]),
        "static_only": each_time(lambda g, b: render_views(opt, g.select(~dynamic), b, first_camera)[0]),
        "inputs_vs_gt": each_time(lambda g, b: torch.cat([torch.cat(list(render_views(opt, g, b)), dim=-1),
                                                           torch.cat(list(b.target.images[0].clamp(0, 1)), dim=-1)],
                                                          dim=-2)),
    }
    # the camera moves through the context cameras while time runs over the span
    context = batches[0].context
    path = path_through_cameras(context.c2w[0, : len(context_cameras)].double().cpu(),
                                args.trajectory_frames).float().to(device)
    time_of_frame = np.round(np.linspace(0, len(frames) - 1, args.trajectory_frames)).astype(int)
    intrinsics = context.intrinsics[0, 0]
    videos["trajectory"] = torch.cat([render_path(opt, over_time[t], path[k:k + 1], intrinsics)
                                      for k, t in enumerate(time_of_frame)]).cpu()

    flow = scene_flow(opt, over_time, batches, dynamic)
    np.savez(out / "tracks.npz", frames=np.array(frames), **{k: v.numpy() for k, v in flow.items()})
    save_scene(over_time[0].scene(0), batches[0].context, out / "gaussians.ply")  # the tracks start at its means
    videos["tracks"] = tracks_video(fixed, flow, args.tracks)
    written = {key: str(save_video(out / f"{key}.mp4", value, fps=args.fps)) for key, value in videos.items()}
    written["tracks_npz"] = str(out / "tracks.npz")

    visible, on_moving, motion = flow["visible"], flow["on_moving_pixels"], flow["motion"]

    def mean_motion(mask: Tensor):
        return float(motion[mask].mean()) if bool(mask.any()) else None

    return {"scene": name, "frames": frames, "context_cameras": context_cameras,
            "files": written, "dynamic_gaussians": int(dynamic.sum()), "visible_dynamic": int(visible.sum()),
            "mean_motion_on_moving_pixels": mean_motion(visible & on_moving),
            "mean_motion_elsewhere": mean_motion(visible & ~on_moving),
            "visible_on_moving_pixels": int((visible & on_moving).sum())}


def main(argv=None) -> None:
    parser = CommandParser(prog="python scripts/render_kubric_dyn.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="model weights (.safetensors, .pt, .pth)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"a dynamic preset (default {DEFAULT_PRESET})")
    source.add_argument("--workspace", help="a finetuned workspace: its config.yaml gives the options")
    parser.add_argument("--kubric_root", required=True, help="Kubric-layout root (data/kubric: v0/<scene>/...)")
    parser.add_argument("--out_dir", required=True, type=Path)
    parser.add_argument("--scene_idx", type=int, default=0)
    parser.add_argument("--n_scenes", type=int, default=1)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--trajectory_frames", type=int, default=48)
    parser.add_argument("--tracks", type=int, default=200, help="tracks drawn in tracks.mp4 (the most opaque)")
    args = parser.parse_args(argv)

    problems: list[str] = []
    if not Path(args.kubric_root).is_dir():
        problems.append(f"--kubric_root {args.kubric_root}: no such folder (`python -m tokengs.data.synthetic "
                        f"--layout kubric --out {args.kubric_root} --scenes 2` makes a synthetic one)")
    opt = rendering_options(args.ckpt, args.preset or (None if args.workspace else DEFAULT_PRESET), args.workspace,
                            {"root_path": args.kubric_root}, problems)
    model, dataset, device = load_for_rendering(opt, args.ckpt, problems, "rendering", dynamic_model_problems)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = [render_scene(model, opt, dataset, index, args.out_dir, args, device)
               for index in scene_range(dataset, args.scene_idx, args.n_scenes)]
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    shown = lambda motion: "none (no such Gaussian)" if motion is None else f"{motion:.4f}"  # noqa: E731
    for scene in summary:
        print(f"{scene['scene']}: {len(scene['frames'])} frames, {scene['visible_dynamic']} visible dynamic "
              f"Gaussians; mean track motion {shown(scene['mean_motion_on_moving_pixels'])} on moving pixels vs "
              f"{shown(scene['mean_motion_elsewhere'])} elsewhere; files in {Path(scene['files']['tracks_npz']).parent}")


if __name__ == "__main__":
    main()
