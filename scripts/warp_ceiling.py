"""What beating the mean-colour baseline on the synthetic held-out rooms takes: the PSNR of
predictions that know more or less of each room's geometry.

    python scripts/warp_ceiling.py [--scenes 6] [--seed 1] [--data DIR] [--frames F --context K --span S]

The rooms are held-out ones (layout dl3dv_eval, seed 1). By default the old demo protocol: the
generator's 24 frames, context = first and last frame, targets = every frame; with --span, the
benchmarks' protocol (K context views over S frames, targets between them; see
`tokengs.data.synthetic.evaluation_views`). Each target pixel is predicted as
  mean_colour       the mean colour of the context images (the demo's baseline);
  nearest_context   the nearer context image, unwarped;
  constant_depth    back-projected at one depth per room (the context views' median depth) and
                    looked up in the nearest context view that sees it, with the context images
                    blurred first (Gaussian sigma in px; the blur trades detail for alignment);
  true_depth        back-projected with the generator's depth, looked up the same way;
  true_depth_occlusion  the same, skipping context views whose own depth there disagrees;
and the mean colour where no context view sees the pixel. PSNR per room over all its targets
(as the evaluation computes it), then the mean over rooms.
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokengs.cli import CommandParser  # noqa: E402
from tokengs.data.synthetic import GeneratedScene, evaluation_views, generate  # noqa: E402
from tokengs.metrics import psnr  # noqa: E402

BLUR_SIGMAS = (0, 2, 4, 8, 16)
OCCLUSION_TOLERANCE = 0.03  # relative depth difference under which a context view sees the point


def scene_images(scene: GeneratedScene) -> np.ndarray:
    """[F, H, W, 3] float in [0, 1], frames in order, decoded from the scene's archive."""
    with zipfile.ZipFile(scene.path) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        frames = [cv2.imdecode(np.frombuffer(archive.read(n), np.uint8), cv2.IMREAD_COLOR) for n in names]
    return np.stack([f[..., ::-1] for f in frames]).astype(np.float64) / 255.0


def warp(depth: np.ndarray, c2w: np.ndarray, intrinsics: np.ndarray, context: dict, mean: np.ndarray,
         order: Sequence[int], context_depths: Optional[dict] = None) -> np.ndarray:
    """The target view [H, W, 3]: pixel centres back-projected at `depth` [H, W] through the target
    camera c2w [4, 4], each coloured by the first context view in `order` that sees it (in frame,
    in front, and with context_depths: not occluded there); `mean` [3] where none does."""
    H, W = depth.shape
    fx, fy, cx, cy = intrinsics
    v, u = np.mgrid[0:H, 0:W] + 0.5
    camera = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth, np.ones_like(depth)], -1)
    world = camera.reshape(-1, 4) @ c2w.T
    prediction = np.tile(mean, (H * W, 1))
    coloured = np.zeros(H * W, bool)
    for index in order:
        image, context_c2w = context[index]
        points = world @ np.linalg.inv(context_c2w).T
        z = points[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            pu, pv = points[:, 0] / z * fx + cx, points[:, 1] / z * fy + cy
        seen = ~coloured & (z > 1e-3) & (pu >= 0) & (pu < W) & (pv >= 0) & (pv < H)
        iu, iv = pu[seen].astype(int), pv[seen].astype(int)
        if context_depths is not None:
            visible = np.abs(context_depths[index][iv, iu] - z[seen]) < OCCLUSION_TOLERANCE * z[seen]
            seen[np.flatnonzero(seen)[~visible]] = False
            iu, iv = iu[visible], iv[visible]
        prediction[seen] = image[iv, iu]
        coloured |= seen
    return prediction.reshape(H, W, 3)


def room_scores(scene: GeneratedScene, context_frames: Sequence[int], targets: Sequence[int]) -> dict[str, float]:
    """PSNR of every prediction over the target frames of one room."""
    images = scene_images(scene)
    mean = images[list(context_frames)].mean(axis=(0, 1, 2))
    median_depth = float(np.median(scene.depths[list(context_frames)]))
    # context views with their cameras: sharp (blur 0) and blurred
    contexts = {sigma: {c: (cv2.GaussianBlur(images[c], (0, 0), sigma) if sigma else images[c], scene.c2ws[c])
                        for c in context_frames} for sigma in BLUR_SIGMAS}
    context, context_depths = contexts[0], {c: scene.depths[c] for c in context_frames}
    predictions: dict[str, list] = {}
    for t in targets:
        order = sorted(context_frames, key=lambda c: abs(t - c))
        c2w, intrinsics = scene.c2ws[t], scene.intrinsics[t]
        row = {"mean_colour": np.broadcast_to(mean, images[t].shape), "nearest_context": images[order[0]],
               "true_depth": warp(scene.depths[t], c2w, intrinsics, context, mean, order),
               "true_depth_occlusion": warp(scene.depths[t], c2w, intrinsics, context, mean, order, context_depths)}
        for sigma in BLUR_SIGMAS:
            row[f"constant_depth_blur{sigma}"] = warp(np.full_like(scene.depths[t], median_depth), c2w, intrinsics,
                                                      contexts[sigma], mean, order)
        for name, prediction in row.items():
            predictions.setdefault(name, []).append(prediction)
    # one "scene" of all frames: the evaluation's PSNR over every view and pixel
    as_scene = lambda frames: torch.from_numpy(np.ascontiguousarray(frames))[None]
    return {name: float(psnr(as_scene(np.stack(p)), as_scene(images[list(targets)]))) for name, p in predictions.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser(prog="python scripts/warp_ceiling.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=6, help="held-out rooms (the demo evaluates 6)")
    parser.add_argument("--seed", type=int, default=1, help="the demo's held-out rooms use seed 1")
    parser.add_argument("--data", type=Path, help="where to write the rooms (default: a temporary folder)")
    parser.add_argument("--frames", type=int, help="frames per room (default: the generator's)")
    parser.add_argument("--height", type=int, help="image height (default: the generator's)")
    parser.add_argument("--width", type=int, help="image width (default: the generator's)")
    parser.add_argument("--context", type=int, default=2, help="context views")
    parser.add_argument("--span", type=int, help="frames the context views cover (default: the whole clip)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scenes = generate("dl3dv_eval", args.data or Path(scratch), args.scenes, seed=args.seed, frames=args.frames,
                          height=args.height, width=args.width, eval_context=args.context, eval_span=args.span)
        context, targets = evaluation_views(len(scenes[0].c2ws), args.context, args.span)
        rooms = [room_scores(scene, context, targets) for scene in scenes]
    baseline = np.mean([room["mean_colour"] for room in rooms])
    print(f"{'prediction':28s} PSNR dB  vs mean colour")
    for name in rooms[0]:
        score = np.mean([room[name] for room in rooms])
        print(f"{name:28s} {score:6.2f}   {score - baseline:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
