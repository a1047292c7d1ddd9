"""Reconstruct your own capture: posed photos in, Gaussians, renders and a PLY out.

    python -m tokengs.reconstruct --scene PATH --out DIR (--ckpt FILE [--preset NAME] | --workspace W)
        [--context N | --context_frames I J K ...] [--ttt] [--scene_scale S] [--video_frames F]

PATH is a COLMAP model, a nerfstudio or instant-ngp transforms.json, or a DL3DV scene zip
(`tokengs.data.captures`). Its frames go through the datasets' own preprocessing (crop and resize
to the preset's image size, intrinsics adjusted, cameras normalized to the context views and
scaled by the preset's dataset scale or --scene_scale). The context views are --context_frames,
else N frames spread over the capture by camera position (`spread_frames`); every other frame is
a target, rendered and scored. --ttt tunes the reconstruction on its context views first (the
preset's ttt_mode, ttt_n_steps and ttt_lr).

Writes under DIR: gaussians.ply (the 3DGS layout splat viewers open), cameras.json with the
context views (cameras/), renders/NNN_<frame>.png (each target's render beside its photo),
metrics.txt (PSNR and SSIM per target and their mean) and path.mp4 (a smooth path through the
context cameras); prints a summary with the paths and the command that opens the viewer. Every
problem of the command, the checkpoint and the capture is found before the model is built and
before anything is written: one message listing them all, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from tokengs import workspace as ws
from tokengs.cli import CommandParser, add_debug_flag, entry_point
from tokengs.options import Options, OptionsError
from tokengs.threads import usable_cores

if TYPE_CHECKING:
    from tokengs.data.captures import CaptureMeta
    from tokengs.data.types import Batch
    from tokengs.models import TokenGS

log = logging.getLogger("tokengs.reconstruct")

# The released checkpoints (checkpoints/README.md) and the presets they load into, so that
# --preset can be left out for them.
RELEASED_PRESETS = {
    "demo.safetensors": "demo",
    **{f"dl3dv_{v}v.safetensors": f"eval_dl3dv_{v}view" for v in (2, 4, 6)},
    **{f"dl3dv_latent_{v}v_{loss}.safetensors": f"eval_dl3dv_latent_{v}view_{loss}"
       for v in (2, 4, 6) for loss in ("ssim", "lpips")},
}
VIDEO_FPS = 24
# Threads that decode the photos and encode the renders (OpenCV and Pillow release the GIL).
IO_WORKERS = min(8, usable_cores())


@dataclass(frozen=True)
class Request:
    """What to reconstruct and how: the capture, the output folder, the context views (a count
    or explicit frame indices; neither: the preset's num_input_views), tuning, the scene scale
    (None: the preset's dataset scale) and the video's length in frames (0: none)."""

    scene: Path
    out: Path
    context: Optional[int] = None
    context_frames: Optional[Tuple[int, ...]] = None
    ttt: bool = False
    scene_scale: Optional[float] = None
    video_frames: int = 120


@dataclass
class Capture:
    """A capture read and checked: its metadata, every frame decoded ([H, W, 3] arrays, undistorted)
    and the frames chosen as context views and as targets (indices into meta's frames)."""

    meta: "CaptureMeta"
    images: List[np.ndarray]
    context: Tuple[int, ...]
    targets: Tuple[int, ...]


@dataclass
class ViewScore:
    frame: str
    psnr: float
    ssim: float


@dataclass
class Result:
    """What a reconstruction wrote and measured; seconds per phase (read, where the caller timed
    it; preprocess, model, ttt, render_metrics, write, video)."""

    out: Path
    capture: Capture
    num_gaussians: int
    scores: List[ViewScore]
    files: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Choosing the context views
# ---------------------------------------------------------------------------------------------

def spread_frames(positions: np.ndarray, count: int) -> List[int]:
    """`count` frames spread over a capture by camera position: farthest-point sampling of the
    camera centers positions [N, 3], starting from the camera farthest from their mean, each next
    one the farthest from those chosen. Deterministic: equal distances (cameras that share a
    position, e.g. a tripod's) go to the frame farthest in capture order from those chosen, then
    the lowest index; distances within 1e-9 of the coordinates' magnitude count as equal (a pose
    file's rounding: COLMAP's round trip leaves a tripod's centers 1e-15 apart). Returns the chosen
    indices in capture order."""
    frames = np.arange(len(positions))
    resolution = 1e-9 * max(1.0, float(np.abs(positions).max(initial=0.0)))
    score = np.linalg.norm(positions - positions.mean(0), axis=1)  # the first: the farthest from the mean
    nearest = np.full(len(positions), np.inf)  # each frame's distance to the nearest chosen camera
    order_gap = np.zeros(len(positions))  # no frame chosen yet: capture order does not decide
    chosen: List[int] = []
    for _ in range(min(count, len(positions))):
        # lexsort: last key first; ties of distance -> larger gap in capture order -> lower index
        best = int(np.lexsort((frames, -order_gap, -np.round(score / resolution)))[0])
        chosen.append(best)
        nearest = np.minimum(nearest, np.linalg.norm(positions - positions[best], axis=1))
        order_gap = np.abs(frames[:, None] - np.array(chosen)[None]).min(1).astype(float)
        score = nearest.copy()
        score[chosen] = -1.0  # never twice, even where cameras share a position
    return sorted(chosen)


def choose_views(meta: "CaptureMeta", request: Request,
                 count: int) -> Tuple[Tuple[int, ...], Tuple[int, ...], List[str]]:
    """(context, targets, problems): the context views of the request (count of them) and every other frame."""
    frames = meta.num_frames
    if request.context_frames is not None:
        bad = sorted({i for i in request.context_frames if not 0 <= i < frames})
        repeated = sorted({i for i in request.context_frames if request.context_frames.count(i) > 1})
        problems = [f"--context_frames {' '.join(map(str, bad))}: {meta.path} has frames 0 to {frames - 1}"
                    ] if bad else []
        problems += [f"--context_frames names frame {' '.join(map(str, repeated))} twice"] if repeated else []
        if problems:
            return (), (), problems
        context = tuple(request.context_frames)
    elif frames < count:
        return (), (), [f"{meta.path}: {frames} frame(s), fewer than the {count} context views "
                        "(--context N sets another count)"]
    else:
        context = tuple(spread_frames(meta.c2ws[:, :3, 3], count))
    return context, tuple(i for i in range(frames) if i not in context), []


def read_capture(request: Request, count: Optional[int]) -> Tuple[Optional[Capture], List[str]]:
    """Open the capture, check it and decode every frame -> (the capture, []) or (None, its
    problems, each naming its file). count: context views to choose (None: the options are
    broken; the capture is checked all the same)."""
    from tokengs.data.captures import decode_frames, open_capture
    from tokengs.data.scene import SceneError

    try:
        scene = open_capture(request.scene)
    except SceneError as exc:
        return None, [str(exc)]
    with scene:
        meta = scene.meta
        problems = [f"{meta.path}: {problem}" for problem in meta.problems()]
        context, targets = (), ()
        if count is not None:
            context, targets, view_problems = choose_views(meta, request, count)
            problems += view_problems
        present = [i for i in range(meta.num_frames) if i not in meta.missing]  # the missing are named already
        images, frame_problems = decode_frames(scene, present, IO_WORKERS)
    problems += frame_problems
    if problems or count is None:
        return None, problems
    return Capture(meta, images, context, targets), []


# ---------------------------------------------------------------------------------------------
# Options, checkpoint and start-up checks
# ---------------------------------------------------------------------------------------------

def resolve_options(ckpt: Optional[str], preset: Optional[str], workspace: Optional[str],
                    problems: List[str]) -> Tuple[Optional[Options], Path, str]:
    """(options, checkpoint, a name for them) from --ckpt [--preset] or --workspace W (its
    config.yaml and model.safetensors); what is wrong goes to problems (options None)."""
    from tokengs.models.checkpoint import CheckpointError, describe_preset_guess, read_shapes
    from tokengs.options import get_preset

    if workspace is not None:
        config, checkpoint = Path(workspace) / ws.CONFIG_FILE, Path(workspace) / ws.MODEL_FILE
        if not config.is_file():
            problems.append(f"--workspace {workspace}: no config.yaml there (a training workspace writes one)")
            return None, checkpoint, f"workspace {workspace}"
        try:
            return Options.load_yaml(config), checkpoint, f"workspace {workspace}"
        except (OptionsError, ValueError) as exc:
            problems.append(f"--workspace {workspace}: {exc}")
            return None, checkpoint, f"workspace {workspace}"
    checkpoint = Path(ckpt)
    preset = preset or RELEASED_PRESETS.get(checkpoint.name)
    if preset is None:
        try:
            hint = f" ({describe_preset_guess(read_shapes(checkpoint))})"
        except CheckpointError:
            hint = ""  # the checkpoint's own problem is reported by the start-up checks
        problems.append(f"--preset: name the preset of --ckpt {checkpoint}{hint}; only the released checkpoints "
                        "(checkpoints/README.md) go without it")
        return None, checkpoint, "?"
    try:
        return get_preset(preset), checkpoint, f"preset {preset}"
    except OptionsError as exc:
        problems.append(f"--preset: {exc}")
        return None, checkpoint, f"preset {preset}"


def reconstruction_options(opt: Options, count: int) -> Options:
    """The options turned to one capture: evaluation, count context views."""
    return opt.evolve(evaluating=True, use_input_supervision=False, batch_size=1, num_input_views=count,
                      num_views=max(opt.num_views, count))


def startup_problems(opt: Optional[Options], checkpoint: Path, named: str, ttt: bool) -> List[str]:
    """The checkpoint's problems (missing, unreadable, not this model's weights; without options
    only the first two) and the LPIPS weights a tuning loss with an LPIPS term needs."""
    from tokengs.metrics import lpips_weights_problem
    from tokengs.models.checkpoint import checkpoint_file_problems

    # first lines only: they name the file and the preset it fits; the key listings would drown the rest
    problems = [problem.splitlines()[0] for problem in checkpoint_file_problems(checkpoint, named, opt, strict=True)]
    if opt is not None and ttt and opt.lambda_lpips > 0 and (problem := lpips_weights_problem()):
        problems.append(problem)
    return problems


def scene_scale(opt: Options, request: Request) -> float:
    """--scene_scale, else the scale of the preset's first dataset (its _scaled_X suffix)."""
    from tokengs.data.registry import parse_name

    return request.scene_scale if request.scene_scale is not None else parse_name(opt.data_mode[0][0])[1]


# ---------------------------------------------------------------------------------------------
# The reconstruction
# ---------------------------------------------------------------------------------------------

class PhaseTimer:
    """Seconds per named phase, the device synchronized at each end so that GPU work is counted
    where it is queued."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def images_tensor(images: Sequence[np.ndarray], device: torch.device, out_hw: Tuple[int, int]) -> Tensor:
    """[H, W, 3] photos of one size -> [V, 3, *out_hw] float in [0, 1] on device, each center-cropped
    and resized by the datasets' `crop_resize` as soon as it is a float image: the float copies of
    full-size photos (160 MB each at 12 MP) never pile up. 8-bit photos travel as bytes (a quarter
    of the float32 traffic) and become floats there."""
    from tokengs.data.provider import crop_resize
    from tokengs.data.scene import stack_views

    def as_float(image: np.ndarray) -> Tensor:  # [1, 3, H, W]
        if image.dtype == np.uint8:
            return torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float().div_(255.0)
        return stack_views([image], ["photo"], image.shape[:2]).to(device)

    return torch.cat([crop_resize(as_float(image), out_hw) for image in images])


def capture_batch(opt: Options, capture: Capture, scale: float, device: torch.device) -> "Batch":
    """The capture as a batch of one scene (context views, then targets), through the datasets'
    preprocessing (`preprocess_views`), run on `device` (crop, resize and rays there)."""
    from tokengs.data.provider import preprocess_views
    from tokengs.data.types import Batch

    order = list(capture.context) + list(capture.targets)
    meta = capture.meta
    with torch.device(device):  # the pipeline's own tensors (rays, masks) are made there too
        photos = [capture.images[i] for i in order]  # of one size: the capture's reading checked it
        images = images_tensor(photos, device, tuple(opt.img_size))
        views = preprocess_views(opt, images, None, None, torch.from_numpy(meta.c2ws[order]).to(device),
                                 torch.from_numpy(meta.intrinsics[order]).to(device),
                                 torch.from_numpy(meta.timesteps[order]).to(device), scale,
                                 raw_hw=photos[0].shape[:2])
    return Batch.from_views(views, len(capture.context), [meta.name])


def autocast(opt: Options, device: torch.device):
    """The options' mixed precision on CUDA (as evaluation runs the model); float32 elsewhere."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opt.mixed_precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                          enabled=device.type == "cuda" and dtype is not None)


def reconstruct(model: "TokenGS", opt: Options, capture: Capture, request: Request, device: torch.device) -> Result:
    """Reconstruct a checked capture with a built model (on `device`, in eval mode) and write
    everything under request.out (see the module docstring)."""
    from tokengs.losses import LossComputer
    from tokengs.metrics import psnr, ssim
    from tokengs.rendering import render_chunked
    from tokengs.ttt import test_time_tune

    timer = PhaseTimer(device)
    with timer.phase("preprocess"):
        batch = capture_batch(opt, capture, scene_scale(opt, request), device)
    with timer.phase("model"), torch.no_grad(), autocast(opt, device):
        encoding = model.encode(batch)
        packed = model.decode(encoding)
    if request.ttt:
        with timer.phase("ttt"), autocast(opt, device):
            # the training loss (LossComputer builds LPIPS's network where it has a weight)
            packed = test_time_tune(model, encoding, batch.context, opt, LossComputer(opt, device=device))
    packed = packed.float()
    targets = batch.target
    pred = gt = targets.images[0]  # [V_out, 3, H, W]
    values = []
    if targets.num_views:
        with timer.phase("render_metrics"), torch.no_grad():
            pred = render_chunked(opt, packed, targets, chunk_size=opt.eval_render_chunk_size,
                                  depth=False).images[0].clamp(0, 1)
            # one view per "scene": the metrics' per-scene values are then per view
            values = torch.stack([psnr(pred[:, None], gt[:, None]), ssim(pred[:, None], gt[:, None])], 1).tolist()
    names = capture.meta.frame_names
    scores = [ViewScore(names[i], p, s) for i, (p, s) in zip(capture.targets, values)]
    result = Result(request.out, capture, 0, scores)
    with timer.phase("write"):
        result.num_gaussians, result.files = write_outputs(request, opt, batch, packed, pred.cpu(), gt.cpu(), scores,
                                                           capture)
    if request.video_frames > 0:
        with timer.phase("video"):
            video = write_video(opt, packed, batch, request.out / "path.mp4", request.video_frames)
        if video is not None:
            result.files["video"] = video
    result.seconds = timer.seconds
    return result


# ---------------------------------------------------------------------------------------------
# What it writes
# ---------------------------------------------------------------------------------------------

def frame_label(index: int, name: str) -> str:
    """A file name for frame `index` of a capture: its number and its image's stem, e.g. 007_frame_00008."""
    stem = Path(name.rsplit(":", 1)[-1]).stem
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9._-]", "_", stem)


def write_outputs(request: Request, opt: Options, batch: "Batch", packed: Tensor, pred: Tensor, gt: Tensor,
                  scores: Sequence[ViewScore], capture: Capture) -> Tuple[int, dict]:
    """gaussians.ply, cameras.json (the context views, in the Gaussians' frame, with their images),
    renders/ (pred and gt [V_out, 3, H, W] side by side, one PNG per target) and metrics.txt
    -> (Gaussians written, {what: path}). The files are written by a pool of threads at once."""
    from tokengs.gaussians import Gaussians, save_ply
    from tokengs.media import comparison_grid, save_png
    from tokengs.scene_files import CAMERAS_FILE, write_cameras

    out, context, names = request.out, batch.context, capture.meta.frame_names
    renders = out / "renders"
    renders.mkdir(parents=True, exist_ok=True)
    # an earlier run's renders and video would pass for this run's (other targets, no video asked)
    for stale in [*renders.glob("*.png"), out / "path.mp4"]:
        stale.unlink(missing_ok=True)
    files = {"gaussians": out / "gaussians.ply", "cameras": out / CAMERAS_FILE, "renders": renders,
             "metrics": out / "metrics.txt"}

    def render_png(view: int, frame: int) -> None:
        grid = comparison_grid([pred[view:view + 1], gt[view:view + 1]])
        save_png(renders / f"{frame_label(frame, names[frame])}.png", grid, compress_level=1)  # 4x faster than 6

    with ThreadPoolExecutor(IO_WORKERS) as pool:
        count = pool.submit(save_ply, Gaussians.unpack(packed[0]), files["gaussians"])
        jobs = [count, pool.submit(write_cameras, files["cameras"], context.c2w[0].cpu(), context.intrinsics[0].cpu(),
                                   context.images[0].cpu(), names=[frame_label(i, names[i]) for i in capture.context]),
                pool.submit(files["metrics"].write_text, metrics_text(request, opt, capture, scores))]
        jobs += [pool.submit(render_png, view, frame) for view, frame in enumerate(capture.targets)]
        for job in jobs:
            job.result()  # raises what a job raised
    return count.result(), files


def metrics_text(request: Request, opt: Options, capture: Capture, scores: Sequence[ViewScore]) -> str:
    meta = capture.meta
    tuning = f"{opt.resolved_ttt_mode} ({opt.ttt_n_steps} steps, lr {opt.ttt_lr})" if request.ttt else "off"
    lines = [f"# tokengs reconstruct: {meta.path} ({meta.format}, {meta.num_frames} frames)",
             f"# context frames: {' '.join(map(str, capture.context))}", f"# test-time tuning: {tuning}"]
    if scores:
        lines += [f"psnr  {np.mean([s.psnr for s in scores]):.4f}  (mean over {len(scores)} target views)",
                  f"ssim  {np.mean([s.ssim for s in scores]):.4f}", "", "frame      psnr    ssim  image"]
        lines += [f"{i:5d}  {s.psnr:8.4f}  {s.ssim:.4f}  {s.frame}" for i, s in zip(capture.targets, scores)]
    else:
        lines.append("no target views: every frame is a context view")
    return "\n".join(lines) + "\n"


def write_video(opt: Options, packed: Tensor, batch: "Batch", path: Path, frames: int) -> Optional[Path]:
    """An MP4 along a smooth path through the context cameras (in their capture order), or None,
    saying why, where no MP4 encoder works here."""
    from tokengs.cameras import path_through_cameras
    from tokengs.gaussians import Gaussians
    from tokengs.media import save_video
    from tokengs.rendering import render_path

    context = batch.context
    cameras = path_through_cameras(context.c2w[0].double().cpu(), frames).float().to(packed.device)
    with torch.no_grad():
        images = render_path(opt, Gaussians.unpack(packed), cameras, context.intrinsics[0, 0])
    try:
        return save_video(path, images.cpu(), fps=VIDEO_FPS)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"no video: writing {path} failed ({exc})", file=sys.stderr)
        return None


def summary(result: Result, label: str) -> str:
    """The run's outcome for the terminal: what was reconstructed, its scores and every file."""
    from tokengs.view import view_command

    capture, meta = result.capture, result.capture.meta
    phases = ", ".join(f"{name.replace('_', ' + ')} {seconds:.2f}" for name, seconds in result.seconds.items())
    lines = [f"reconstructed {meta.name} ({meta.format}, {meta.num_frames} frames, {label}) in "
             f"{sum(result.seconds.values()):.1f} s ({phases})",
             f"  context frames   {' '.join(map(str, capture.context))}"]
    if result.scores:
        psnr, ssim = (np.mean([getattr(s, name) for s in result.scores]) for name in ("psnr", "ssim"))
        lines.append(f"  targets          {len(result.scores)}: mean PSNR {psnr:.2f} dB, SSIM {ssim:.3f}")
    lines.append(f"  gaussians        {result.files['gaussians']} ({result.num_gaussians} Gaussians)")
    lines += [f"  {what:16s} {path}" for what, path in result.files.items() if what != "gaussians"]
    lines.append(f"  look at it: {view_command(result.out)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = CommandParser(prog="python -m tokengs.reconstruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", required=True, type=Path,
                        help="a COLMAP model (sparse/0/ beside images/), a nerfstudio or instant-ngp transforms.json "
                             "(or its folder), or a DL3DV scene zip")
    parser.add_argument("--out", required=True, type=Path, help="folder for the results (created)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--ckpt", help="model weights (.safetensors, .pt); checkpoints/README.md lists the released")
    weights.add_argument("--workspace", help="a training workspace: its config.yaml and model.safetensors")
    parser.add_argument("--preset", help="the preset of --ckpt (default: the released checkpoint's own)")
    views = parser.add_mutually_exclusive_group()
    views.add_argument("--context", type=int, help="context views, spread over the capture by camera position "
                                                   "(default: the preset's num_input_views)")
    views.add_argument("--context_frames", type=int, nargs="+", metavar="I",
                       help="the context views' frame indices (frames in file-name order, from 0)")
    parser.add_argument("--ttt", action="store_true", help="test-time tuning on the context views (the preset's mode "
                                                           "and steps)")
    parser.add_argument("--scene_scale", type=float, help="camera translations are scaled by this (default: the "
                                                          "preset's dataset scale)")
    parser.add_argument("--video_frames", type=int, default=120, help="frames of path.mp4 (0: no video)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.preset and args.workspace:
        parser.error("--preset goes with --ckpt; a workspace's config.yaml holds its options")
    if args.context is not None and args.context < 1:
        parser.error("--context must be at least 1")
    if args.scene_scale is not None and not args.scene_scale > 0:
        parser.error(f"--scene_scale must be positive, not {args.scene_scale} (it multiplies camera translations)")
    if args.video_frames < 0:
        parser.error(f"--video_frames must be 0 (no video) or more, not {args.video_frames}")
    return args


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m tokengs.reconstruct`: errors follow `tokengs.cli.entry_point`'s rule."""
    from tokengs.cli import work_started
    from tokengs.startup import build_model, raise_problems
    from tokengs.threads import configure_cpu_threads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    request = Request(scene=args.scene, out=args.out, context=args.context,
                      context_frames=tuple(args.context_frames) if args.context_frames else None, ttt=args.ttt,
                      scene_scale=args.scene_scale, video_frames=args.video_frames)
    configure_cpu_threads()
    problems: List[str] = []
    opt, checkpoint, label = resolve_options(args.ckpt, args.preset, args.workspace, problems)
    count = len(request.context_frames) if request.context_frames else request.context
    if opt is not None:
        count = count or opt.num_input_views
        try:
            opt = reconstruction_options(opt, count)
        except OptionsError as exc:
            problems.append(f"--context {count}: {exc}")
            opt = None
    if request.out.exists() and not request.out.is_dir():
        problems.append(f"--out {request.out}: a file, not a folder")
    named = "--ckpt" if args.ckpt else "--workspace's model.safetensors"
    problems += startup_problems(opt, checkpoint, named, request.ttt)
    start = time.perf_counter()
    capture, capture_problems = read_capture(request, count if opt is not None else None)
    read_seconds = time.perf_counter() - start
    raise_problems(problems + capture_problems, "reconstructing")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(opt, checkpoint, strict=True).to(device).eval()
    work_started()  # from here on files are written under --out
    result = reconstruct(model, opt, capture, request, device)
    result.seconds = {"read": read_seconds, **result.seconds}
    print(summary(result, label))


if __name__ == "__main__":
    main()
