"""The demo at its --quick size: every step runs and leaves files a person can open."""

import json

import numpy as np
import pytest
import torch

from tokengs import demo
from tokengs.gaussians import load_ply
from tokengs.media import read_video


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = demo.run(root / "out", root / "data", preset="demo", quick=True, train_scenes=4, eval_scenes=3)
    return root, summary


def test_demo_writes_every_output(demo_run):
    root, summary = demo_run
    out = root / "out"
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in ("eval", "eval_ttt"):
        report = json.loads((out / name / "metrics.json").read_text())
        assert [scene["index"] for scene in report["scenes"]] == [0, 1, 2]
        assert "lpips" in (out / name / "metrics.txt").read_text()  # "not computed" without the VGG weights
        assert list((out / name / "images").glob("pred_*.png"))
    assert "ttt_ms" in json.loads((out / "eval_ttt" / "metrics.json").read_text())["summary"]
    video = read_video(summary["files"]["orbit_video"])
    assert video.shape[0] == demo.ORBIT_FRAMES and video.std() > 0  # frames differ: the camera moves
    ply = load_ply(summary["files"]["ply"])
    assert 0 < ply.num_gaussians <= demo.train_options("demo", root / "data", out, True).num_gaussians
    from PIL import Image

    assert Image.open(summary["files"]["training_curve"]).size == (640, 360)
    assert summary["train_steps"] == 2  # 4 scenes, 2 held out, batch 2: one step in each of 2 epochs
    text = demo.report(summary)
    assert "mean-colour baseline" in text and str(out / "orbit.mp4") in text


def test_mean_colour_baseline_matches_an_independent_computation(demo_run):
    root, _ = demo_run
    opt = demo.eval_options(demo.train_options("demo", root / "data", root / "out", True), root / "data",
                            root / "unused", ttt=False)
    from tokengs.data import build_dataset

    dataset = build_dataset(opt, "eval")
    scores = []
    for index in range(len(dataset)):
        sample = dataset[index]
        context = sample["images_input"].double().numpy()  # [V, 3, H, W]
        target = sample["images_output"].double().numpy()
        mean = context.transpose(1, 0, 2, 3).reshape(3, -1).mean(axis=1)
        mse = ((target - mean[None, :, None, None]) ** 2).mean()
        scores.append(10 * np.log10(1 / mse))
    assert demo.mean_colour_baseline(opt) == pytest.approx(np.mean(scores), abs=1e-4)


def test_second_run_reuses_data_and_training(demo_run):
    root, first = demo_run
    again = demo.run(root / "out", root / "data", preset="demo", quick=True, train_scenes=4, eval_scenes=3)
    assert again["data_s"] < 1.0  # the scenes were there already
    assert again["train_steps"] == first["train_steps"]  # the COMPLETE workspace is not trained again
    assert again["psnr"] == pytest.approx(first["psnr"])
    assert torch.isfinite(torch.tensor([again["psnr"], again["psnr_with_ttt"]])).all()
