"""The demo: its shipped checkpoint, its held-out protocol, and a --quick run of every step that
leaves files a person can open."""

import json
import time

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from tokengs import demo
from tokengs.data.synthetic import evaluation_views
from tokengs.gaussians import load_ply
from tokengs.media import read_video
from tokengs.models import TokenGS, load_model_checkpoint
from tokengs.options import get_preset


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = demo.run(root / "out", root / "data", preset="demo", quick=True, train_scenes=4, eval_scenes=3)
    return root, summary


@pytest.mark.parametrize("preset", ["demo", "demo_gpu"])
def test_shipped_checkpoint_loads_strictly_into_the_demo_presets(preset):
    opt = get_preset(preset)
    model = TokenGS(opt)
    load_model_checkpoint(model, demo.SHIPPED_CHECKPOINT, opt, strict=True)
    assert demo.SHIPPED_CHECKPOINT.stat().st_size <= 20 * 2**20
    record = json.loads(demo.SHIPPED_CHECKPOINT.with_name("demo_training.json").read_text())
    assert record["step"] > 0 and record["history"][-1]["step"] <= record["step"]


def test_heldout_rooms_follow_the_benchmark_protocol(demo_run):
    root, _ = demo_run
    index = json.loads((demo.heldout_root(root / "data", 4) / "evaluation.json").read_text())
    assert len(index) == 3
    expected_context, expected_targets = evaluation_views(demo.EVAL_FRAMES, 4, demo.EVAL_SPAN)
    for entry in index.values():
        assert entry["context"] == expected_context and entry["target"] == expected_targets
        # every target lies strictly between two context views, at most EVAL_SPAN / 3 frames from one
        assert all(min(abs(t - c) for c in entry["context"]) <= demo.EVAL_SPAN // 6 for t in entry["target"])


def test_demo_writes_every_output(demo_run):
    root, summary = demo_run
    out = root / "out"
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in ("eval_shipped", "eval", "eval_ttt"):
        report = json.loads((out / name / "metrics.json").read_text())
        assert [scene["index"] for scene in report["scenes"]] == [0, 1, 2]
        assert "lpips" in (out / name / "metrics.txt").read_text()  # "not computed" without the VGG weights
        assert list((out / name / "images").glob("pred_*.png"))
    assert "ttt_ms" in json.loads((out / "eval_ttt" / "metrics.json").read_text())["summary"]
    assert summary["train_steps"] == 2  # 4 rooms, 2 held out for validation, repeated twice, batch 2
    video = read_video(summary["files"]["orbit_video"])
    assert video.shape[0] == demo.ORBIT_FRAMES and video.std() > 0  # frames differ: the camera moves
    ply = load_ply(summary["files"]["ply"])
    assert 0 < ply.num_gaussians <= get_preset("demo").num_gaussians
    from PIL import Image

    assert Image.open(summary["files"]["training_curve"]).size == (640, 360)
    # the comparison grid: 9 targets of 48 px each enlarged to 192 px, prediction beside truth
    assert np.asarray(Image.open(summary["files"]["comparison"])).shape == (9 * 196 - 4, 2 * 324 - 4, 3)
    text = demo.report(summary)
    assert "mean-colour baseline" in text and str(out / "orbit.mp4") in text
    assert summary["ssim_mean_colour_baseline"] < summary["ssim"]
    # the shipped checkpoint already reconstructs the held-out rooms better than their mean colour
    assert summary["psnr_shipped_checkpoint"] > summary["psnr_mean_colour_baseline"] + 1.0


def test_mean_colour_baseline_matches_an_independent_computation(demo_run):
    root, _ = demo_run
    opt = demo.eval_options(demo.train_options("demo", root / "data", root / "out", True, None), root / "data",
                            root / "unused", ttt=False)
    from tokengs.data import build_dataset

    dataset = build_dataset(opt, "eval")
    psnrs, ssims = [], []
    for index in range(len(dataset)):
        batch = dataset[index]
        context = batch.context.images[0].double().numpy()  # [V, 3, H, W]
        target = batch.target.images[0].double().numpy()
        mean = context.transpose(1, 0, 2, 3).reshape(3, -1).mean(axis=1)
        prediction = np.broadcast_to(mean[None, :, None, None], target.shape)
        psnrs.append(10 * np.log10(1 / ((target - prediction) ** 2).mean()))
        ssims.append(np.mean([structural_similarity(t, p, win_size=11, gaussian_weights=True, channel_axis=0,
                                                    data_range=1.0) for t, p in zip(target, prediction)]))
    baseline = demo.mean_colour_baseline(opt)
    assert baseline["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert baseline["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)


def test_second_run_reuses_data_and_training_and_times_only_itself(demo_run):
    root, first = demo_run
    start = time.perf_counter()
    again = demo.run(root / "out", root / "data", preset="demo", quick=True, train_scenes=4, eval_scenes=3)
    wall = time.perf_counter() - start
    assert again["data_s"] < 1.0  # the rooms were there already
    # the finished first run's time is not added: the phases fit in this run's wall time
    assert 0 < again["data_s"] + again["train_s"] + again["eval_s"] <= wall
    assert again["train_steps"] == first["train_steps"]  # the COMPLETE workspace is not trained again
    assert again["psnr"] == pytest.approx(first["psnr"])
    assert torch.isfinite(torch.tensor([again["psnr"], again["psnr_with_ttt"]])).all()


def test_a_stopped_fine_tuning_stops_the_demo_before_evaluating(tmp_path, monkeypatch):
    from tokengs import train

    monkeypatch.setattr(train, "run", lambda opt: False)  # what a SIGTERM or Ctrl-C mid-run returns
    with pytest.raises(demo.DemoStopped, match="checkpoint is saved in .*run the same command to resume"):
        demo.run(tmp_path / "out", tmp_path / "data", preset="demo", quick=True, train_scenes=4, eval_scenes=1)
    assert not (tmp_path / "out" / "eval").exists() and not (tmp_path / "out" / "eval_ttt").exists()
    assert json.loads((tmp_path / "out" / "timings.json").read_text())["train_s"] >= 0


def test_retrain_fine_tunes_again_and_bad_room_counts_stop_at_start_up(demo_run, tmp_path, capsys):
    root, first = demo_run
    model = root / "out" / "train" / "model.safetensors"
    before = model.stat().st_mtime_ns
    again = demo.run(root / "out", root / "data", preset="demo", quick=True, train_scenes=4, eval_scenes=3,
                     retrain=True)
    assert model.stat().st_mtime_ns > before and again["train_steps"] == first["train_steps"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        demo.main(["--eval_scenes", "0", "--checkpoint", str(tmp_path / "absent.safetensors"),
                   "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and lines[0] == "error: fix 2 problem(s) before the demo:", lines
    assert lines[1] == "  - --eval_scenes must be at least 1, not 0"
    assert lines[2].startswith(f"  - --checkpoint {tmp_path / 'absent.safetensors'} does not exist")
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()
