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
