"""Time `tokengs.reconstruct` per scene at real size, end to end, and say where the time goes.

    python scripts/reconstruct_timing.py --out DIR [--scenes 5] [--preset finetune_dl3dv_6view]
        [--frames 50] [--height 540] [--width 960] [--gaussians spread|fresh] [--video] [--workers N] [--smoke]

Generates --scenes + 1 synthetic captures in the DL3DV layout (DIR/data/1K/<scene>.zip, 50 PNG
frames of 960x540 each, made once and reused) and reconstructs each into DIR/out/<scene>/ with the
preset's model, exactly as `python -m tokengs.reconstruct --scene ZIP` does after its start-up,
without tuning. The model holds fresh weights (no download; the reconstruction's cost does not
depend on them), built once before the first scene; `--gaussians spread` (the default) re-draws
its head so that the Gaussians spread and shrink like a trained model's (scripts/benchmark.py),
where fresh ones clump and each covers much of every image, which makes rendering slower than
on a real model. The first scene warms up (CUDA context, kernels) and is not counted.

Per scene: read (open the zip, check it, decode the frames), preprocess (crop, resize, cameras,
rays, on the device), model (encode + decode), render_metrics (every target rendered and scored),
write (gaussians.ply, cameras.json with its images, a PNG per target, metrics.txt); their sum is
the end-to-end time. The video is left out (--video adds it, reported apart). Prints a table and
one JSON line of the medians. `--smoke` runs the `tiny` preset on 64x96 captures of 10 frames
(a CPU check of the script).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokengs.cli import CommandParser  # noqa: E402
from tokengs.data.synthetic import generate  # noqa: E402
from tokengs.models import TokenGS  # noqa: E402
from tokengs.options import get_preset  # noqa: E402
from tokengs.reconstruct import (Request, capture_batch, read_capture, reconstruct,  # noqa: E402
                                 reconstruction_options, scene_scale)

PHASES = ("read", "preprocess", "model", "render_metrics", "write")
SMOKE = dict(preset="tiny", frames=10, height=64, width=96, scenes=2, workers=1)


def captures(root: Path, count: int, frames: int, height: int, width: int, workers: int) -> list[Path]:
    """count synthetic DL3DV-layout captures under root, generated (by `workers` processes) unless
    a previous run left them."""
    zips = sorted((root / "1K").glob("*.zip"))
    if len(zips) < count:
        generate("dl3dv", root, count, seed=0, frames=frames, height=height, width=width, progress=True,
                 workers=workers)
        zips = sorted((root / "1K").glob("*.zip"))
    return zips[:count]


def time_scene(model: TokenGS, opt, request: Request, device: torch.device) -> dict:
    """Reconstruct one capture; seconds per phase, end to end, and the Gaussians written."""
    start = time.perf_counter()
    capture, problems = read_capture(request, opt.num_input_views)
    if problems:
        raise SystemExit(f"{request.scene}: " + "; ".join(problems))
    read = time.perf_counter() - start
    result = reconstruct(model, opt, capture, request, device)
    seconds = {"read": read, **result.seconds}
    seconds["end_to_end"] = sum(seconds[phase] for phase in PHASES)
    return {"scene": request.scene.stem, "seconds": seconds, "gaussians": result.num_gaussians,
            "targets": len(result.scores)}


def main(argv=None) -> dict:
    from tokengs.threads import configure_cpu_threads

    parser = CommandParser(prog="python scripts/reconstruct_timing.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="captures go to OUT/data, results to OUT/out")
    parser.add_argument("--scenes", type=int, default=5, help="timed scenes (one more warms up)")
    parser.add_argument("--preset", default="finetune_dl3dv_6view")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--height", type=int, default=540)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--gaussians", choices=("spread", "fresh"), default="spread",
                        help="spread: Gaussians placed and sized like a trained model's; fresh: as initialized")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating the captures")
    parser.add_argument("--video", action="store_true", help="also write path.mp4 (timed apart)")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset on small captures (CPU check)")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    configure_cpu_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    zips = captures(args.out / "data", args.scenes + 1, args.frames, args.height, args.width, args.workers)
    opt = get_preset(args.preset)
    opt = reconstruction_options(opt, opt.num_input_views)
    torch.manual_seed(0)
    model = TokenGS(opt).to(device).eval()
    requests = [Request(scene=z, out=args.out / "out" / z.stem, video_frames=120 if args.video else 0) for z in zips]
    if args.gaussians == "spread":
        from benchmark import spread_gaussians  # scripts/benchmark.py, beside this script

        capture, _ = read_capture(requests[0], opt.num_input_views)
        spread_gaussians(model, capture_batch(opt, capture, scene_scale(opt, requests[0]), device))
    time_scene(model, opt, requests[0], device)  # warm-up, not counted
    runs = [time_scene(model, opt, request, device) for request in requests[1:]]

    names = PHASES + ("end_to_end",) + (("video",) if args.video else ())
    print(f"{'scene':18s}" + "".join(f"{name:>15s}" for name in names))
    for run in runs:
        print(f"{run['scene'][:16]:18s}" + "".join(f"{run['seconds'][name]:15.3f}" for name in names))
    medians = {name: statistics.median(run["seconds"][name] for run in runs) for name in names}
    report = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "weights": "fresh", "gaussians": args.gaussians, "scenes": len(runs), "frames": args.frames,
              "capture_hw": [args.height, args.width], "img_size": list(opt.img_size),
              "context_views": opt.num_input_views, "targets": runs[0]["targets"],
              "gaussians_written": statistics.median(run["gaussians"] for run in runs),
              "median_s": {name: round(value, 4) for name, value in medians.items()},
              "max_end_to_end_s": round(max(run["seconds"]["end_to_end"] for run in runs), 4)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
