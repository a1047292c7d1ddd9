"""The whole system on an embedded default: `python -m tokengs.demo` (or `tokengs-demo`).

No dataset or GPU needed. In order:
  1. synthetic rooms: DL3DV-layout rooms to fine-tune on, and held-out rooms of other seeds in the
     benchmark layout, sampled as the benchmarks sample views: 4 context views over 12 frames of
     a walk, the frames between them as targets;
  2. the shipped model (checkpoints/demo.safetensors, trained on a GPU on rooms from the same
     generator, none of them held out here) scored on the held-out rooms as it is;
  3. a short fine-tuning of it on the training rooms (`demo`; `demo_gpu` on a CUDA machine) in OUT/train;
  4. evaluation of the held-out rooms without and with test-time tuning (OUT/eval, OUT/eval_ttt:
     metrics.txt, comparison grids, videos, PLY), beside a mean-colour baseline;
  5. an orbit video and the PLY of one reconstructed room, the training curve, and a summary
     (printed, and OUT/summary.json).
SIGTERM or Ctrl-C during the fine-tuning saves its checkpoint and stops; the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from tokengs.cli import CommandParser, add_debug_flag, entry_point
from tokengs.options import Options, get_preset

log = logging.getLogger("tokengs.demo")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CHECKPOINT = ROOT / "checkpoints" / "demo.safetensors"
EVAL_FRAMES, EVAL_SPAN = 48, 12  # held-out walks; the context views cover 12 of their 48 frames
ORBIT_FRAMES = 48


class DemoStopped(Exception):
    """SIGTERM or Ctrl-C stopped the fine-tuning after its checkpoint was saved."""


# ---------------------------------------------------------------------------------------------
# Data and options
# ---------------------------------------------------------------------------------------------

def heldout_root(data_root: Path, num_context: int) -> Path:
    """The held-out rooms' root, named by their view protocol (a previous protocol's rooms stay apart)."""
    return data_root / f"dl3dv_eval_{num_context}views_span{EVAL_SPAN}"


def dataset_ready(root: Path, layout: str) -> bool:
    """True when `root` already holds scenes of the layout (a previous demo's)."""
    from tokengs.data.registry import REGISTRY, make_reader

    try:
        return bool(make_reader(REGISTRY[layout], {"root_path": str(root)}, "train").scenes())
    except Exception:  # a missing or damaged root is simply generated again
        return False


def make_data(data_root: Path, num_context: int, train_scenes: int, eval_scenes: int, quick: bool = False) -> None:
    """Generate the training and held-out roots that are missing (at the generator's image size;
    `quick`: small images, for the tests). Training rooms are seed 0, held-out rooms seed 1 of
    another layout: the shipped checkpoint never saw them."""
    from tokengs.data.synthetic import generate

    size = dict(height=48, width=80) if quick else {}
    for layout, root, count, seed in (("dl3dv", data_root / "dl3dv", train_scenes, 0),
                                      ("dl3dv_eval", heldout_root(data_root, num_context), eval_scenes, 1)):
        if dataset_ready(root, layout):
            log.info("using the synthetic %s rooms in %s", layout, root)
            continue
        frames = EVAL_FRAMES if layout == "dl3dv_eval" else None
        generate(layout, root, count, seed=seed, frames=frames, eval_context=num_context, eval_span=EVAL_SPAN,
                 progress=True, workers=os.cpu_count() or 1, **size)


def train_options(preset: str, data_root: Path, out: Path, quick: bool, checkpoint: Optional[Path]) -> Options:
    """The preset fine-tuning `checkpoint` (or training from scratch without one) on the training rooms."""
    opt = get_preset(preset).evolve(workspace=str(out / "train"), resume=str(checkpoint) if checkpoint else None,
                                    dataset_kwargs={"root_path": str(data_root / "dl3dv")})
    if quick:  # the tests' size: every code path in seconds, with the real model
        opt = opt.evolve(batch_size=2, num_workers=0, max_iters_per_epoch=2, data_mode=(("dl3dv_scaled_0.25", 2),),
                         ttt_n_steps=3)
    return opt


def eval_options(opt: Options, data_root: Path, workspace: Path, ttt: bool) -> Options:
    """The training options turned to the held-out rooms (same scene scale)."""
    from tokengs.metrics import lpips_weights_problem

    name, _ = opt.data_mode[0]
    metrics = ("psnr", "ssim") if lpips_weights_problem() else ("psnr", "ssim", "lpips")
    return opt.evolve(evaluating=True, batch_size=1, use_input_supervision=False, workspace=str(workspace),
                      data_mode=((name.replace("dl3dv", "dl3dv_eval", 1), 1),),
                      dataset_kwargs={"root_path": str(heldout_root(data_root, opt.num_input_views))},
                      eval_metrics=metrics, eval_n_media_dumps=2, use_ttt_for_eval=ttt)


# ---------------------------------------------------------------------------------------------
# What the demo measures and draws
# ---------------------------------------------------------------------------------------------

def mean_colour_baseline(opt: Options) -> dict[str, float]:
    """Mean PSNR and SSIM over the evaluation scenes of predicting every target pixel as the mean
    colour of the scene's context images: what a model must beat to have learnt anything about it."""
    from tokengs.data import build_dataset
    from tokengs.metrics import psnr, ssim

    dataset = build_dataset(opt, "eval")
    scores = {"psnr": [], "ssim": []}
    for index in range(len(dataset)):
        batch = dataset[index]
        targets = batch.target.images[0]  # [V, 3, H, W]
        mean = batch.context.images[0].mean(dim=(0, 2, 3))  # [3]
        prediction = mean[None, :, None, None].expand_as(targets).contiguous()
        scores["psnr"].append(psnr(prediction[None], targets[None])[0])
        scores["ssim"].append(ssim(prediction[None], targets[None])[0])
    return {name: float(torch.stack(values).mean()) for name, values in scores.items()}


@torch.no_grad()
def orbit_and_ply(opt: Options, checkpoint: Path, out: Path, scene_index: int = 0) -> tuple[Path, Path]:
    """Reconstruct one held-out room; write its PLY and a video orbiting its context cameras."""
    from tokengs.cameras import orbit_path
    from tokengs.data import build_dataset
    from tokengs.gaussians import Gaussians
    from tokengs.media import save_video
    from tokengs.rendering import render_path
    from tokengs.scene_files import save_scene
    from tokengs.startup import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(opt, checkpoint).to(device).eval()
    batch = build_dataset(opt, "eval")[scene_index].to(device)
    gaussians = Gaussians.unpack(model.forward_gaussians(batch).float())
    path = orbit_path(batch.context.c2w[0].double().cpu(), ORBIT_FRAMES).float().to(device)
    frames = render_path(opt, gaussians, path, batch.context.intrinsics[0, 0])
    video = save_video(out / "orbit.mp4", frames.cpu(), fps=24)
    ply = save_scene(gaussians.scene(0), batch.context, out / "scene.ply")
    return video, ply


def plot_training_curve(history: Sequence[dict], path: Path, title: str = "tokengs demo: PSNR during training",
                        start_step: int = 0) -> Path:
    """Training and validation PSNR against the step, from a run's metadata history (its steps
    shifted by start_step, to follow the run it continued)."""
    from tokengs.media import plot_curves

    series = {
        "train PSNR (dB)": [(start_step + h["step"], h["psnr"]) for h in history if "psnr" in h],
        "validation PSNR (dB)": [(start_step + h["step"], h["val_psnr"]) for h in history if "val_psnr" in h],
    }
    return plot_curves(path, series, title=title)


def training_curve(workspace: Path, out: Path, checkpoint: Optional[Path]) -> Path:
    """The curve of the whole training: the shipped checkpoint's (its _training.json beside it),
    then the demo's fine-tuning."""
    from tokengs import workspace as ws

    history = list((ws.read_metadata(workspace) or {}).get("history", []))
    record = checkpoint.with_name(checkpoint.stem + "_training.json") if checkpoint else None
    if record is not None and record.is_file():
        shipped = json.loads(record.read_text())
        history = shipped["history"] + [dict(h, step=shipped["step"] + h["step"]) for h in history]
    return plot_training_curve(history, out / "training_curve.png")


class PhaseTimes:
    """Seconds spent in each phase of the demo by this run, plus those of the interrupted runs it
    resumes (not those of a finished run before it); kept in a JSON file."""

    FINISHED = "finished"  # the key marking a run that got to its summary

    def __init__(self, path: Path):
        from tokengs import workspace as ws

        self.path = path
        self.seconds: dict[str, float] = {}
        if path.is_file():
            with ws.reading(path, "delete it (it only sums the time of the demo's phases)"):
                recorded = json.loads(path.read_text())
                if not recorded.pop(self.FINISHED, False):
                    self.seconds = {name: float(seconds) for name, seconds in recorded.items()}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.path.write_text(json.dumps(self.seconds, indent=1))

    def finish(self) -> None:
        """Mark the run finished: the next run times itself afresh."""
        self.path.write_text(json.dumps({**self.seconds, self.FINISHED: True}, indent=1))


def read_summary(workspace: Path) -> dict:
    return json.loads((workspace / "metrics.json").read_text())["summary"]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run(out: Path, data_root: Path, preset: Optional[str] = None, quick: bool = False, train_scenes: int = 48,
        eval_scenes: int = 6, checkpoint: Optional[Path] = SHIPPED_CHECKPOINT, retrain: bool = False) -> dict:
    """Every step of the demo; returns the summary it writes to OUT/summary.json. A finished
    fine-tuning is reused unless `retrain`. Raises DemoStopped when SIGTERM or Ctrl-C stopped the
    fine-tuning (its checkpoint is saved)."""
    from tokengs import evaluate as evaluation
    from tokengs import train as training
    from tokengs import workspace as ws

    preset = preset or ("demo_gpu" if torch.cuda.is_available() else "demo")
    out.mkdir(parents=True, exist_ok=True)
    times = PhaseTimes(out / "timings.json")
    opt = train_options(preset, data_root, out, quick, checkpoint).evolve(retrain=retrain)
    with times.phase("data_s"):
        make_data(data_root, opt.num_input_views, train_scenes, eval_scenes, quick)

    results = {}
    with times.phase("eval_s"):
        if checkpoint is not None:  # the shipped model as it is, before the demo trains it
            evaluation.evaluate(eval_options(opt, data_root, out / "eval_shipped", ttt=False), checkpoint)
            results["shipped"] = read_summary(out / "eval_shipped")
    with times.phase("train_s"):
        if not training.run(opt):
            raise DemoStopped(f"stopped: the fine-tuning's checkpoint is saved in {opt.workspace}; run the same "
                              "command to resume")
    trained = Path(opt.workspace) / ws.MODEL_FILE
    with times.phase("eval_s"):
        for name, ttt in (("eval", False), ("eval_ttt", True)):
            eval_opt = eval_options(opt, data_root, out / name, ttt)
            evaluation.evaluate(eval_opt, trained)
            results[name] = read_summary(out / name)
        baseline = mean_colour_baseline(eval_opt)
    video, ply = orbit_and_ply(eval_opt, trained, out)
    curve = training_curve(Path(opt.workspace), out, checkpoint)
    comparison = shutil.copyfile(min((out / "eval_ttt" / "images").glob("comparison_*.png")), out / "comparison.png")

    summary = {
        "preset": preset, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "checkpoint": str(checkpoint) if checkpoint else None,
        "train_steps": (ws.read_metadata(opt.workspace) or {}).get("step"),
        "heldout_scenes": results["eval"]["psnr"]["count"],
        "psnr_mean_colour_baseline": baseline["psnr"], "ssim_mean_colour_baseline": baseline["ssim"],
        "psnr_shipped_checkpoint": results["shipped"]["psnr"]["mean"] if "shipped" in results else None,
        "psnr": results["eval"]["psnr"]["mean"], "psnr_with_ttt": results["eval_ttt"]["psnr"]["mean"],
        "ssim": results["eval"]["ssim"]["mean"], "ssim_with_ttt": results["eval_ttt"]["ssim"]["mean"],
        **{k: round(v, 1) for k, v in times.seconds.items()},
        "files": {"metrics": str(out / "eval" / "metrics.txt"), "metrics_ttt": str(out / "eval_ttt" / "metrics.txt"),
                  "comparison": str(comparison), "orbit_video": str(video), "ply": str(ply),
                  "training_curve": str(curve), "checkpoint": str(trained)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    times.finish()
    return summary


def report(summary: dict) -> str:
    from tokengs.view import view_command

    base_psnr, base_ssim = summary["psnr_mean_colour_baseline"], summary["ssim_mean_colour_baseline"]
    lines = [
        "",
        f"tokengs demo ({summary['preset']} on {summary['device']}, {summary['train_steps']} fine-tuning steps)",
        f"  held-out rooms        {summary['heldout_scenes']}, mean-colour baseline PSNR {base_psnr:.2f} dB, "
        f"SSIM {base_ssim:.3f}",
    ]
    if summary["psnr_shipped_checkpoint"] is not None:
        lines.append(f"  shipped checkpoint    PSNR {summary['psnr_shipped_checkpoint']:.2f} dB")
    lines += [
        f"  fine-tuned            PSNR {summary['psnr']:.2f} dB ({summary['psnr'] - base_psnr:+.2f} dB over the "
        f"mean-colour baseline), SSIM {summary['ssim']:.3f}",
        f"  with test-time tuning PSNR {summary['psnr_with_ttt']:.2f} dB ({summary['psnr_with_ttt'] - base_psnr:+.2f} "
        f"dB), SSIM {summary['ssim_with_ttt']:.3f} ({summary['ssim_with_ttt'] - base_ssim:+.3f})",
        f"  time: data {summary['data_s']:.0f} s, fine-tuning {summary['train_s']:.0f} s, "
        f"evaluation {summary['eval_s']:.0f} s",
        "  files:",
    ]
    lines += [f"    {name:15s} {path}" for name, path in summary["files"].items()]
    lines.append(f"  look at it: {view_command(Path(summary['files']['ply']).parent)}")
    return "\n".join(lines)


@entry_point
def main(argv: Sequence[str]) -> None:
    """`python -m tokengs.demo`: errors follow `tokengs.cli.entry_point`'s rule."""
    from tokengs.startup import raise_problems
    from tokengs.threads import configure_cpu_threads

    parser = CommandParser(prog="python -m tokengs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("workspace/demo"), help="where the results go")
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="where the synthetic rooms go")
    parser.add_argument("--preset", choices=("demo", "demo_gpu"), help="default: demo_gpu with CUDA, else demo")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT),
                        help="weights to start from; 'none' trains the preset's model from scratch")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run of every step (tests)")
    parser.add_argument("--train_scenes", type=int, default=48, help="rooms to fine-tune on, when none are there yet")
    parser.add_argument("--eval_scenes", type=int, default=6, help="held-out rooms, when none are there yet")
    parser.add_argument("--retrain", action="store_true", help="fine-tune again (a finished fine-tuning is reused)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    problems = [f"{flag} must be at least 1, not {count}"
                for flag, count in (("--train_scenes", args.train_scenes), ("--eval_scenes", args.eval_scenes))
                if count < 1]
    checkpoint = None if args.checkpoint.lower() == "none" else Path(args.checkpoint)
    if checkpoint is not None and not checkpoint.is_file():
        problems.append(f"--checkpoint {checkpoint} does not exist; pass the shipped {SHIPPED_CHECKPOINT}, another "
                        "demo checkpoint, or 'none' to train from scratch")
    raise_problems(problems, "the demo")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_cpu_threads()
    try:
        summary = run(args.out, args.data, args.preset, args.quick, args.train_scenes, args.eval_scenes, checkpoint,
                      args.retrain)
    except DemoStopped as stopped:
        print(stopped, file=sys.stderr)
        raise SystemExit(0)
    except KeyboardInterrupt:
        print("interrupted; run the same command to continue (finished parts are reused)", file=sys.stderr)
        raise SystemExit(130)
    print(report(summary))


if __name__ == "__main__":
    main()
