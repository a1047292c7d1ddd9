"""scripts/render_trajectory.py and the camera path it follows."""

import math
import subprocess
import sys
from pathlib import Path

import torch

from tokengs.cameras import path_through_cameras, quaternion_to_matrix
from tokengs.data.synthetic import generate
from tokengs.gaussians import load_ply
from tokengs.media import read_video
from tokengs.models import TokenGS, save_model
from tokengs.options import get_preset

ROOT = Path(__file__).resolve().parents[1]


def test_path_passes_through_every_camera_in_order():
    cameras = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    for i, angle in enumerate([0.0, 0.3, 0.8]):
        half = angle / 2
        cameras[i, :3, :3] = quaternion_to_matrix(torch.tensor([math.cos(half), 0, math.sin(half), 0], dtype=torch.float64))
        cameras[i, :3, 3] = torch.tensor([i, 0.0, 0.1 * i * i], dtype=torch.float64)
    path = path_through_cameras(cameras, 9)  # frames 0, 4, 8 fall on the cameras
    assert torch.allclose(path[[0, 4, 8]], cameras, atol=1e-12)
    rotations = path[:, :3, :3]
    assert torch.allclose(rotations @ rotations.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(9, 3, 3),
                          atol=1e-12)  # proper rotations in between
    steps = (path[1:, :3, 3] - path[:-1, :3, 3]).norm(dim=-1)
    assert steps.max() < 2.5 * steps.min()  # no jumps along the way


def test_script_writes_a_video_and_a_ply_per_scene(tmp_path):
    root = tmp_path / "data"
    generate("dl3dv_eval", root, 2, frames=6, height=32, width=48)
    opt = get_preset("tiny_eval")
    checkpoint = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    save_model(TokenGS(opt), checkpoint)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_trajectory.py"), "--ckpt", str(checkpoint),
                           "--preset", "tiny_eval", "--root", str(root), "--out_dir", str(out), "--n_scenes", "2",
                           "--frames", "10", "--fps", "5"], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    videos, plys = sorted(out.glob("trajectory_*.mp4")), sorted(out.glob("gaussians_*.ply"))
    assert len(videos) == len(plys) == 2
    for video, ply in zip(videos, plys):
        assert read_video(video).shape[:3] == (10, 32, 48)
        assert 0 < load_ply(ply).num_gaussians <= opt.num_gaussians


def workspace_of_tiny_model(path: Path) -> Path:
    """A training workspace as tokengs.train leaves it: the tiny preset's config.yaml (the
    training layout, dl3dv) and untrained weights beside it."""
    path.mkdir()
    opt = get_preset("tiny").evolve(workspace=str(path))
    opt.save_yaml(path / "config.yaml")
    torch.manual_seed(0)
    save_model(TokenGS(opt), path / "model.safetensors")
    return path


def render_trajectory(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "render_trajectory.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_workspace_trained_on_the_training_layout_renders_benchmark_layout_scenes(tmp_path):
    root = tmp_path / "dl3dv_eval"
    generate("dl3dv_eval", root, 1, frames=6, height=32, width=48)
    workspace = workspace_of_tiny_model(tmp_path / "workspace")
    out = tmp_path / "out"
    done = render_trajectory("--ckpt", workspace / "model.safetensors", "--workspace", workspace, "--root", root,
                             "--out_dir", out, "--frames", 4)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{root} holds dl3dv_eval scenes: reading it as dl3dv_eval" in done.stdout
    (video,) = out.glob("trajectory_*.mp4")
    assert read_video(video).shape[:3] == (4, 32, 48) and len(list(out.glob("gaussians_*.ply"))) == 1


def test_a_subset_folder_as_root_is_answered_with_the_root_to_pass(tmp_path):
    root = tmp_path / "dl3dv"
    generate("dl3dv", root, 1, frames=4, height=12, width=20)
    workspace = workspace_of_tiny_model(tmp_path / "workspace")
    done = render_trajectory("--ckpt", workspace / "model.safetensors", "--workspace", workspace, "--root",
                             root / "1K", "--out_dir", tmp_path / "out")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no DL3DV scenes under" in done.stderr and f"pass --root {root} " in done.stderr
    assert not (tmp_path / "out").exists()


def test_script_lists_every_start_up_problem_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_trajectory.py"), "--ckpt",
                           str(tmp_path / "missing.safetensors"), "--workspace", str(tmp_path / "no_workspace"),
                           "--root", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr[-2000:]
    first, *rest = done.stderr.strip().splitlines()
    assert first == "error: fix 2 problem(s) before rendering:"
    assert any("--ckpt" in line and "missing.safetensors" in line for line in rest)
    assert any("--workspace" in line and "config.yaml" in line for line in rest)
    assert not (tmp_path / "out").exists()


def test_a_released_checkpoint_needs_no_preset_and_another_is_asked_for_one(tmp_path):
    from tokengs.demo import SHIPPED_CHECKPOINT

    root = tmp_path / "data"
    generate("dl3dv_eval", root, 1, frames=12, height=48, width=80, eval_context=4)
    done = render_trajectory("--ckpt", SHIPPED_CHECKPOINT, "--root", root, "--out_dir", tmp_path / "out",
                             "--frames", "4", "--fps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("trajectory_*.mp4"))) == 1
    renamed = tmp_path / "mine.safetensors"
    renamed.write_bytes(SHIPPED_CHECKPOINT.read_bytes())
    done = render_trajectory("--ckpt", renamed, "--root", root, "--out_dir", tmp_path / "out2")
    assert done.returncode == 2 and done.stderr.startswith("error: fix 1 problem(s)"), done.stderr
    assert f"--preset: name the preset of --ckpt {renamed}" in done.stderr and "demo" in done.stderr
