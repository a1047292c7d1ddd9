"""Evaluation: `python -m tokengs.evaluate PRESET --resume CKPT [--use_ttt_for_eval] [--strict] ...`.

Per scene: reconstruct (one encode + decode), optionally tune the tokens or scene latents on the
context views (tokengs.ttt), render the targets in chunks, and score them. Scenes are split across
processes and gathered so that each counts exactly once. A scene that cannot be read is skipped
(with --strict, the run stops there) and listed with its reason. Writes W/metrics.txt and
W/metrics.json, and media for the first eval_n_media_dumps scenes (`dump_media`); ends printing
the mean scores, the skipped scenes and the reports' paths. Exit status 0, or 3 when a scene was
skipped (other errors: `tokengs.cli.entry_point`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from tokengs import workspace as ws
from tokengs.cli import entry_point, flag_value, parse_options, work_started
from tokengs.options import Options

if TYPE_CHECKING:
    from tokengs.data.types import Batch
    from tokengs.rendering import RenderOutput

QUALITY = ("psnr", "ssim", "lpips")
TIMING = ("reconstruction_ms", "ttt_ms")
STRICT_FLAG = "--strict"
STRICT_HELP = "Stop at the first scene that cannot be read (exit status 1) instead of skipping it (3)."
SKIPPED_EXIT = 3  # the run finished, but without every scene

log = logging.getLogger("tokengs.evaluate")


@dataclass
class SceneResult:
    """One scene's scores: index in the eval dataset, name, and metric name -> value (those
    computed); or, for a scene that could not be read, why (`skipped`) and no scores."""

    index: int
    scene: str
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Start-up checks
# ---------------------------------------------------------------------------------------------

def resolve_checkpoint(opt: Options, config_path: Optional[str]) -> Optional[Path]:
    """The checkpoint to evaluate: with config_path (--config without --resume on the command
    line) that workspace's model.safetensors, else opt.resume. A finetuning config's own `resume`
    names the weights the run STARTED from, so it must not win over the workspace's model."""
    if config_path is not None:
        return Path(config_path).parent / ws.MODEL_FILE
    return Path(opt.resume) if opt.resume else None


def needs_lpips(opt: Options) -> bool:
    """LPIPS(VGG) is needed as a metric, or as a loss term of test-time tuning."""
    return "lpips" in opt.eval_metrics or (opt.use_ttt_for_eval and opt.lambda_lpips > 0)


def startup_problems(opt: Options, checkpoint: Optional[Path], from_config: bool = False) -> list[str]:
    """Everything that would stop the run, found before any work; each names the path and the flag
    that sets it. from_config: the checkpoint is the --config workspace's default."""
    from tokengs.metrics import lpips_weights_problem
    from tokengs.startup import model_and_data_problems

    named = "checkpoint (the --config workspace's; --resume CKPT sets another)" if from_config else "--resume"
    problems = model_and_data_problems(opt, checkpoint, named)
    if checkpoint is None:
        problems.append("no checkpoint: pass --resume CKPT (a .safetensors/.pt file) or --config W/config.yaml "
                        "of a training workspace")
    if needs_lpips(opt) and (problem := lpips_weights_problem()):
        problems.append(problem)  # it names the file, where it belongs and the flags that do without it
    return problems


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def score_views(opt: Options, pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor],
                lpips_model) -> dict[str, float]:
    """The metrics of opt.eval_metrics for one scene: pred, gt [V, 3, H, W] in [0, 1]; mask
    [V, 1, H, W] or None. PSNR from the MSE over all views' pixels; SSIM (scikit-image's
    definition) and LPIPS averaged over views; with a mask, both images are multiplied by it first."""
    from tokengs import metrics

    pred, gt = pred.unsqueeze(0), gt.unsqueeze(0)  # one scene: [1, V, ...]
    mask = None if mask is None else mask.unsqueeze(0)
    scores = {}
    if "psnr" in opt.eval_metrics:
        scores["psnr"] = float(metrics.psnr(pred, gt, mask)[0])
    if "ssim" in opt.eval_metrics:
        scores["ssim"] = float(metrics.ssim(pred, gt, mask)[0])
    if "lpips" in opt.eval_metrics:
        scores["lpips"] = float(metrics.lpips(lpips_model, pred, gt, mask)[0])
    return scores


def summarize(results: Sequence[SceneResult]) -> dict[str, dict[str, float]]:
    """mean, std (population), min, max and count of every metric over the scored scenes."""
    summary = {}
    names = [n for n in QUALITY + TIMING if any(n in r.metrics for r in results)]
    for name in names:
        values = torch.tensor([r.metrics[name] for r in results if name in r.metrics], dtype=torch.float64)
        summary[name] = {"mean": float(values.mean()), "std": float(values.std(unbiased=False)),
                         "min": float(values.min()), "max": float(values.max()), "count": int(values.numel())}
    return summary


def write_reports(workspace: Path, opt: Options, results: Sequence[SceneResult], checkpoint: Path) -> None:
    skipped = sorted((r for r in results if r.skipped is not None), key=lambda r: r.index)
    results = sorted((r for r in results if r.skipped is None), key=lambda r: r.index)
    summary = summarize(results)
    not_computed = [m for m in QUALITY if m not in opt.eval_metrics]
    tuning = f"{opt.resolved_ttt_mode} ({opt.ttt_n_steps} steps, lr {opt.ttt_lr})" if opt.use_ttt_for_eval else "off"
    lines = [f"# tokengs evaluation: {len(results)} scenes, checkpoint {checkpoint}", f"# test-time tuning: {tuning}"]
    if skipped:
        lines.append(f"# skipped {len(skipped)} scenes that could not be read (listed at the end)")
    for name in QUALITY + TIMING:
        if name in summary:
            s = summary[name]
            lines.append(f"{name:18s} {s['mean']:.4f} ± {s['std']:.4f} [{s['min']:.4f}, {s['max']:.4f}]")
        elif name in not_computed:
            lines.append(f"{name:18s} not computed (not in --eval_metrics)")
    columns = [n for n in QUALITY + TIMING if n in summary]
    lines += ["", "index  " + "  ".join(f"{c:>17s}" for c in columns) + "  scene"]
    for r in results:
        values = "  ".join(f"{r.metrics[c]:17.4f}" if c in r.metrics else f"{'-':>17s}" for c in columns)
        lines.append(f"{r.index:5d}  {values}  {r.scene}")
    if skipped:
        lines += ["", "skipped (not scored):"] + [f"{r.index:5d}  {r.scene}: {r.skipped}" for r in skipped]
    atomic_text(workspace / "metrics.txt", "\n".join(lines) + "\n")
    report = {"checkpoint": str(checkpoint), "num_scenes": len(results), "summary": summary,
              "not_computed": not_computed, "options": opt.to_dict(),
              "scenes": [{"index": r.index, "scene": r.scene, **r.metrics} for r in results],
              "skipped": [{"index": r.index, "scene": r.scene, "reason": r.skipped} for r in skipped]}
    atomic_text(workspace / "metrics.json", json.dumps(report, indent=1))


def atomic_text(path: Path, text: str) -> None:
    ws.atomic_write(path, lambda p: p.write_text(text))


MEDIA_FPS = 10
MEDIA_DIRS = ("images", "depths", "videos", "gaussians")  # what dump_media writes; a new evaluation replaces them


def dump_media(workspace: Path, tag: str, batch: Batch, packed: torch.Tensor, render: RenderOutput) -> None:
    """The media of one scene under the release's names (TAG = batch-process-iteration):
    images/{input,pred,gt}_TAG.png, videos/{comparison,pred,gt,input,depth}_TAG.mp4,
    depths/depth_TAG.png, gaussians/gaussians_TAG.ply; and ours: images/comparison_TAG.png
    (prediction beside truth, one row per target view) and the PLY's context cameras beside it
    (for tokengs.view). `batch` holds the scene, `packed` its Gaussians [1, N, 14], `render` their
    render into its targets [1, V_out, ...]."""
    from tokengs.gaussians import Gaussians
    from tokengs.media import colorize_depth, comparison_grid, save_image_grid, save_png, save_video
    from tokengs.scene_files import save_scene

    inputs = batch.context.images[0].float()
    gt = batch.target.images[0].float()
    pred = render.images[0].float().clamp(0, 1)
    depth = colorize_depth(render.depths[0], render.alphas[0])
    save_image_grid(workspace / "images" / f"input_{tag}.png", [inputs])
    save_image_grid(workspace / "images" / f"pred_{tag}.png", [pred])
    save_image_grid(workspace / "images" / f"gt_{tag}.png", [gt])
    save_image_grid(workspace / "depths" / f"depth_{tag}.png", [depth])
    # ours beside the release's strips: each target's prediction next to its truth, large enough to see
    save_png(workspace / "images" / f"comparison_{tag}.png", comparison_grid([pred, gt]))
    try:
        save_video(workspace / "videos" / f"pred_{tag}.mp4", pred, MEDIA_FPS)
        save_video(workspace / "videos" / f"gt_{tag}.mp4", gt, MEDIA_FPS)
        save_video(workspace / "videos" / f"input_{tag}.mp4", inputs, max(1, MEDIA_FPS // 4))
        save_video(workspace / "videos" / f"depth_{tag}.mp4", depth, MEDIA_FPS)
        save_video(workspace / "videos" / f"comparison_{tag}.mp4", torch.cat([gt.cpu(), pred.cpu()], dim=-1), MEDIA_FPS)
    except RuntimeError as exc:  # no encoder: the metrics and the other media still count
        log.warning("videos of %s not written: %s", tag, exc)
    save_scene(Gaussians.unpack(packed[0].float()), batch.context, workspace / "gaussians" / f"gaussians_{tag}.ply")


def skipped_summary(report: dict) -> str:
    """The scenes the run skipped and why, from metrics.json's `report` ('' when none)."""
    skipped = report["skipped"]
    if not skipped:
        return ""
    lines = [f"  {s['scene']} (index {s['index']}): {s['reason']}" for s in skipped]
    return "\n".join([f"skipped {len(skipped)} scenes that could not be read (not scored):", *lines, ""])


def result_summary(workspace: Path, report: dict) -> str:
    """The run's outcome for the terminal, from workspace/metrics.json as read back (`report`), so
    that it shows exactly what the reports hold: the mean of each quality metric over the scenes
    and where the reports are."""
    from tokengs.view import view_command

    means = [f"{name.upper()} {report['summary'][name]['mean']:.4f}" for name in QUALITY if name in report["summary"]]
    not_computed = ", ".join(name.upper() for name in report["not_computed"])
    not_computed = f" ({not_computed} not computed)" if not_computed else ""
    mean_text = f": mean {', '.join(means)}" if means else ""  # none when every scene was skipped
    text = (f"evaluated {report['num_scenes']} scenes{mean_text}{not_computed}\n"
            f"  per-scene scores: {workspace / 'metrics.txt'}\n"
            f"  machine-readable: {workspace / 'metrics.json'}")
    if (workspace / "gaussians").is_dir():  # dumped scenes (--eval_n_media_dumps)
        text += f"\n  look at them:     {view_command(workspace / 'gaussians')}"
    return text


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(opt: Options, checkpoint: Path, strict: bool = False) -> list[SceneResult]:
    """Evaluate `checkpoint` on opt's eval dataset: each process scores its share of the scenes
    (every world_size-th, no padding, so each scene counts exactly once); a scene that cannot be
    read is skipped and recorded (with `strict`, its DataLoadError ends the run); the main process
    locks the workspace and writes the reports. Returns every scene's result, by scene index, on
    every process. A checkpoint that does not fit the model raises CheckpointError (strict unless
    strict_checkpoint_loading is off) before anything is written."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    accelerator = Accelerator(mixed_precision=opt.mixed_precision if torch.cuda.is_available() else "no",
                              cpu=not torch.cuda.is_available())
    with ws.claimed(opt.workspace, hold=accelerator.is_main_process):
        scorer = SceneScorer(opt, checkpoint, accelerator)
        work_started()
        if accelerator.is_main_process:  # an earlier run's media would pass for this one's (another checkpoint)
            for folder in MEDIA_DIRS:
                shutil.rmtree(Path(opt.workspace) / folder, ignore_errors=True)
        accelerator.wait_for_everyone()
        results = scorer.score_mine(strict)
        gathered = sorted(gather_object(results), key=lambda r: r.index)  # every process's, on every process
        if accelerator.is_main_process:
            if [r.index for r in gathered] != list(range(len(scorer.dataset))):
                raise RuntimeError(f"gathered {len(gathered)} results of {len({r.index for r in gathered})} distinct "
                                   f"scenes; expected each of the {len(scorer.dataset)} scenes once")
            write_reports(Path(opt.workspace), opt, gathered, checkpoint)
        accelerator.wait_for_everyone()
    return gathered


class SceneScorer:
    """The model, metrics and scenes of an evaluation, and the scoring of this process's share."""

    def __init__(self, opt: Options, checkpoint: Path, accelerator) -> None:
        from tokengs.data import build_dataset
        from tokengs.losses import LossComputer
        from tokengs.metrics import build_lpips
        from tokengs.startup import build_model

        self.opt, self.accelerator = opt, accelerator
        self.model = build_model(opt, checkpoint).to(accelerator.device).eval()
        # one LPIPS network serves the metric and the tuning loss
        self.lpips_model = build_lpips(accelerator.device) if needs_lpips(opt) else None
        self.loss = LossComputer(opt, device=accelerator.device, lpips_model=self.lpips_model) \
            if opt.use_ttt_for_eval else None
        self.dataset = build_dataset(opt, "eval")

    def score_mine(self, strict: bool) -> list[SceneResult]:
        """This process's scenes, scored or skipped."""
        from tqdm import tqdm

        from tokengs.data.scene import DataLoadError

        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        results = []
        mine = range(rank, len(self.dataset), world)
        for iteration, index in enumerate(tqdm(mine, desc=f"evaluate[{rank}]", dynamic_ncols=True,
                                               disable=not self.accelerator.is_main_process)):
            try:
                batch = self.dataset[index].to(self.accelerator.device)  # one scene
            except DataLoadError as exc:
                if strict:
                    raise
                log.warning("skipping a scene: %s", exc)
                results.append(SceneResult(index=index, scene=self.dataset.entries[index][1].name, skipped=str(exc)))
                continue
            # the release's media TAG: index in the batch (one scene per batch here) - process - iteration
            tag = f"0-{rank}-{iteration}" if iteration < self.opt.eval_n_media_dumps else None
            results.append(self.score(index, batch, tag))
        return results

    def score(self, index: int, batch: Batch, media_tag: Optional[str]) -> SceneResult:
        """One scene's scores (and its media, given a tag)."""
        from tokengs.rendering import render_chunked
        from tokengs.ttt import test_time_tune

        opt, model, accelerator = self.opt, self.model, self.accelerator
        device = accelerator.device
        result = SceneResult(index=index, scene=batch.scene_names[0])
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), accelerator.autocast():
            encoding = model.encode(batch)
            packed = model.decode(encoding)
        _sync(device)
        result.metrics["reconstruction_ms"] = (time.perf_counter() - start) * 1e3

        if opt.use_ttt_for_eval:
            start = time.perf_counter()
            with accelerator.autocast():
                packed = test_time_tune(model, encoding, batch.context, opt, self.loss)
            _sync(device)
            result.metrics["ttt_ms"] = (time.perf_counter() - start) * 1e3

        targets = batch.target
        with torch.no_grad():
            render = render_chunked(opt, packed.float(), targets, chunk_size=opt.eval_render_chunk_size,
                                    depth=media_tag is not None)  # depth only for the media
        mask = targets.masks[0] if bool(targets.has_mask[0].all()) else None
        result.metrics.update(score_views(opt, render.images[0].float(), targets.images[0].float(), mask,
                                          self.lpips_model))
        if media_tag is not None:
            dump_media(Path(opt.workspace), media_tag, batch, packed, render)
        return result


@entry_point
def main(argv: Sequence[str]) -> None:
    """`python -m tokengs.evaluate`: exit status 3 when a scene was skipped; other errors follow
    `tokengs.cli.entry_point`'s rule."""
    import sys

    from accelerate import PartialState

    from tokengs.startup import raise_problems
    from tokengs.threads import configure_cpu_threads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(argv)
    config_path = flag_value(args, "--config", "the path of a config.yaml")
    strict = STRICT_FLAG in args
    opt = parse_options(args, prog="python -m tokengs.evaluate", switches={STRICT_FLAG: STRICT_HELP})
    # scored on the held-out targets only: the context views are the model's input
    opt = opt.evolve(evaluating=True, use_input_supervision=False)
    from_config = config_path is not None and flag_value(args, "--resume") is None
    checkpoint = resolve_checkpoint(opt, config_path if from_config else None)
    configure_cpu_threads()
    raise_problems(startup_problems(opt, checkpoint, from_config), "evaluating")
    results = evaluate(opt, checkpoint, strict)
    if PartialState().is_main_process:  # the state evaluate's Accelerator set up; one summary, not one per process
        workspace = Path(opt.workspace)
        report = json.loads((workspace / "metrics.json").read_text())
        print(result_summary(workspace, report))
        print(skipped_summary(report), file=sys.stderr, end="")
    if any(r.skipped for r in results):
        raise SystemExit(SKIPPED_EXIT)


if __name__ == "__main__":
    main()
