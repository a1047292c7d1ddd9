"""The whole system on an embedded default: `python -m tokengs.demo` (or `tokengs-demo`).

No dataset, checkpoint or GPU needed. In order:
  1. synthetic scenes: DL3DV-layout rooms for training and DL3DV-benchmark-layout rooms for the
     held-out evaluation, generated under data/synthetic/ unless already there;
  2. training of the `demo` preset (`demo_gpu` on a CUDA machine) in OUT/train;
  3. evaluation of the held-out scenes without and with test-time tuning (OUT/eval, OUT/eval_ttt:
     metrics.txt, image grids, videos, PLY), beside a mean-colour baseline;
  4. an orbit video and the PLY of one reconstructed scene, and the training curve as a PNG;
  5. a summary of what it measured (printed, and OUT/summary.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from tokengs.options import Options, get_preset

log = logging.getLogger("tokengs.demo")

EVAL_CONTEXT_VIEWS = 2  # the synthetic benchmark JSON's context views; the demo presets' num_input_views
ORBIT_FRAMES = 48


def dataset_ready(root: Path, layout: str) -> bool:
    """True when `root` already holds scenes of the layout (a previous demo's)."""
    from tokengs.data.registry import REGISTRY, make_reader

    try:
        return bool(make_reader(REGISTRY[layout], {"root_path": str(root)}, "train").scenes())
    except Exception:  # a missing or damaged root is simply generated again
        return False


def make_data(data_root: Path, train_scenes: int, eval_scenes: int, quick: bool = False) -> float:
    """Generate the training and evaluation roots that are missing; returns the seconds spent.
    The generator's defaults, except with `quick` (tests): short, small scenes."""
    from tokengs.data.synthetic import generate

    start = time.perf_counter()
    for layout, count, seed in (("dl3dv", train_scenes, 0), ("dl3dv_eval", eval_scenes, 1)):
        root = data_root / layout
        if dataset_ready(root, layout):
            log.info("using the synthetic %s scenes in %s", layout, root)
            continue
        size = dict(frames=16 if layout == "dl3dv" else 6, height=48, width=80) if quick else {}
        generate(layout, root, count, seed=seed, eval_context=EVAL_CONTEXT_VIEWS, progress=True,
                 workers=os.cpu_count() or 1, **size)
    return time.perf_counter() - start


def train_options(preset: str, data_root: Path, out: Path, quick: bool) -> Options:
    opt = get_preset(preset).evolve(workspace=str(out / "train"),
                                    dataset_kwargs={"root_path": str(data_root / "dl3dv")})
    if quick:  # the test's size: the same code paths in seconds
        opt = opt.evolve(img_size=(32, 48), num_epochs=2, max_iters_per_epoch=2, batch_size=2, num_workers=0,
                         ttt_n_steps=3, enc_depth=2, dec_depth=1)
    return opt


def eval_options(opt: Options, data_root: Path, workspace: Path, ttt: bool) -> Options:
    """The training options turned to the held-out benchmark-layout scenes (same scene scale)."""
    from tokengs.metrics import lpips_weights_problem

    name, _ = opt.data_mode[0]
    metrics = ("psnr", "ssim") if lpips_weights_problem() else ("psnr", "ssim", "lpips")
    return opt.evolve(evaluating=True, batch_size=1, use_input_supervision=False, workspace=str(workspace),
                      data_mode=((name.replace("dl3dv", "dl3dv_eval", 1), 1),),
                      dataset_kwargs={"root_path": str(data_root / "dl3dv_eval")}, eval_metrics=metrics,
                      eval_n_media_dumps=2, use_ttt_for_eval=ttt)


def mean_colour_baseline(opt: Options) -> float:
    """Mean PSNR over the evaluation scenes of predicting every target pixel as the mean colour of
    the scene's context images: what a model must beat to have learnt anything about the scene."""
    from tokengs.data import build_dataset
    from tokengs.metrics import psnr

    dataset = build_dataset(opt, "eval")
    scores = []
    for index in range(len(dataset)):
        sample = dataset[index]
        mean = sample["images_input"].mean(dim=(0, 2, 3))  # [3]
        prediction = mean[None, :, None, None].expand_as(sample["images_output"])
        scores.append(psnr(prediction[None], sample["images_output"][None])[0])
    return float(torch.stack(scores).mean())


@torch.no_grad()
def orbit_and_ply(opt: Options, checkpoint: Path, out: Path, scene_index: int = 0) -> tuple[Path, Path]:
    """Reconstruct one evaluation scene; write its PLY and a video orbiting its context cameras."""
    from tokengs.cameras import orbit_path
    from tokengs.data import build_dataset
    from tokengs.gaussians import Gaussians, save_ply
    from tokengs.media import save_video
    from tokengs.models import TokenGS, load_model_checkpoint
    from tokengs.rendering import render_path

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = TokenGS(opt)
    load_model_checkpoint(model, checkpoint, opt)
    model.to(device).eval()
    sample = build_dataset(opt, "eval")[scene_index]
    batch = {k: v.unsqueeze(0).to(device) for k, v in sample.items() if torch.is_tensor(v)}
    gaussians = Gaussians.unpack(model.forward_gaussians(batch).float())
    path = orbit_path(batch["cam_to_world_input"][0].double().cpu(), ORBIT_FRAMES).float().to(device)
    frames = render_path(opt, gaussians, path, batch["intrinsics_input"][0, 0])
    video = save_video(out / "orbit.mp4", frames.cpu(), fps=24)
    ply = out / "scene.ply"
    save_ply(gaussians.scene(0), ply)
    return video, ply


def training_curve(workspace: Path, out: Path) -> Path:
    """Training loss and PSNR, and validation PSNR, against the step, from the run's metadata."""
    from tokengs import workspace as ws
    from tokengs.media import plot_curves

    history = (ws.read_metadata(workspace) or {}).get("history", [])
    series = {
        "train PSNR (dB)": [(h["step"], h["psnr"]) for h in history if "psnr" in h],
        "validation PSNR (dB)": [(h["step"], h["val_psnr"]) for h in history if "val_psnr" in h],
    }
    return plot_curves(out / "training_curve.png", series, title="tokengs demo: PSNR during training")


def read_summary(workspace: Path) -> dict:
    return json.loads((workspace / "metrics.json").read_text())["summary"]


def run(out: Path, data_root: Path, preset: Optional[str] = None, quick: bool = False, train_scenes: int = 48,
        eval_scenes: int = 6) -> dict:
    """Every step of the demo; returns the summary it writes to OUT/summary.json."""
    from tokengs import evaluate as evaluation
    from tokengs import train as training
    from tokengs import workspace as ws

    preset = preset or ("demo_gpu" if torch.cuda.is_available() else "demo")
    out.mkdir(parents=True, exist_ok=True)
    timings = {"data_s": make_data(data_root, train_scenes, eval_scenes, quick)}

    opt = train_options(preset, data_root, out, quick)
    start = time.perf_counter()
    training.run(opt)
    timings["train_s"] = time.perf_counter() - start
    checkpoint = Path(opt.workspace) / ws.MODEL_FILE

    start = time.perf_counter()
    results = {}
    for name, ttt in (("eval", False), ("eval_ttt", True)):
        eval_opt = eval_options(opt, data_root, out / name, ttt)
        evaluation.evaluate(eval_opt, checkpoint)
        results[name] = read_summary(out / name)
    baseline = mean_colour_baseline(eval_opt)
    timings["eval_s"] = time.perf_counter() - start
    video, ply = orbit_and_ply(eval_opt, checkpoint, out)
    curve = training_curve(Path(opt.workspace), out)

    summary = {
        "preset": preset, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "train_steps": (ws.read_metadata(opt.workspace) or {}).get("step"),
        "heldout_scenes": results["eval"]["psnr"]["count"],
        "psnr_mean_colour_baseline": baseline,
        "psnr": results["eval"]["psnr"]["mean"], "psnr_with_ttt": results["eval_ttt"]["psnr"]["mean"],
        "ssim": results["eval"]["ssim"]["mean"], "ssim_with_ttt": results["eval_ttt"]["ssim"]["mean"],
        **{k: round(v, 1) for k, v in timings.items()},
        "files": {"metrics": str(out / "eval" / "metrics.txt"), "metrics_ttt": str(out / "eval_ttt" / "metrics.txt"),
                  "images": str(out / "eval" / "images"), "orbit_video": str(video), "ply": str(ply),
                  "training_curve": str(curve), "checkpoint": str(checkpoint)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def report(summary: dict) -> str:
    gain = summary["psnr"] - summary["psnr_mean_colour_baseline"]
    lines = [
        "",
        f"tokengs demo ({summary['preset']} on {summary['device']}, {summary['train_steps']} training steps)",
        f"  held-out PSNR        {summary['psnr']:.2f} dB over {summary['heldout_scenes']} scenes "
        f"({gain:+.2f} dB over the mean-colour baseline, {summary['psnr_mean_colour_baseline']:.2f} dB)",
        f"  with test-time tuning {summary['psnr_with_ttt']:.2f} dB "
        f"({summary['psnr_with_ttt'] - summary['psnr']:+.2f} dB)",
        f"  SSIM                 {summary['ssim']:.3f} (with tuning {summary['ssim_with_ttt']:.3f})",
        f"  time: data {summary['data_s']:.0f} s, training {summary['train_s']:.0f} s, "
        f"evaluation {summary['eval_s']:.0f} s",
        "  files:",
    ]
    lines += [f"    {name:15s} {path}" for name, path in summary["files"].items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokengs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("workspace/demo"), help="where the results go")
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="where the synthetic scenes go")
    parser.add_argument("--preset", choices=("demo", "demo_gpu"), help="default: demo_gpu with CUDA, else demo")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run of every step (tests)")
    parser.add_argument("--train_scenes", type=int, default=48)
    parser.add_argument("--eval_scenes", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(args.out, args.data, args.preset, args.quick, args.train_scenes, args.eval_scenes)
    print(report(summary))


if __name__ == "__main__":
    main()
