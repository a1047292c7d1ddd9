"""Data-loading throughput: samples/s of ONE worker for DL3DV-layout scenes at 960x540 -> 256x448
with 6 context + 4 target views (the finetune_dl3dv_6view preset).

    python scripts/data_throughput.py [--root DIR] [--scenes 2 --frames 24] [--samples 40] [--workers 0]

Without --root it first generates full-size synthetic scenes (PNG frames, as DL3DV-ALL-960P) in a
temporary folder. One worker's rate times num_workers is what a GPU process can be fed (the
samples are independent); compare it with the training step rate.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tokengs.cli import CommandParser
from tokengs.data import build_dataset, collate
from tokengs.data.synthetic import generate
from tokengs.options import get_preset


def measure(root: Path, samples: int, workers: int) -> dict:
    opt = get_preset("finetune_dl3dv_6view").evolve(dataset_kwargs={"root_path": str(root)}, batch_size=1,
                                                    num_workers=workers)
    dataset = build_dataset(opt, "train")
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    dataset[0]  # warm caches (imports, first file open)
    start = time.perf_counter()
    scene_times = []
    for i in range(samples):
        tick = time.perf_counter()
        dataset[i % len(dataset)]
        scene_times.append(time.perf_counter() - tick)
    single = samples / (time.perf_counter() - start)
    result = {"samples_per_s_per_worker": single, "ms_per_sample": 1e3 / single}
    if workers > 0:
        loader = DataLoader(dataset, batch_size=1, num_workers=workers, shuffle=True, persistent_workers=False,
                            collate_fn=collate)
        start, count = time.perf_counter(), 0
        for _ in loader:
            count += 1
            if count >= samples:
                break
        result[f"samples_per_s_with_{workers}_workers"] = count / (time.perf_counter() - start)
    return result


def main() -> None:
    parser = CommandParser(prog="python scripts/data_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="a DL3DV-layout root (default: generate synthetic 960x540 scenes)")
    parser.add_argument("--scenes", type=int, default=2, help="synthetic scenes to generate (one more is held out)")
    parser.add_argument("--frames", type=int, default=24, help="frames per synthetic scene")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root) if args.root else Path(scratch)
        if not args.root:
            start = time.perf_counter()
            generate("dl3dv", root, args.scenes + 1, seed=0, frames=args.frames, height=540, width=960)
            print(f"generated {args.scenes + 1} scenes of {args.frames} 960x540 frames in "
                  f"{time.perf_counter() - start:.1f} s")
        result = measure(root, args.samples, args.workers)
    for key, value in result.items():
        print(f"{key}: {value:.2f}")


if __name__ == "__main__":
    main()
