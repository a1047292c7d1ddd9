"""Checks distributed training and evaluation on one machine with several GPUs (issue: several GPUs).

    python scripts/distributed_check.py --out DIR [--gpus 2] [--steps 150] [--batch_size 2]
        [--only train|resume|eval] [--smoke]

On synthetic DL3DV-layout scenes at 960x540 (generated into --data unless there), with the
finetune_dl3dv_6view preset under bf16:

1. train: one process accumulating --gpus batches per step (the same global batch on one GPU),
   then --gpus processes of one batch each. Sample i of an epoch's order goes to rank i % gpus, so
   both runs see the same scenes in every optimizer step; their loss curves should agree within
   bf16 noise (loss_curves.png plots both). Throughput is samples per second, from the logged step
   rate and from the wall time between the first and the last logged step (data loading included).
   The multi-process run is audited (tests/write_audit): which rank wrote, renamed or created what
   in the workspace.
2. resume: the multi-process run again, SIGTERM to every process once the first mid-run
   checkpoint exists (as SLURM preempts), then the same command: it must resume at the saved step
   and end at the uninterrupted run's weights, as close as the one- and multi-process runs are to
   each other (the bf16 noise between two runs that should agree).
3. eval: eval_dl3dv_6view with the trained model on an odd number of scenes, by one process and by
   --gpus processes: the per-scene metrics must be identical.

Writes report.json and a log of every command under --out. `--smoke` runs the same checks with
the tiny presets on CPU processes joined over gloo (a check of the script on a machine without GPUs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokengs import workspace as ws  # noqa: E402
from tokengs.cli import CommandParser  # noqa: E402
from tokengs.options import get_preset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ROOT / "tests" / "write_audit"
PRESET, EVAL_PRESET = "finetune_dl3dv_6view", "eval_dl3dv_6view"
SMOKE = {"preset": "tiny", "eval_preset": "tiny_eval", "height": 32, "width": 48}  # --smoke: CPU processes on gloo
FULL = {"preset": PRESET, "eval_preset": EVAL_PRESET, "height": 540, "width": 960}


def launch(processes: int, smoke: bool) -> list[str]:
    if smoke and processes == 1:
        return [sys.executable]
    if smoke:  # accelerate's --cpu starts one process; --multi_gpu starts several, which join over gloo
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    config = "gpu1.yaml" if processes == 1 else "gpu8.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "acc_configs" / config),
            "--num_processes", str(processes)]


def run(command: list[str], log: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy())
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def events(workspace: Path, tag: str) -> list:
    """A run's logged scalar events (step, wall_time, value), by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(workspace / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return sorted(accumulator.Scalars(tag), key=lambda e: e.step)


def scalars(workspace: Path, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events(workspace, tag)}


def weight_difference(a: Path, b: Path) -> dict:
    """How far two runs' final weights are apart: the largest absolute difference, and the norm of
    the difference over the norm of the weights."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    diff = torch.cat([(first[k].float() - second[k].float()).flatten() for k in first])
    norm = torch.cat([first[k].float().flatten() for k in first]).norm()
    return {"max_abs": diff.abs().max().item(), "relative_norm": (diff.norm() / norm).item()}


def make_data(root: Path, layout: str, scenes: int, frames: int, seed: int, size: dict, context: int) -> None:
    from tokengs.data.synthetic import generate

    if root.is_dir():
        return
    generate(layout, root, scenes, seed=seed, frames=frames, height=size["height"], width=size["width"],
             eval_context=context, workers=os.cpu_count() or 1, progress=True)


def train_command(processes: int, gpus: int, data: Path, workspace: Path, args, save_every: int = 0) -> list[str]:
    # one process takes the multi-process run's global batch by accumulating `gpus` batches per step;
    # no mid-run checkpoint unless asked (the timed runs would time the disk)
    accumulate = gpus if processes == 1 else 1
    return [*launch(processes, args.smoke), "-m", "tokengs.train", args.size["preset"], "--workspace", str(workspace),
            "--dataset_kwargs", "root_path", str(data), "--data_mode", "dl3dv_scaled_0.15", "100",
            "--batch_size", str(args.batch_size), "--gradient_accumulation_steps", str(accumulate),
            "--max_iters_per_epoch", str(args.steps * accumulate), "--num_epochs", "1",
            "--num_workers", str(args.workers), "--print_freq", "1", "--save_every_steps", str(save_every),
            "--log_image_freq", "1000000"]


def check_training(args, out: Path, data: Path, report: dict) -> None:
    one, many = out / "ws_one", out / "ws_many"
    records = out / "write_audit"
    for path in (one, many, records):
        shutil.rmtree(path, ignore_errors=True)
    wall_one = run(train_command(1, args.gpus, data, one, args), out / "train_one.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(AUDIT), os.environ.get("PYTHONPATH", "")]),
               TOKENGS_AUDIT_WATCH=str(many), TOKENGS_AUDIT_OUT=str(records))
    wall_many = run(train_command(args.gpus, args.gpus, data, many, args), out / "train_many.log", env)
    global_batch = args.gpus * args.batch_size
    runs = {"one_process": one, f"{args.gpus}_processes": many}
    curves = {name: scalars(workspace, "train/loss") for name, workspace in runs.items()}
    rates, wall_rates = {}, {}
    for name, workspace in runs.items():
        its = [v for _, v in sorted(scalars(workspace, "train/its").items())]
        rates[name] = statistics.median(its[1:] or its) * global_batch  # the first window holds the warm-up
        logged = events(workspace, "train/loss")  # from the first logged step to the last: every batch loaded and trained
        first, last = logged[0], logged[-1]
        wall_rates[name] = (last.step - first.step) * global_batch / (last.wall_time - first.wall_time)
    from tokengs.media import plot_curves

    plot_curves(out / "loss_curves.png",
                {f"{name.replace('_', ' ')} (global batch {global_batch})": sorted(curve.items())
                 for name, curve in curves.items()},
                title=f"{args.size['preset']}: training loss, 1 GPU accumulating vs {args.gpus} GPUs")
    a, b = curves.values()
    common = sorted(set(a) & set(b))
    window = 25
    windows = [{"steps": f"{lo + 1}-{lo + window}",
                "one_process": statistics.mean(a[s] for s in common if lo < s <= lo + window),
                f"{args.gpus}_processes": statistics.mean(b[s] for s in common if lo < s <= lo + window)}
               for lo in range(0, max(common), window) if any(lo < s <= lo + window for s in common)]
    writers = {p.stem: sorted({line.split("\t")[-1].replace(str(many), "<ws>") for line in p.read_text().splitlines()})
               for p in sorted(records.glob("rank*.txt"))}
    report["train"] = {
        "preset": args.size["preset"], "gpus": args.gpus, "batch_per_process": args.batch_size, "global_batch": global_batch,
        "steps": args.steps, "samples_per_s": rates,
        "scaling": rates[f"{args.gpus}_processes"] / rates["one_process"],
        "samples_per_s_wall": wall_rates,
        "scaling_wall": wall_rates[f"{args.gpus}_processes"] / wall_rates["one_process"],
        "final_weights_one_vs_many": weight_difference(one / "model.safetensors", many / "model.safetensors"),
        "skipped_steps": {name: ws.read_metadata(workspace).get("nonfinite_steps", 0) for name, workspace in runs.items()},
        "wall_s": {"one_process": wall_one, f"{args.gpus}_processes": wall_many},
        "loss_window_means": windows,
        "loss_max_abs_diff": max(abs(a[s] - b[s]) for s in common),
        "loss_first_steps": {s: [a[s], b[s]] for s in common[:4]},
        "ranks_that_wrote": sorted(writers), "files_written": writers,
    }
    print(json.dumps(report["train"], indent=1))


def check_resume(args, out: Path, data: Path, report: dict) -> None:
    workspace = out / "ws_resumed"
    shutil.rmtree(workspace, ignore_errors=True)
    command = train_command(args.gpus, args.gpus, data, workspace, args, save_every=args.steps // 3)

    with open(out / "resume_first.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while ws.read_metadata(workspace) is None:
        if process.poll() is not None:
            sys.exit(f"the run ended before its first checkpoint; see {out / 'resume_first.log'}")
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait()
    stopped = ws.read_metadata(workspace)["step"]
    run(command, out / "resume_second.log")
    text = (out / "resume_second.log").read_text()
    resumed_at = f"resuming {workspace} at step {stopped} " in text
    final = ws.read_metadata(workspace)["step"]
    reference = scalars(out / "ws_many", "train/loss") if (out / "ws_many").is_dir() else {}
    resumed = scalars(workspace, "train/loss")
    after = [s for s in sorted(resumed) if s > stopped and s in reference]
    differences = [abs(resumed[s] - reference[s]) for s in after]
    report["resume"] = {"stopped_at": stopped, "resumed_at_that_step": resumed_at, "final_step": final,
                        "expected_final_step": args.steps,
                        # a NaN loss is a difference too (max() would pass over it)
                        "loss_max_abs_diff_after_resume_vs_uninterrupted":
                            float("nan") if any(d != d for d in differences) else max(differences, default=None),
                        "skipped_steps": {"resumed": ws.read_metadata(workspace).get("nonfinite_steps", 0),
                                          "uninterrupted": (ws.read_metadata(out / "ws_many") or {})
                                          .get("nonfinite_steps", 0)}}
    if (out / "ws_many").is_dir():
        report["resume"]["final_weights_resumed_vs_uninterrupted"] = weight_difference(
            workspace / "model.safetensors", out / "ws_many" / "model.safetensors")
    print(json.dumps(report["resume"], indent=1))


def check_evaluation(args, out: Path, eval_root: Path, report: dict) -> None:
    model = out / "ws_many" / "model.safetensors"
    metrics = {}
    for processes in (1, args.gpus):
        workspace = out / f"eval_{processes}"
        shutil.rmtree(workspace, ignore_errors=True)
        run([*launch(processes, args.smoke), "-m", "tokengs.evaluate", args.size["eval_preset"],
             "--workspace", str(workspace),
             "--resume", str(model), "--dataset_kwargs", "root_path", str(eval_root), "--eval_metrics", "psnr", "ssim",
             "--eval_n_media_dumps", "1"], out / f"eval_{processes}.log")
        metrics[processes] = json.loads((workspace / "metrics.json").read_text())["scenes"]
    # the scores, not the timings
    one, many = ([{k: v for k, v in scene.items() if not k.endswith("_ms")} for scene in metrics[n]]
                 for n in (1, args.gpus))
    report["eval"] = {"scenes": len(one), "scenes_in_multi_process_run": len(many),
                      "identical_per_scene": one == many,
                      "psnr_max_abs_diff": max(abs(a["psnr"] - b["psnr"]) for a, b in zip(one, many)),
                      "per_scene_psnr": [[a["scene"], a["psnr"], b["psnr"]] for a, b in zip(one, many)]}
    print(json.dumps(report["eval"], indent=1))


def main() -> None:
    parser = CommandParser(prog="python scripts/distributed_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=Path("/tmp/tokengs_distributed"))
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=6, help="DataLoader workers per process")
    parser.add_argument("--train_scenes", type=int, default=16)
    parser.add_argument("--eval_scenes", type=int, default=5, help="odd, so the processes get unequal shares")
    parser.add_argument("--only", choices=["train", "resume", "eval"], action="append")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny presets and CPU processes on gloo (a check of this script without GPUs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    stages = args.only or ["train", "resume", "eval"]
    start = time.perf_counter()
    args.size = size = SMOKE if args.smoke else FULL
    context = get_preset(size["eval_preset"]).num_input_views
    make_data(args.data / "dl3dv", "dl3dv", args.train_scenes, 32, 11, size, context)
    if "eval" in stages:
        make_data(args.data / "dl3dv_eval", "dl3dv_eval", args.eval_scenes, 50 if not args.smoke else 8, 12, size,
                  context)
    report["data_s"] = time.perf_counter() - start
    for stage in stages:
        if stage == "train":
            check_training(args, args.out, args.data / "dl3dv", report)
        elif stage == "resume":
            check_resume(args, args.out, args.data / "dl3dv", report)
        else:
            check_evaluation(args, args.out, args.data / "dl3dv_eval", report)
        report_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
