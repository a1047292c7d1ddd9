"""Trains the demo's shipped checkpoint (checkpoints/demo.safetensors) on a GPU.

    python scripts/train_demo_checkpoint.py --workspace W [--data DIR] [--rooms 1024] [--minutes 8]
        [--steps 12000] [--ship checkpoints/demo.safetensors]

The `demo` preset's model, trained on synthetic DL3DV-layout rooms from the generator the demo
uses (layout dl3dv, seed 0; the demo's held-out rooms are layout dl3dv_eval, seed 1, never seen
here), with a larger batch and a long one-cycle schedule. A run stops itself after --minutes
(SIGTERM: the checkpoint of the current step is saved) and the same command resumes it, so the
schedule can be spread over several GPU sessions. When the schedule is complete, or with --ship
at any point, the weights go to the shipped file with its training curve beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokengs import workspace as ws  # noqa: E402
from tokengs.cli import CommandParser  # noqa: E402
from tokengs.options import Options, get_preset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPOCH_STEPS = 300


def checkpoint_options(workspace: Path, data: Path, rooms: int, steps: int, batch: int = 32) -> Options:
    """The demo preset, as the shipped checkpoint was trained (the weights fit the preset as is)."""
    repeats = max(1, -(-EPOCH_STEPS * batch // rooms))  # an epoch of EPOCH_STEPS steps between validations
    return get_preset("demo").evolve(
        workspace=str(workspace), dataset_kwargs={"root_path": str(data / "dl3dv")},
        data_mode=(("dl3dv_scaled_0.25", repeats),), batch_size=batch, lr=1e-3, num_workers=min(12, os.cpu_count() or 1),
        num_epochs=-(-steps // EPOCH_STEPS), max_iters_per_epoch=EPOCH_STEPS, pct_start_steps=steps // 20,
        save_every_steps=250, print_freq=50, log_image_freq=10**9)


def ship(workspace: Path, target: Path, planned_steps: int) -> None:
    """The weights, and beside them how far training went (step, history) and its curve."""
    from tokengs.demo import plot_training_curve

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(workspace / ws.MODEL_FILE, target)
    metadata = ws.read_metadata(workspace)
    record = {"step": metadata["step"], "planned_steps": planned_steps, "made_by": "scripts/train_demo_checkpoint.py",
              "history": metadata["history"]}
    target.with_name(target.stem + "_training.json").write_text(json.dumps(record, indent=0))
    plot_training_curve(metadata["history"], target.with_name(target.stem + "_training_curve.png"))
    print(f"shipped {target} (step {metadata['step']} of {planned_steps})")


def main() -> None:
    import logging

    from tokengs import train
    from tokengs.data.synthetic import generate

    parser = CommandParser(prog="python scripts/train_demo_checkpoint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("/tmp/tokengs_demo_rooms"))
    parser.add_argument("--rooms", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12000, help="the whole schedule's optimizer steps")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=8.0, help="stop (resumable) after this long")
    parser.add_argument("--ship", type=Path, help="copy the weights here now (default: only when complete)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.data / "dl3dv").is_dir():
        generate("dl3dv", args.data / "dl3dv", args.rooms, seed=0, workers=os.cpu_count() or 1, progress=True)
    opt = checkpoint_options(args.workspace, args.data, args.rooms, args.steps, args.batch_size)
    timer = threading.Timer(args.minutes * 60, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    complete = train.run(opt)
    timer.cancel()
    if complete or args.ship:
        ship(args.workspace, args.ship or ROOT / "checkpoints" / "demo.safetensors", args.steps)


if __name__ == "__main__":
    main()
