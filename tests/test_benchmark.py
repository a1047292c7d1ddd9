"""scripts/benchmark.py at its --smoke size: every case runs and reports what it measured."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_runs_every_case_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    cases = [r["case"] for r in report["results"]]
    assert cases == ["train_6view_b1", "train_6view_b4", "train_latent_b1", "train_latent_b4", "recon_6view",
                     "ttt_6view", "recon_latent", "ttt_latent"]
    for r in report["results"]:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], r
        assert r["repeats"] == 2
        if r["case"].startswith(("train", "recon")):
            assert r["model_tflops"] > 0  # the FLOP counter saw the model's matmuls
    assert "median ms" in done.stdout  # the table


def test_spread_gaussians_reach_the_intended_distribution():
    """--gaussians spread: the head is re-drawn so that each Gaussian of the fresh model gets its
    own place, size and opacity with the documented statistics, and they cost fewer tiles."""
    import math

    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    for preset_case in ("train_6view_b1", "ttt_latent"):  # gaussian_z_offset 1 and 0
        opt = benchmark.case_options(benchmark.CASES[preset_case], smoke=True)
        torch.manual_seed(0)
        model = benchmark.TokenGS(opt)
        batch = benchmark.random_batch(opt, torch.device("cpu"))
        before = benchmark.tile_statistics(opt, model, batch)
        benchmark.spread_gaussians(model, batch)
        after = benchmark.tile_statistics(opt, model, batch)
        with torch.no_grad():
            g = model.gaussians(batch)
        raw = benchmark.SPREAD_RAW
        depth = g.means[..., 2]
        assert abs(float(depth.median()) - raw["depth"]) < 0.2
        p = depth - opt.gaussian_z_offset
        spread = float((torch.sign(p) * torch.log1p(p.abs())).std())  # of the raw z, through the activation's inverse
        assert 0.7 * raw["depth_log_std"] < spread < 1.3 * raw["depth_log_std"]
        scale_raw = torch.log(g.scales) + 1 - math.log(opt.gaussian_scale_cap)
        assert abs(float(scale_raw.mean()) - raw["scale_mean"]) < 0.1
        assert abs(float(torch.logit(g.opacities).mean()) + opt.opacity_bias - raw["opacity_mean"]) < 0.15
        assert after["mean_radius_px"] < before["mean_radius_px"] / 3
        assert after["tile_pairs_per_view"] < before["tile_pairs_per_view"]
