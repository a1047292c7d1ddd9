"""Evaluation: `python -m tokengs.evaluate PRESET --resume CKPT [--use_ttt_for_eval] ...`.

Per scene: reconstruct (one encode + decode), optionally tune the tokens or scene latents on the
context views, render the targets in chunks, and score them. Scenes are split across processes
and gathered so that each counts exactly once. Writes W/metrics.txt and W/metrics.json, and
media for the first eval_n_media_dumps batches; ends printing the mean scores and the reports' paths.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from tokengs import workspace as ws
from tokengs.cli import fail, parse_options
from tokengs.options import Options

QUALITY = ("psnr", "ssim", "lpips")
TIMING = ("reconstruction_ms", "ttt_ms")


@dataclass
class SceneResult:
    """One scene's scores: index in the eval dataset, name, and metric name -> value (those computed)."""

    index: int
    scene: str
    metrics: dict[str, float] = field(default_factory=dict)


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
    from tokengs.data import dataset_root_problems
    from tokengs.metrics import lpips_weights_problem
    from tokengs.models.checkpoint import checkpoint_file_problems

    problems = list(dataset_root_problems(opt))
    if checkpoint is None:
        problems.append("no checkpoint: pass --resume CKPT (a .safetensors/.pt file) or --config W/config.yaml "
                        "of a training workspace")
    else:
        named = "checkpoint (the --config workspace's; --resume CKPT sets another)" if from_config else "--resume"
        problems += checkpoint_file_problems(checkpoint, named)
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
    """mean, std (population), min, max and count of every metric over scenes."""
    summary = {}
    names = [n for n in QUALITY + TIMING if any(n in r.metrics for r in results)]
    for name in names:
        values = torch.tensor([r.metrics[name] for r in results if name in r.metrics], dtype=torch.float64)
        summary[name] = {"mean": float(values.mean()), "std": float(values.std(unbiased=False)),
                         "min": float(values.min()), "max": float(values.max()), "count": int(values.numel())}
    return summary


def write_reports(workspace: Path, opt: Options, results: Sequence[SceneResult], checkpoint: Path) -> None:
    results = sorted(results, key=lambda r: r.index)
    summary = summarize(results)
    not_computed = [m for m in QUALITY if m not in opt.eval_metrics]
    tuning = f"{opt.resolved_ttt_mode} ({opt.ttt_n_steps} steps, lr {opt.ttt_lr})" if opt.use_ttt_for_eval else "off"
    lines = [f"# tokengs evaluation: {len(results)} scenes, checkpoint {checkpoint}", f"# test-time tuning: {tuning}"]
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
    atomic_text(workspace / "metrics.txt", "\n".join(lines) + "\n")
    report = {"checkpoint": str(checkpoint), "num_scenes": len(results), "summary": summary,
              "not_computed": not_computed, "options": opt.to_dict(),
              "scenes": [{"index": r.index, "scene": r.scene, **r.metrics} for r in results]}
    atomic_text(workspace / "metrics.json", json.dumps(report, indent=1))


def atomic_text(path: Path, text: str) -> None:
    ws.atomic_write(path, lambda p: p.write_text(text))


def result_summary(workspace: Path) -> str:
    """The run's outcome for the terminal, read back from metrics.json so that it shows exactly
    what the reports hold: the mean of each quality metric over the scenes and where the reports are."""
    report = json.loads((workspace / "metrics.json").read_text())
    means = [f"{name.upper()} {report['summary'][name]['mean']:.4f}" for name in QUALITY if name in report["summary"]]
    skipped = ", ".join(name.upper() for name in report["not_computed"])
    skipped = f" ({skipped} not computed)" if skipped else ""
    return (f"evaluated {report['num_scenes']} scenes: mean {', '.join(means)}{skipped}\n"
            f"  per-scene scores: {workspace / 'metrics.txt'}\n"
            f"  machine-readable: {workspace / 'metrics.json'}")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(opt: Options, checkpoint: Path) -> list[SceneResult]:
    """Evaluate `checkpoint` on opt's eval dataset: this process's share of the scenes (every
    world_size-th, no padding, so each scene counts exactly once); the main process writes the
    reports of all of them. Returns this process's results, by scene index. A checkpoint that
    does not fit the model raises CheckpointError (strict unless strict_checkpoint_loading is off)
    before anything is written."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm import tqdm

    from tokengs.data import build_dataset
    from tokengs.losses import LossComputer
    from tokengs.media_dump import dump_media
    from tokengs.metrics import build_lpips
    from tokengs.models import TokenGS, load_model_checkpoint
    from tokengs.models.ttt import test_time_tune
    from tokengs.rendering import render_chunked

    accelerator = Accelerator(mixed_precision=opt.mixed_precision if torch.cuda.is_available() else "no",
                              cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    model = TokenGS(opt)
    load_model_checkpoint(model, checkpoint, opt)
    model.to(device).eval()
    # one LPIPS network serves the metric and the tuning loss
    lpips_model = build_lpips(device) if needs_lpips(opt) else None
    loss = LossComputer(opt, device=device, lpips_model=lpips_model) if opt.use_ttt_for_eval else None
    dataset = build_dataset(opt, "eval")
    workspace = Path(opt.workspace)
    if accelerator.is_main_process:
        workspace.mkdir(parents=True, exist_ok=True)

    results: list[SceneResult] = []
    mine = range(rank, len(dataset), world)
    for iteration, index in enumerate(tqdm(mine, desc=f"evaluate[{rank}]", disable=not accelerator.is_main_process,
                                           dynamic_ncols=True)):
        sample = dataset[index]
        batch = {k: v.unsqueeze(0).to(device) if torch.is_tensor(v) else [v] for k, v in sample.items()}
        result = SceneResult(index=index, scene=str(sample.get("scene_name", index)))

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
                packed = test_time_tune(model, encoding, batch, opt, loss)
            _sync(device)
            result.metrics["ttt_ms"] = (time.perf_counter() - start) * 1e3

        with torch.no_grad():
            render = render_chunked(opt, packed.float(), batch, chunk_size=opt.eval_render_chunk_size)
        mask = batch["masks_output"][0] if bool(batch["has_mask"][0]) else None
        result.metrics.update(score_views(opt, render.images[0].float(), batch["images_output"][0].float(), mask,
                                          lpips_model))
        if iteration < opt.eval_n_media_dumps:
            # the release's TAG: index in the batch (one scene per batch here) - process - iteration
            dump_media(workspace, f"0-{rank}-{iteration}", opt, batch, packed, render)
        results.append(result)

    gathered = gather_object(results)  # every process's list, concatenated (the list itself with one process)
    if accelerator.is_main_process:
        if sorted(r.index for r in gathered) != list(range(len(dataset))):
            raise RuntimeError(f"gathered {len(gathered)} results of {len({r.index for r in gathered})} distinct "
                               f"scenes; expected each of the {len(dataset)} scenes once")
        write_reports(workspace, opt, gathered, checkpoint)
    accelerator.wait_for_everyone()
    return results


def _cli_value(args: Sequence[str], flag: str) -> Optional[str]:
    """The value of `flag` in args (`--flag VALUE` or `--flag=VALUE`), or None when absent."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    import sys

    from accelerate import PartialState

    from tokengs.models import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    config_path = _cli_value(args, "--config")
    opt = parse_options(args, prog="python -m tokengs.evaluate")
    opt = opt.evolve(evaluating=True, use_input_supervision=False)  # scored on the targets only, as the release
    from_config = config_path is not None and _cli_value(args, "--resume") is None
    checkpoint = resolve_checkpoint(opt, config_path if from_config else None)
    problems = startup_problems(opt, checkpoint, from_config)
    if problems:
        fail(f"fix {len(problems)} problem(s) before evaluating:\n  - " + "\n  - ".join(problems))
    try:
        evaluate(opt, checkpoint)
    except CheckpointError as exc:
        fail(str(exc))
    if PartialState().is_main_process:  # the state evaluate's Accelerator set up; one summary, not one per process
        print(result_summary(Path(opt.workspace)))


if __name__ == "__main__":
    main()
