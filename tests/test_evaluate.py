"""Evaluation end to end on the CPU: a tiny model trained a few steps on synthetic DL3DV scenes,
evaluated on synthetic DL3DV-benchmark-layout scenes (3 of them: an odd count for 2 processes).

The CLI runs in subprocesses (as users run it, and so each run has its own accelerate state);
test-time tuning and chunked rendering are also checked in-process.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage.metrics import structural_similarity

from tokengs.data import build_dataset
from tokengs.data.synthetic import generate
from tokengs.evaluate import main as evaluate_main
from tokengs.gaussians import PLY_MIN_OPACITY, load_ply
from tokengs.losses import LossComputer
from tokengs import ttt  # not its function by name: pytest would collect test_time_tune
from tokengs.models import TokenGS, load_model_checkpoint
from tokengs.options import get_preset
from tokengs.rendering import render_chunked
from conftest import ONE_THREAD_ENV, free_port, two_process_launch

SCENES = 3  # odd, so that 2 processes get 2 and 1
FRAMES = 8  # per evaluation scene: 2 context views (frames 0 and 7) and all 8 frames as targets
CONTEXT, TARGETS = 2, FRAMES
HEIGHT, WIDTH = get_preset("tiny_eval").img_size
ENV = ONE_THREAD_ENV


pytestmark = pytest.mark.usefixtures("one_thread")


def run(module: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, f"{module} {' '.join(map(str, args))} failed:\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic training and evaluation roots; a plain and a latent-bottleneck tiny model trained on them."""
    base = tmp_path_factory.mktemp("evaluate")
    train_root, eval_root = base / "dl3dv", base / "dl3dv_eval"
    generate("dl3dv", train_root, 4, seed=3)
    generate("dl3dv_eval", eval_root, SCENES, seed=5, frames=FRAMES)
    runs = {}
    for preset in ("tiny", "tiny_latent"):
        runs[preset] = base / f"train_{preset}"
        # 30 steps at a high rate: enough to leave the flat grey start (~16 dB on held-out views)
        run("tokengs.train", preset, "--workspace", runs[preset], "--dataset_kwargs", "root_path", train_root,
            "--num_epochs", 10, "--batch_size", 1, "--lr", 1e-2)
    return SimpleNamespace(base=base, train_root=train_root, eval_root=eval_root, plain=runs["tiny"],
                           latent=runs["tiny_latent"])


def evaluate_args(data, workspace: Path, *extra) -> list:
    return ["tiny_eval", "--workspace", workspace, "--resume", data.plain / "model.safetensors",
            "--dataset_kwargs", "root_path", data.eval_root, *extra]


@pytest.fixture(scope="module")
def single_run(data):
    """One process, test-time tuning on, media for every scene; the targets rendered in one chunk.
    The workspace and what the run printed."""
    workspace = data.base / "eval_single"
    done = run("tokengs.evaluate", *evaluate_args(data, workspace, "--use_ttt_for_eval", "--eval_n_media_dumps",
                                                  SCENES, "--eval_render_chunk_size", TARGETS))
    return SimpleNamespace(workspace=workspace, stdout=done.stdout)


@pytest.fixture(scope="module")
def single(single_run):
    return single_run.workspace


def report(workspace: Path) -> dict:
    return json.loads((workspace / "metrics.json").read_text())


def scene_names(eval_root: Path) -> list:
    return list(json.loads((eval_root / "evaluation.json").read_text()))


# ---- reports ----------------------------------------------------------------------------------

def test_reports_list_every_scene_exactly_once(data, single):
    names = scene_names(data.eval_root)
    metrics = report(single)
    assert [s["scene"] for s in metrics["scenes"]] == names
    assert [s["index"] for s in metrics["scenes"]] == list(range(SCENES))
    for name in ("psnr", "ssim", "reconstruction_ms", "ttt_ms"):
        values = [s[name] for s in metrics["scenes"]]
        assert all(np.isfinite(values)) and metrics["summary"][name]["count"] == SCENES
        assert metrics["summary"][name]["mean"] == pytest.approx(np.mean(values))
        assert metrics["summary"][name]["std"] == pytest.approx(np.std(values))
    assert all(s["ttt_ms"] > 0 for s in metrics["scenes"])

    text = (single / "metrics.txt").read_text()
    for name in names:
        assert text.count(name) == 1
    psnr = metrics["summary"]["psnr"]
    assert f"{psnr['mean']:.4f} ± {psnr['std']:.4f} [{psnr['min']:.4f}, {psnr['max']:.4f}]" in text
    assert "token-tuning (10 steps, lr 0.01)" in text


def test_the_run_ends_printing_the_mean_scores_and_where_the_reports_are(single_run):
    metrics = report(single_run.workspace)
    printed = single_run.stdout
    for name in ("psnr", "ssim"):
        assert f"{name.upper()} {metrics['summary'][name]['mean']:.4f}" in printed, printed
    assert f"evaluated {SCENES} scenes" in printed and "LPIPS not computed" in printed
    for report_file in ("metrics.txt", "metrics.json"):
        assert str(single_run.workspace / report_file) in printed


def test_lpips_left_out_is_reported_as_not_computed(single):
    metrics = report(single)
    assert metrics["not_computed"] == ["lpips"]
    assert "lpips" not in metrics["summary"] and all("lpips" not in s for s in metrics["scenes"])
    (line,) = [line for line in (single / "metrics.txt").read_text().splitlines() if line.startswith("lpips")]
    assert "not computed" in line and not any(c.isdigit() for c in line)


def test_two_processes_score_each_scene_once_as_one_process(data, single):
    workspace = data.base / "eval_two"
    done = subprocess.run([*two_process_launch(free_port()), "-m", "tokengs.evaluate",
                           *map(str, evaluate_args(data, workspace, "--use_ttt_for_eval", "--eval_n_media_dumps", 1,
                                                   "--eval_render_chunk_size", 3))],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(f"evaluated {SCENES} scenes") == 1  # the main process's summary only
    # each process dumped its first scene: the runs really were two
    assert (workspace / "images" / "pred_0-0-0.png").is_file() and (workspace / "images" / "pred_0-1-0.png").is_file()
    one, two = report(single)["scenes"], report(workspace)["scenes"]
    assert [s["scene"] for s in two] == scene_names(data.eval_root)
    for a, b in zip(one, two):
        # the same numbers: scenes do not depend on the process, nor the images on the render chunks (3 vs 8 views)
        assert (a["index"], a["scene"]) == (b["index"], b["scene"])
        assert (b["psnr"], b["ssim"]) == (a["psnr"], a["ssim"])


# ---- media ------------------------------------------------------------------------------------

def views(path: Path, count: int) -> np.ndarray:
    """A grid PNG of one row of views -> [count, H, W, 3] float in [0, 1]."""
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    assert grid.shape == (HEIGHT, count * WIDTH, 3)
    return np.stack(np.split(grid, count, axis=1))


def test_psnr_and_ssim_recomputed_from_the_dumped_images_agree(single):
    for scene in report(single)["scenes"]:
        tag = f"0-0-{scene['index']}"  # one process: iteration = scene index
        pred = views(single / "images" / f"pred_{tag}.png", TARGETS)
        gt = views(single / "images" / f"gt_{tag}.png", TARGETS)
        rmse = np.sqrt(np.mean((pred - gt) ** 2))
        ssim = np.mean([structural_similarity(g, p, win_size=11, gaussian_weights=True, channel_axis=-1,
                                              data_range=1.0) for p, g in zip(pred, gt)])
        print(f"scene {scene['index']}: psnr {scene['psnr']:.4f} (png {-20 * np.log10(rmse):.4f}), "
              f"ssim {scene['ssim']:.4f} (png {ssim:.4f})")
        # rounding each image to 8 bits moves each pixel by <= 0.5/255, so the RMSE by <= 1/255 (triangle
        # inequality); the rounding can be biased (a flat region near 127.5), so this bound, not a PSNR one
        assert abs(rmse - 10 ** (-scene["psnr"] / 20)) <= 1 / 255
        assert ssim == pytest.approx(scene["ssim"], abs=5e-3)


def video_frames(path: Path) -> np.ndarray:
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack(list(reader.iter_data()))  # not list(reader): its len() is inf for ffmpeg streams


def test_every_media_file_exists_and_decodes(data, single):
    num_gaussians = get_preset("tiny_eval").num_gaussians
    for index in range(SCENES):
        tag = f"0-0-{index}"
        assert views(single / "images" / f"input_{tag}.png", CONTEXT).std() > 0
        for name in ("pred", "gt"):
            assert views(single / "images" / f"{name}_{tag}.png", TARGETS).std() > 0
        assert views(single / "depths" / f"depth_{tag}.png", TARGETS).std() > 0
        for name, frames, width in (("pred", TARGETS, WIDTH), ("gt", TARGETS, WIDTH), ("depth", TARGETS, WIDTH),
                                    ("input", CONTEXT, WIDTH), ("comparison", TARGETS, 2 * WIDTH)):
            video = video_frames(single / "videos" / f"{name}_{tag}.mp4")
            assert video.shape == (frames, HEIGHT, width, 3) and video.std() > 0, name
        gaussians = load_ply(single / "gaussians" / f"gaussians_{tag}.ply")
        assert 0 < gaussians.num_gaussians <= num_gaussians
        assert all(torch.isfinite(t).all() for t in (gaussians.means, gaussians.scales, gaussians.colors))
        assert (gaussians.opacities >= PLY_MIN_OPACITY * 0.999).all()
    # the predicted video shows the predicted PNG (up to H.264's loss)
    video = video_frames(single / "videos" / "pred_0-0-0.mp4") / 255
    assert np.abs(video - views(single / "images" / "pred_0-0-0.png", TARGETS)).mean() < 0.05


def test_a_new_evaluation_in_a_workspace_replaces_the_earlier_media(data, single, tmp_path):
    workspace = tmp_path / "again"
    for folder in ("images", "depths", "videos", "gaussians"):
        shutil.copytree(single / folder, workspace / folder)  # an earlier run's media of all 3 scenes
    run("tokengs.evaluate", *evaluate_args(data, workspace, "--eval_n_media_dumps", 1))
    tags = {path.name.rsplit("_", 1)[-1].split(".")[0] for path in workspace.glob("*/*_*.*")}
    assert tags == {"0-0-0"}, tags


# ---- test-time tuning -------------------------------------------------------------------------

def context_psnr(opt, packed: torch.Tensor, batch) -> float:
    """PSNR of the Gaussians rendered into the context cameras against the context images (all views' pixels)."""
    render = render_chunked(opt, packed, batch.context)
    return float(-10 * torch.log10((render.images - batch.context.images).square().mean()))


# tiny_eval's 10 steps at 1e-2 for the tokens. The tiny latent model's decoder reads the latents'
# keys/values through a LayerScale of 0.01 that 30 training steps barely grow, so the latents move
# its Gaussians little: a large rate and more steps make their effect measurable.
@pytest.mark.parametrize("preset, mode, steps, lr, gain_db", [("tiny", "tokens", 10, 1e-2, 0.5),
                                                              ("tiny_latent", "latents", 20, 1.0, 0.05)])
def test_test_time_tuning_raises_context_psnr_and_leaves_weights_unchanged(data, preset, mode, steps, lr, gain_db):
    workspace = data.plain if preset == "tiny" else data.latent
    opt = get_preset(preset).evolve(evaluating=True, batch_size=1, data_mode=(("dl3dv_eval", 1),),
                                    dataset_kwargs={"root_path": str(data.eval_root)}, use_ttt_for_eval=True,
                                    ttt_mode=mode, ttt_n_steps=steps, ttt_lr=lr)
    model = TokenGS(opt)
    load_model_checkpoint(model, workspace / "model.safetensors", opt)
    model.eval()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    batch = build_dataset(opt, "eval")[0]

    with torch.no_grad():
        encoding = model.encode(batch)
        before = context_psnr(opt, model.decode(encoding, use_target_time=False), batch)
    tuned = ttt.test_time_tune(model, encoding, batch.context, opt, LossComputer(opt))
    after = context_psnr(opt, tuned, batch)
    print(f"{opt.resolved_ttt_mode}: context PSNR {before:.3f} -> {after:.3f} dB")

    assert tuned.shape == (1, opt.num_gaussians, 14) and not tuned.requires_grad
    assert after > before + gain_db
    state = model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[name], weights[name]) for name in weights)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_chunked_target_renders_equal_one_render(data):
    opt = get_preset("tiny_eval").evolve(dataset_kwargs={"root_path": str(data.eval_root)})
    model = TokenGS(opt)
    load_model_checkpoint(model, data.plain / "model.safetensors", opt)
    batch = build_dataset(opt, "eval")[1]
    with torch.no_grad():
        packed = model.eval().forward_gaussians(batch)
        whole = render_chunked(opt, packed, batch.target)
        chunked = render_chunked(opt, packed, batch.target, chunk_size=3)  # 3 + 3 + 2 views
    assert whole.images.shape == (1, TARGETS, 3, HEIGHT, WIDTH)
    for name in ("images", "alphas", "depths"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name


# ---- checkpoints and start-up checks ----------------------------------------------------------

def test_config_evaluates_the_workspace_model_by_default(data):
    # a finetuning workspace's config names the checkpoint the run STARTED from: that one must not be used
    trained = data.base / "finetuned"
    trained.mkdir()
    config = yaml.safe_load((data.plain / "config.yaml").read_text())
    config["resume"] = str(data.base / "start.safetensors")  # does not exist: using it would stop the run
    (trained / "config.yaml").write_text(yaml.safe_dump(config))
    (trained / "model.safetensors").write_bytes((data.plain / "model.safetensors").read_bytes())
    workspace = data.base / "eval_config"
    run("tokengs.evaluate", "--config", trained / "config.yaml", "--workspace", workspace, "--eval_metrics", "psnr",
        "ssim")
    metrics = report(workspace)
    assert metrics["checkpoint"] == str(trained / "model.safetensors")
    assert metrics["num_scenes"] == 4 and all(np.isfinite(s["psnr"]) for s in metrics["scenes"])  # the training scenes


def test_a_checkpoint_of_another_model_fails_strict_loading(data):
    workspace = data.base / "eval_wrong"
    done = run("tokengs.evaluate", "tiny_eval", "--workspace", workspace, "--resume", data.latent / "model.safetensors",
               "--dataset_kwargs", "root_path", data.eval_root, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(data.latent / "model.safetensors") in done.stderr and "strict loading" in done.stderr
    assert "missing keys" in done.stderr and "unexpected keys" in done.stderr
    assert "preset 'tiny_latent'" in done.stderr  # where the checkpoint belongs
    assert not workspace.exists()


def fail_before_work(capsys, workspace: Path, *args) -> str:
    """Run the CLI in-process, expecting it to stop at start-up: exit code 2, nothing written."""
    with pytest.raises(SystemExit) as stop:
        evaluate_main(["tiny_eval", "--workspace", str(workspace), *map(str, args)])
    assert stop.value.code == 2
    assert not workspace.exists()
    return capsys.readouterr().err


def test_missing_root_and_checkpoint_are_named_with_their_flags(data, capsys):
    root, checkpoint = data.base / "no_such_root", data.base / "no_such.safetensors"
    message = fail_before_work(capsys, data.base / "eval_missing", "--resume", checkpoint,
                               "--dataset_kwargs", "root_path", root)
    assert "2 problem(s)" in message
    assert str(root) in message and "--dataset_kwargs root_path" in message
    assert str(checkpoint) in message and "--resume" in message


def test_missing_evaluation_json_is_named_with_its_flag(data, capsys):
    index = data.base / "no_such_index.json"
    message = fail_before_work(capsys, data.base / "eval_missing", "--resume", data.plain / "model.safetensors",
                               "--dataset_kwargs", "root_path", data.eval_root, "evaluation_json", index)
    assert "1 problem(s)" in message and str(index) in message and "--dataset_kwargs evaluation_json" in message


def test_missing_lpips_weights_are_named_with_the_flag_that_leaves_lpips_out(data, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    message = fail_before_work(capsys, data.base / "eval_missing", "--resume", data.plain / "model.safetensors",
                               "--dataset_kwargs", "root_path", data.eval_root, "--eval_metrics", "psnr", "ssim",
                               "lpips")
    assert "1 problem(s)" in message and str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "--eval_metrics" in message
