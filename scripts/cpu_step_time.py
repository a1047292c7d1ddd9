"""How long a training step of the demo model takes on the CPU, idle and beside a busy process,
for a few torch thread counts (what `tokengs.threads.cpu_threads` chooses is marked). The demo
presets start from the shipped checkpoint, as the demo does: a fresh model's Gaussians are larger
and cost the CPU rasterizer about 3x the time per step.

    python scripts/cpu_step_time.py [--steps 6] [--threads 1 2] [--preset demo]

The busy process is one Python loop spinning on one core, as another user's job would. Prints the
median step time per case and the slowdown beside the busy process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def step_times(preset: str, data: Path, threads: int, steps: int) -> list[float]:
    """Seconds of each optimizer step (data loading included) of `preset` on `threads` torch threads."""
    import torch

    from tokengs.demo import SHIPPED_CHECKPOINT
    from tokengs.options import get_preset
    from tokengs.train import Trainer

    torch.set_num_threads(threads)
    opt = get_preset(preset).evolve(workspace=str(data / f"ws_{threads}"), dataset_kwargs={"root_path": str(data)},
                                    num_workers=0, max_iters_per_epoch=steps + 1, save_every_steps=10**9,
                                    data_mode=(("dl3dv_scaled_0.25", steps + 1),),  # enough batches of the 8 rooms
                                    resume=str(SHIPPED_CHECKPOINT) if preset.startswith("demo") else None)
    trainer = Trainer(opt)
    trainer.setup()
    times, batches = [], iter(trainer.loader)
    for _ in range(steps + 1):
        start = time.perf_counter()
        trainer.train_step(next(batches))
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step holds the allocator's warm-up


def main() -> None:
    from tokengs.data.synthetic import generate
    from tokengs.threads import cpu_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    chosen = cpu_threads()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch)
        generate("dl3dv", data, 16, seed=5)
        print(f"{'threads':>8} {'idle s/step':>12} {'busy s/step':>12} {'slowdown':>9}")
        for threads in args.threads:
            idle = statistics.median(step_times(args.preset, data, threads, args.steps))
            busy_loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                busy = statistics.median(step_times(args.preset, data, threads, args.steps))
            finally:
                busy_loop.kill()
            mark = "  <- chosen" if threads == chosen else ""
            print(f"{threads:>8} {idle:>12.2f} {busy:>12.2f} {busy / idle:>8.2f}x{mark}")


if __name__ == "__main__":
    main()
