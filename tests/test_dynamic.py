"""The dynamic (Kubric) model end to end on synthetic Kubric-layout scenes, at the tiny size:
training with the auxiliary schedule, the static/dynamic partition, and
scripts/render_kubric_dyn.py (videos, scene-flow tracks)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokengs import train
from tokengs.data.synthetic import generate
from tokengs.gaussians import Gaussians
from tokengs.media import read_video
from tokengs.models import TokenGS, save_model
from tokengs.options import get_preset
from conftest import ONE_THREAD_ENV

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kubric_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kubric")
    generate("kubric", root, 4, frames=8, cameras_per_scene=4, height=32, width=48)
    return root


def test_training_follows_the_auxiliary_weight_schedule(kubric_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opt = get_preset("tiny_kubric_dyn").evolve(workspace=str(tmp_path / "ws"), batch_size=1, num_epochs=3,
                                               max_iters_per_epoch=3, dataset_kwargs={"root_path": str(kubric_root)})
    assert train.run(opt)
    events = EventAccumulator(str(tmp_path / "ws" / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/dyn_aux_weight")}
    assert sorted(logged) == list(range(1, 10))  # 3 epochs of 3 steps, every step logged (print_freq 1)
    # hold 0.3 for 2 steps, then linearly to 0 over 4: the weight step s used is that of global step s - 1
    expected = {1: 0.3, 2: 0.3, 3: 0.3, 4: 0.225, 5: 0.15, 6: 0.075, 7: 0.0, 8: 0.0, 9: 0.0}
    assert logged == pytest.approx(expected, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/loss"))


def test_static_and_dynamic_gaussians_partition_the_full_set(kubric_root):
    from tokengs.data import build_dataset

    opt = get_preset("tiny_kubric_dyn").evolve(dataset_kwargs={"root_path": str(kubric_root)})
    batch = build_dataset(opt, "val")[0]
    torch.manual_seed(0)
    model = TokenGS(opt).eval()
    with torch.no_grad():
        packed = model.forward_gaussians(batch)
    dynamic = model.dynamic_gaussian_mask()
    assert dynamic.sum() == opt.num_dynamic_gs_tokens * opt.dec_patch_size**2
    full = Gaussians.unpack(packed)
    parts = Gaussians.cat([full.select(~dynamic), full.select(dynamic)])
    assert torch.equal(parts.pack(), packed)  # static first, dynamic last: nothing lost, nothing twice


# ---- scripts/render_kubric_dyn.py ------------------------------------------------------------------

TRAJECTORY_FRAMES = 7


@pytest.fixture(scope="module")
def rendered(kubric_root, tmp_path_factory):
    """The script run on 2 scenes with a tiny dynamic model whose target time embedding is random
    (a fresh model's is zero, which would decode the same Gaussians at every time)."""
    base = tmp_path_factory.mktemp("render_kubric_dyn")
    opt = get_preset("tiny_kubric_dyn").evolve(dataset_kwargs={"root_path": str(kubric_root)})
    torch.manual_seed(0)
    model = TokenGS(opt)
    with torch.no_grad():
        for parameter in model.patch_time_embed_tgt.parameters():
            parameter.normal_(0, 0.5)
    save_model(model, base / "model.safetensors")
    out = base / "out"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_kubric_dyn.py"), "--ckpt",
                           str(base / "model.safetensors"), "--preset", "tiny_kubric_dyn", "--kubric_root",
                           str(kubric_root), "--out_dir", str(out), "--n_scenes", "2", "--fps", "4",
                           "--trajectory_frames", str(TRAJECTORY_FRAMES)],
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return opt, model.eval(), out, json.loads((out / "summary.json").read_text())


def test_render_script_writes_every_video_with_its_frame_count(rendered):
    opt, _, _, summary = rendered
    height, width = opt.img_size
    assert len(summary) == 2
    for scene in summary:
        frames, cameras = len(scene["frames"]), len(scene["context_cameras"])
        assert frames >= 2 and cameras >= 1
        expected = {"fixed_camera": (frames, height, width), "dynamic_only": (frames, height, width),
                    "static_only": (frames, height, width), "tracks": (frames, height, width),
                    "inputs_vs_gt": (frames, 2 * height, cameras * width),
                    "trajectory": (TRAJECTORY_FRAMES, height, width)}
        for key, shape in expected.items():
            video = read_video(scene["files"][key])
            assert video.shape[:3] == shape, key


def test_tracks_hold_each_dynamic_gaussian_at_each_time_as_decoded_directly(rendered, kubric_root):
    from tokengs.data import build_dataset

    opt, model, _, summary = rendered
    dataset = build_dataset(opt.evolve(evaluating=True, use_input_supervision=False, batch_size=1), "eval")
    dynamic = model.dynamic_gaussian_mask()
    for index, scene in enumerate(summary):
        tracks = np.load(scene["files"]["tracks_npz"])
        frames = scene["frames"]
        count = opt.num_dynamic_gs_tokens * opt.dec_patch_size**2
        assert tracks["means"].shape == (len(frames), count, 3)  # one position per time per dynamic Gaussian
        assert tracks["pixels"].shape == (len(frames), count, 2) and tracks["frames"].tolist() == frames
        assert tracks["motion"].max() > 0  # the random time embedding moves them
        _, meta = dataset.view_choice(index)
        num_frames = meta.grid[1]
        first_camera = scene["context_cameras"][0]
        for t, frame in enumerate(frames):  # decoded again, the whole model at once, for that frame alone
            batch = dataset.load(index, targets=[first_camera * num_frames + frame])
            with torch.no_grad():
                gaussians = Gaussians.unpack(model.forward_gaussians(batch))
            assert np.allclose(tracks["means"][t], gaussians.means[0, dynamic].numpy(), atol=1e-5)
        motion = np.linalg.norm(np.diff(tracks["means"], axis=0), axis=-1).sum(0)
        assert np.allclose(tracks["motion"], motion, atol=1e-5)


def test_render_script_refuses_a_static_model_and_a_missing_root_at_once(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_model(TokenGS(get_preset("tiny")), checkpoint)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_kubric_dyn.py"), "--ckpt", str(checkpoint),
                           "--preset", "tiny", "--kubric_root", str(tmp_path / "nowhere"), "--out_dir",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=ONE_THREAD_ENV)
    assert done.returncode == 2
    first, *rest = done.stderr.strip().splitlines()
    assert first.startswith("error: fix") and "problem(s) before rendering" in first
    assert any("--kubric_root" in line for line in rest) and any("num_dynamic_gs_tokens=0" in line for line in rest)
    assert not (tmp_path / "out").exists()
