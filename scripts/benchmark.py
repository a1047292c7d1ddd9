"""Speed and memory of the release's anchor cases: its measured times (RELEASE_MS) beside ours.

    python scripts/benchmark.py [--cases train_6view_b4 ttt_6view ...] [--json OUT] [--smoke]

Every case runs on random inputs of the preset's real shapes (posed random images through the
real input pipeline), SSIM and LPIPS terms off like the anchors, bf16 autocast on CUDA and the
fused AdamW of training. Per case: median, min and max milliseconds over the timed repeats after
warm-up, peak GiB, and model TFLOP/s (the model's forward FLOPs from torch's FLOP counter, x3 for
a training step; rendering is not counted). `--smoke` runs every case at the `tiny` presets' size
on whatever device there is (a CPU test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokengs.data.provider import preprocess_views  # noqa: E402
from tokengs.data.types import Batch, collate  # noqa: E402
from tokengs.losses import LossComputer  # noqa: E402
from tokengs.models import TokenGS  # noqa: E402
from tokengs.options import Options, get_preset  # noqa: E402
from tokengs.rendering import render_chunked  # noqa: E402
from tokengs.train import build_optimizer  # noqa: E402
from tokengs.ttt import test_time_tune  # noqa: E402

# The anchors: the release's times on one H100, measured with its own code, and our targets (the GPU speed issue).
RELEASE_MS = {"train_6view_b4": 597, "train_6view_b1": 171, "train_latent_b4": 1039, "recon_6view": 56.5,
              "ttt_6view": 6633, "recon_latent": 126, "ttt_latent": 6974}
TARGET_MS = {"train_6view_b4": 300, "train_latent_b4": 520, "recon_6view": 28, "ttt_6view": 1600,
             "ttt_latent": 1700}


@dataclass(frozen=True)
class Case:
    preset: str
    kind: str  # "train", "recon" or "ttt"
    batch_size: int = 1


CASES = {
    "train_6view_b1": Case("finetune_dl3dv_6view", "train", 1),
    "train_6view_b4": Case("finetune_dl3dv_6view", "train", 4),
    "train_latent_b1": Case("finetune_dl3dv_latent_6view_ssim", "train", 1),
    "train_latent_b4": Case("finetune_dl3dv_latent_6view_ssim", "train", 4),
    "recon_6view": Case("eval_dl3dv_6view", "recon"),
    "ttt_6view": Case("eval_dl3dv_6view", "ttt"),
    "recon_latent": Case("eval_dl3dv_latent_6view_ssim", "recon"),
    "ttt_latent": Case("eval_dl3dv_latent_6view_ssim", "ttt"),
}
SMOKE_PRESETS = {"finetune_dl3dv_6view": "tiny", "eval_dl3dv_6view": "tiny", "finetune_dl3dv_latent_6view_ssim": "tiny_latent",
                 "eval_dl3dv_latent_6view_ssim": "tiny_latent"}


def case_options(case: Case, smoke: bool, **switches: bool) -> Options:
    """The case's preset, SSIM and LPIPS off; switches: activation_checkpointing, compile_blocks."""
    opt = get_preset(SMOKE_PRESETS[case.preset] if smoke else case.preset)
    changes = dict(lambda_ssim=0.0, lambda_lpips=0.0, batch_size=case.batch_size, **switches)
    if case.kind != "train":
        changes.update(evaluating=True)
    if smoke:
        changes.update(ttt_n_steps=2)
        if case.kind != "train" and "latent" in case.preset:
            changes.update(ttt_mode="scene-latent-tuning")
    return opt.evolve(**changes)


def random_batch(opt: Options, device: torch.device, seed: int = 0) -> Batch:
    """B scenes of random images through the real input pipeline, seen by cameras on a narrow arc
    around a point 2 units ahead, the context views spread along it and the targets between
    them, so that every view sees the Gaussians of a fresh model (which start 0.1 to 1 unit ahead
    of the normalized camera). Training batches carry num_views views, evaluation ones
    num_input_views context views and 8 targets."""
    generator = torch.Generator().manual_seed(seed)
    height, width = opt.img_size
    num_views = opt.num_views if not opt.evaluating else opt.num_input_views + 8
    scenes = []
    for index in range(opt.batch_size):
        context = torch.linspace(0, num_views - 1, opt.num_input_views).round().long()
        targets = torch.tensor([i for i in range(num_views) if i not in set(context.tolist())], dtype=torch.long)
        angles = torch.linspace(-0.02, 0.02, num_views)[torch.cat([context, targets])]
        c2ws = torch.eye(4).repeat(num_views, 1, 1)
        c2ws[:, 0, 0], c2ws[:, 0, 2], c2ws[:, 2, 0], c2ws[:, 2, 2] = angles.cos(), angles.sin(), -angles.sin(), angles.cos()
        c2ws[:, 0, 3], c2ws[:, 2, 3] = -2 * angles.sin(), 2 - 2 * angles.cos()  # looking at (0, 0, 2)
        intrinsics = torch.tensor([0.8 * width, 0.8 * width, width / 2, height / 2]).repeat(num_views, 1)
        rgbs = torch.rand(num_views, 3, height, width, generator=generator)
        views = preprocess_views(opt, rgbs, None, None, c2ws, intrinsics, torch.arange(num_views, dtype=torch.float32),
                                 scene_scale=1.0)
        scenes.append(Batch.from_views(views, opt.num_input_views, [f"random_{index}"]))
    return collate(scenes).to(device)


# A trained model's Gaussians, roughly: centers spread over the views 0.6 to 6 units ahead, sizes
# of a pixel or two, opacities around one half. Raw head outputs (before the activations):
# x, y ~ N(0, 0.35); z ~ N(the raw value of depth 2, 0.5); scale ~ N(-1.9, 0.5), i.e. cap·e^(raw - 1);
# opacity ~ N(2, 1), i.e. sigmoid(raw - opacity_bias).
SPREAD_RAW = {"xy_std": 0.35, "depth": 2.0, "depth_log_std": 0.5, "scale_mean": -1.9, "scale_std": 0.5,
              "opacity_mean": 2.0, "opacity_std": 1.0}


@torch.no_grad()
def spread_gaussians(model: TokenGS, batch: Batch) -> None:
    """Re-draw the activation head so that the fresh model's Gaussians spread like a trained
    model's (SPREAD_RAW) instead of sitting in one clump in front of the cameras, where each covers
    most of the image and rendering costs many times what it costs for a real scene. The weights
    are scaled to the features the head actually receives, so every Gaussian gets its own draw."""
    from tokengs.models.head import POSITION_Z, RAW_LAYOUT, inverse_position_activation

    head = model.activation_head
    features = {}
    handle = head.register_forward_pre_hook(lambda _, args: features.setdefault("x", args[0]))
    model.forward_gaussians(batch)
    handle.remove()
    x = features["x"].float()
    centered_norm = float((x - x.mean(dim=(0, 1))).norm(dim=-1).mean())  # |token - mean token|
    mean_token = x.mean(dim=(0, 1))
    weight, bias = head.deconv.weight, head.deconv.bias
    per_gaussian = lambda t: t.view(head.gaussians_per_token, -1, *t.shape[1:])  # [G, 14, ...]
    w, b = per_gaussian(weight), per_gaussian(bias)
    generator = torch.Generator(device=weight.device).manual_seed(0)

    def draw(rows: slice, std: float, mean: float) -> None:
        # output = w·(x - mean_token) + (w·mean_token + b): std over tokens `std`, mean `mean`
        w[:, rows] = torch.randn(w[:, rows].shape, generator=generator, device=w.device) * (std / centered_norm)
        b[:, rows] = mean - torch.einsum("grd,d->gr", w[:, rows].float(), mean_token).to(b.dtype)

    ends = torch.tensor([width for _, width in RAW_LAYOUT]).cumsum(0).tolist()
    rows = {name: slice(end - width, end) for (name, width), end in zip(RAW_LAYOUT, ends)}
    r = SPREAD_RAW
    position = rows["position"]
    draw(slice(position.start, position.start + POSITION_Z), r["xy_std"], 0.0)
    z_raw = inverse_position_activation(r["depth"] - model.opt.gaussian_z_offset)
    draw(slice(position.start + POSITION_Z, position.stop), r["depth_log_std"], z_raw)
    draw(rows["rgb"], 1.0, 0.0)
    draw(rows["scale"], r["scale_std"], r["scale_mean"])
    draw(rows["opacity"], r["opacity_std"], r["opacity_mean"])


def forward_flops(model: TokenGS, batch: Batch, autocast) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # with grad enabled: the counter's module tracker hooks autograd and fails under no_grad;
    # eager, so that compiled blocks are counted op by op
    with torch.compiler.set_stance("force_eager"), autocast(), counter:
        model.forward_gaussians(batch)
    return float(counter.get_total_flops())


def time_it(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def profile_step(step: Callable[[], None], device: torch.device, rows: int = 15) -> str:
    """The operators that dominate one step, by device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run_case(name: str, smoke: bool, device: torch.device, warmup: int, repeats: int, profile: bool = False,
             gaussians: str = "fresh", **switches) -> dict:
    case = CASES[name]
    opt = case_options(case, smoke, **switches)
    if opt.compile_blocks:  # a fresh compile per case, as in a run: the recompile limit counts across cases
        torch._dynamo.reset()
    torch.manual_seed(0)
    model = TokenGS(opt).to(device)
    batch = random_batch(opt, device)
    if gaussians == "spread":
        spread_gaussians(model, batch)
    loss = LossComputer(opt, device=device)
    on_cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else nullcontext

    if case.kind == "train":
        model.train()
        optimizer = build_optimizer(opt, model)

        def step() -> None:
            with autocast():
                packed = model.forward_gaussians(batch)
            loss.backward(packed.float(), batch.target)
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.gradient_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()
        encoding_cache = {}

        def reconstruct() -> torch.Tensor:
            with torch.no_grad(), autocast():
                encoding_cache["encoding"] = model.encode(batch)
                return model.decode(encoding_cache["encoding"])

        if case.kind == "recon":
            step = reconstruct
        else:
            reconstruct()

            def step() -> None:
                with autocast():
                    test_time_tune(model, encoding_cache["encoding"], batch.context, opt, loss)

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = time_it(step, device, warmup, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else float("nan")
    flops = forward_flops(model, batch, autocast)
    median = statistics.median(times)
    # model FLOPs per timed step: forward x3 for training; one forward-equivalent per tuning step
    # would overstate the decoder-only work of tuning, so tuning reports the reconstruction's rate
    multiplier = 3 if case.kind == "train" else 1
    result = {"case": name, "preset": opt_name(case, smoke), "batch_size": opt.batch_size,
              "gaussians": gaussians, **switches, **tile_statistics(opt, model, batch), "median_ms": median,
              "min_ms": min(times), "max_ms": max(times), "repeats": len(times), "peak_gib": peak,
              "model_tflops": flops * multiplier / (median / 1e3) / 1e12 if case.kind != "ttt" else None,
              "release_ms": None if smoke else RELEASE_MS.get(name), "target_ms": None if smoke else TARGET_MS.get(name)}
    if profile:
        result["profile"] = profile_step(step, device)
    del model, batch, loss
    if on_cuda:
        torch.cuda.empty_cache()
    return result


@torch.no_grad()
def tile_statistics(opt, model: TokenGS, batch: Batch) -> dict:
    """What rendering the case's Gaussians costs, in the batch's target views: the mean screen
    radius (px) of the Gaussians in view, and the (Gaussian, tile) pairs per view that the
    rasterizer sorts at the options' tile size (their bounding boxes clipped to the image)."""
    out = render_chunked(opt, model.gaussians(batch), batch.target)
    radii, centers = out.radii.float(), out.means2d.float()  # [B, V, N, 2]
    visible = (radii > 0).all(-1)
    tile = opt.render_tile_size
    grid = torch.tensor([math.ceil(opt.img_size[1] / tile), math.ceil(opt.img_size[0] / tile)], device=radii.device)
    first = torch.minimum(torch.maximum(((centers - radii) / tile).floor(), torch.zeros_like(grid)), grid)
    last = torch.minimum(torch.maximum(((centers + radii) / tile).ceil(), torch.zeros_like(grid)), grid)
    pairs = (last - first).prod(-1) * visible
    return {"mean_radius_px": float(radii.amax(-1)[visible].mean()) if visible.any() else 0.0,
            "tile_pairs_per_view": float(pairs.sum() / (radii.shape[0] * radii.shape[1]))}


def opt_name(case: Case, smoke: bool) -> str:
    return SMOKE_PRESETS[case.preset] if smoke else case.preset


def table(results: list[dict]) -> str:
    head = ["case", "median ms", "min", "max", "peak GiB", "TFLOP/s", "release ms", "target ms", "vs release"]
    rows = [head]
    for r in results:
        ratio = f"{r['release_ms'] / r['median_ms']:.2f}x" if r["release_ms"] else "-"
        rows.append([r["case"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['max_ms']:.1f}",
                     "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.1f}",
                     "-" if r["model_tflops"] is None else f"{r['model_tflops']:.1f}",
                     str(r["release_ms"] or "-"), str(r["target_ms"] or "-"), ratio])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny presets, one repeat: checks the script runs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one step per case")
    parser.add_argument("--activation_checkpointing", action="store_true",
                        help="recompute the backbone's blocks in backward (less memory, more time)")
    parser.add_argument("--compile_blocks", action="store_true", help="torch.compile each backbone block")
    parser.add_argument("--render_tile_size", type=int, default=16, help="gsplat's tile edge (16 is gsplat's default)")
    parser.add_argument("--gaussians", choices=("fresh", "spread"), default="fresh",
                        help="fresh: the untrained model's Gaussians (one clump, each covering much of the image); "
                             "spread: the head re-drawn so that they spread and shrink like a trained model's")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and device.type != "cuda":
        print("benchmark: the anchor cases need a GPU (gsplat); use --smoke on a CPU", file=sys.stderr)
        return 2
    warmup, repeats = (1, 2) if args.smoke else (args.warmup, args.repeats)
    results = []
    for name in args.cases:
        try:
            result = run_case(name, args.smoke, device, warmup, repeats, args.profile, args.gaussians,
                              activation_checkpointing=args.activation_checkpointing,
                              compile_blocks=args.compile_blocks, render_tile_size=args.render_tile_size)
        except torch.OutOfMemoryError as exc:  # one case too big for this GPU must not hide the others
            print(f"{name}: out of memory ({exc})".splitlines()[0], file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
            continue
        print(result.pop("profile", ""), flush=True)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                         "torch": torch.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
