"""Datasets: readers per layout (the generator's scenes and files built by hand), the registry,
view sampling, camera math, the check CLI, and resilient loading."""

import io
import json
import logging
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokengs import cameras
from tokengs.data import DataLoadError, build_dataset, collate, dataset_root_problems, parse_name
from tokengs.data.check import main as check_main
from tokengs.data.dl3dv import DL3DVReader
from tokengs.data.dl3dv_eval import DL3DVEvalReader, read_points3d_bin
from tokengs.data.kubric import KubricReader
from tokengs.data.provider import sample_dynamic_views, sample_static_views
from tokengs.data.re10k import RE10KReader
from tokengs.data.registry import REGISTRY
from tokengs.data.synthetic import generate
from tokengs.options import get_preset

ROOT = Path(__file__).resolve().parents[1]
HW = (24, 40)
# Enough frames for each layout's minimum context gap, few enough to stay fast.
FRAMES = {"dl3dv": 14, "dl3dv_eval": 6, "re10k": 48, "kubric": 6}


def relative(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """layout -> (root, what the generator made)."""
    made = {}
    for layout in FRAMES:
        root = tmp_path_factory.mktemp(layout)
        made[layout] = (root, generate(layout, root, 3, seed=7, frames=FRAMES[layout], height=HW[0], width=HW[1],
                                       cameras_per_scene=3))
    return made


def tiny(layout: str, root: Path, **changes):
    preset = {"dl3dv": "tiny", "dl3dv_eval": "tiny_eval", "re10k": "tiny", "kubric": "tiny_kubric_dyn"}[layout]
    values = dict(dataset_kwargs={"root_path": str(root)}, batch_size=1, num_workers=0)
    if layout == "re10k":
        values["data_mode"] = (("re10k", 1),)
    values.update(changes)
    return get_preset(preset).evolve(**values)


# ---------------------------------------------------------------------------------------------
# Read back the generator's scenes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", list(FRAMES))
def test_reader_finds_generator_cameras(synthetic, layout):
    root, made = synthetic[layout]
    reader = REGISTRY[layout].reader(root_path=str(root))
    refs = {ref.name: ref for ref in reader.scenes()}
    for scene in made:
        if scene.name not in refs:  # re10k's test split is read by another reader
            assert layout == "re10k"
            continue
        with reader.open(refs[scene.name]) as opened:
            meta = opened.meta
            assert meta.problems() == []
            assert meta.image_hw == HW
            assert relative(meta.c2ws, scene.c2ws) <= 1e-5
            assert relative(meta.intrinsics, scene.intrinsics) <= 1e-5
            views = opened.views([0, meta.num_frames - 1], depth=layout == "kubric")
            assert views.rgbs.shape == (2, 3, *HW) and 0 <= float(views.rgbs.min()) <= float(views.rgbs.max()) <= 1
            if layout == "kubric":
                assert torch.equal(views.depths[:, 0], torch.from_numpy(scene.depths[[0, meta.num_frames - 1]]))
                assert views.masks.shape == (2, 1, *HW)


def test_re10k_test_split_and_evaluation_json(synthetic):
    root, made = synthetic["re10k"]
    reader = RE10KReader(str(root), split="test")
    names = {ref.name for ref in reader.scenes()}
    assert names == set(json.loads((root / "evaluation.json").read_text()))
    test_scene = next(s for s in made if s.name in names)
    with reader.open(next(r for r in reader.scenes() if r.name == test_scene.name)) as opened:
        assert relative(opened.meta.c2ws, test_scene.c2ws) <= 1e-5


@pytest.mark.parametrize("layout", list(FRAMES))
def test_dataset_sample_carries_generator_cameras(synthetic, layout):
    """Through the whole provider: the sample's cameras are the generator's, normalized."""
    root, made = synthetic[layout]
    opt = tiny(layout, root)
    dataset = build_dataset(opt, "eval" if opt.evaluating else "train")
    views = dataset[0].all_views()
    scene = next(s for s in made if s.name == dataset[0].scene_names[0])
    assert views.images.shape[2:] == (3, *opt.img_size) and views.rays.shape[2:] == (6, *opt.img_size)
    if layout == "kubric":
        return  # timesteps do not identify a view of a multi-camera scene; the reader test covers it
    frames = views.timesteps[0].long().numpy()
    c2ws = torch.from_numpy(scene.c2ws[frames])
    expected = cameras.normalize_cameras(c2ws, opt.num_input_views, opt.camera_normalization_method)
    if opt.camera_scale_method == "distance":
        expected = cameras.scale_translations(expected, 1.0 / float(expected[1, :3, 3].norm()))
    got = torch.linalg.inv(views.w2c[0].double())
    if not torch.allclose(got, expected, atol=1e-4):  # the sample may have been reflected
        got = cameras.reflect_c2w(got)
    assert relative(got, expected) <= 1e-5
    intrinsics = cameras.crop_resize_intrinsics(torch.from_numpy(scene.intrinsics[frames]), HW, opt.img_size)
    ours = views.intrinsics[0].double()
    if not torch.allclose(ours, intrinsics, atol=1e-4):
        ours = cameras.reflect_intrinsics(ours, opt.img_size[1])
    assert relative(ours, intrinsics) <= 1e-5


def test_generator_is_deterministic(tmp_path):
    a = generate("dl3dv", tmp_path / "a", 1, seed=3, frames=3, height=12, width=20)
    b = generate("dl3dv", tmp_path / "b", 1, seed=3, frames=3, height=12, width=20)
    assert a[0].name == b[0].name
    assert (tmp_path / "a" / "1K" / f"{a[0].name}.zip").read_bytes() == (tmp_path / "b" / "1K" / f"{b[0].name}.zip").read_bytes()


def file_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["dl3dv_eval", "kubric"])
def test_generator_in_parallel_writes_the_same_scenes(tmp_path, layout):
    size = dict(frames=3, height=12, width=20)
    serial = generate(layout, tmp_path / "serial", 3, seed=4, **size)
    parallel = generate(layout, tmp_path / "parallel", 3, seed=4, workers=2, **size)
    assert [s.name for s in parallel] == [s.name for s in serial]
    assert file_bytes(tmp_path / "parallel") == file_bytes(tmp_path / "serial")


def test_generator_without_its_photographs_says_what_to_install(tmp_path, monkeypatch):
    # the textures must not silently change with what is installed: a seed makes one dataset
    from tokengs.data import synthetic

    monkeypatch.setitem(sys.modules, "skimage.data", None)  # import skimage.data now fails
    synthetic._photographs.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install scikit-image"):
            generate("dl3dv_eval", tmp_path, 1, frames=3, height=12, width=20)
    finally:
        synthetic._photographs.cache_clear()


def test_generator_workers_that_cannot_start_fail_fast(tmp_path):
    # spawned workers re-import the caller's main module; from stdin they die at start-up, which
    # a multiprocessing.Pool answers by starting new ones forever
    script = (f"from tokengs.data.synthetic import generate\n"
              f"generate('dl3dv_eval', {str(tmp_path)!r}, 2, frames=3, height=12, width=20, workers=2)\n")
    result = subprocess.run([sys.executable, "-"], input=script, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "workers=1" in result.stderr and "__main__" in result.stderr


def test_synthetic_cli_writes_a_readable_root(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tokengs.data.synthetic", "--layout", "dl3dv_eval", "--out",
                             str(tmp_path), "--scenes", "1", "--frames", "4", "--height", "12", "--width", "20"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(DL3DVEvalReader(str(tmp_path)).scenes()) == 1 and (tmp_path / "evaluation.json").is_file()


def documented_commands() -> dict:
    """The `python -m tokengs.data.*` commands of data/DATA.md (a command may wrap a line): module -> arguments."""
    text = (ROOT / "data" / "DATA.md").read_text()
    commands = [span.split() for span in re.findall(r"`(python -m tokengs\.data\.[^`]+)`", text)]
    return {command[2]: command[3:] for command in commands}


def flag_value(args: list, flag: str) -> str:
    return args[args.index(flag) + 1]


def test_data_md_commands_run_as_written(tmp_path):
    commands = documented_commands()
    generator, check = commands["tokengs.data.synthetic"], commands["tokengs.data.check"]
    # as written, run from a fresh folder (the paths are relative); small images keep it quick
    made = subprocess.run([sys.executable, "-m", "tokengs.data.synthetic", *generator, "--height", "24", "--width",
                           "40"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    out = tmp_path / flag_value(generator, "--out")
    assert len(DL3DVReader(str(out)).scenes()) == 48  # the count DATA.md states
    # the documented check, pointed at what the generator wrote instead of the real data's root
    check[check.index("--root") + 1] = str(out)
    checked = subprocess.run([sys.executable, "-m", "tokengs.data.check", *check], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    assert "48 scene(s) read, 0 problem(s)" in checked.stdout


# ---------------------------------------------------------------------------------------------
# Files built by hand (another code path than the generator)
# ---------------------------------------------------------------------------------------------

def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# An OpenCV camera-to-world, and the same camera written the way nerfstudio stores it: axes to
# OpenGL (negate columns 1, 2), world rows swapped (0 <-> 1), then world row 2 negated.
C2W = np.array([[0.0, -1.0, 0.0, 0.5], [0.0, 0.0, -1.0, 1.5], [1.0, 0.0, 0.0, -2.0], [0, 0, 0, 1.0]])


def nerfstudio_matrix(c2w: np.ndarray) -> np.ndarray:
    m = c2w.copy()
    m[:3, 1:3] *= -1
    m = m[[1, 0, 2, 3]]
    m[2] *= -1
    return m


def test_dl3dv_hand_built_zip_images_4_and_capture_scale(tmp_path):
    """images_4 fallback; fl_x ... refer to a 2x larger w x h than the stored 10x16 frames."""
    scene = tmp_path / "1K" / "abc.zip"
    scene.parent.mkdir(parents=True)
    frames = [{"file_path": f"images/frame_{i:05d}.png", "transform_matrix": nerfstudio_matrix(C2W).tolist()}
              for i in range(2)]
    transforms = {"w": 32, "h": 20, "fl_x": 30.0, "fl_y": 31.0, "cx": 16.5, "cy": 9.5, "frames": frames}
    pixels = np.random.default_rng(0).integers(0, 255, (10, 16, 3), dtype=np.uint8)
    with zipfile.ZipFile(scene, "w") as archive:
        archive.writestr("abc/transforms.json", json.dumps(transforms))
        for i in range(2):
            archive.writestr(f"abc/images_4/frame_{i:05d}.png", png_bytes(pixels))
    reader = DL3DVReader(str(tmp_path))
    [ref] = reader.scenes()
    with reader.open(ref) as opened:
        assert opened.meta.problems() == []
        np.testing.assert_allclose(opened.meta.c2ws[0], C2W, atol=1e-12)
        np.testing.assert_allclose(opened.meta.intrinsics[0], [15.0, 15.5, 8.25, 4.75])
        rgbs = opened.views([1]).rgbs
    np.testing.assert_array_equal((rgbs[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), pixels)


def points3d_bytes(points) -> bytes:
    """points: [(xyz, [image ids])] in COLMAP's binary layout, packed field by field."""
    data = struct.pack("<Q", len(points))
    for i, (xyz, track) in enumerate(points):
        data += struct.pack("<Q", i + 7) + struct.pack("<ddd", *xyz) + bytes([10, 20, 30]) + struct.pack("<d", 0.5)
        data += struct.pack("<Q", len(track)) + b"".join(struct.pack("<ii", image, 3) for image in track)
    return data


def test_dl3dv_eval_hand_built_zip_and_points_depth(tmp_path):
    """Depth from COLMAP points: applied_transform, the world un-permutation, tracks by colmap_im_id,
    nearest pixel, nearest depth wins."""
    applied = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]]  # nerfstudio's for COLMAP
    identity = np.eye(4)
    frames = [{"file_path": "images/f0.png", "transform_matrix": nerfstudio_matrix(identity).tolist(), "colmap_im_id": 5},
              {"file_path": "images/f1.png", "transform_matrix": nerfstudio_matrix(identity).tolist(), "colmap_im_id": 2}]
    transforms = {"w": 16, "h": 10, "fl_x": 10.0, "fl_y": 10.0, "cx": 8.0, "cy": 5.0, "frames": frames,
                  "applied_transform": applied}
    # COLMAP world = our OpenCV world here; the camera is the identity.
    points = [((0.0, 0.0, 2.0), [5]),      # -> pixel (8, 5), depth 2
              ((0.0, 0.0, 4.0), [5, 2]),   # same pixel, farther: loses in frame 5, the only one in frame 2
              ((0.4, -0.2, 2.0), [5])]     # -> (10, 4)
    path = tmp_path / "s1.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("s1/gaussian_splat/transforms.json", json.dumps(transforms))
        for name in ("f0.png", "f1.png"):
            archive.writestr(f"s1/gaussian_splat/images_4/{name}", png_bytes(np.zeros((10, 16, 3), np.uint8)))
        archive.writestr("s1/gaussian_splat/sparse/0/points3D.bin", points3d_bytes(points))
    parsed = read_points3d_bin(points3d_bytes(points))
    assert parsed.xyz.shape == (3, 3) and parsed.track_image.tolist() == [5, 5, 2, 5]
    reader = DL3DVEvalReader(str(tmp_path))
    with reader.open(reader.scenes()[0]) as opened:
        np.testing.assert_allclose(opened.meta.c2ws[0], identity, atol=1e-12)
        depths = opened.views([0, 1], depth=True).depths[:, 0]
    expected = torch.zeros(2, 10, 16)
    expected[0, 5, 8], expected[0, 4, 10], expected[1, 5, 8] = 2.0, 2.0, 4.0
    assert torch.equal(depths, expected)


def test_re10k_hand_built_chunk(tmp_path):
    (tmp_path / "test").mkdir()
    height, width = 12, 20
    w2c = np.linalg.inv(C2W)[:3].reshape(-1)
    row = [0.8, 1.2, 0.45, 0.55, 0.0, 0.0, *w2c]
    jpeg = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(jpeg, format="JPEG")
    image = torch.tensor(list(jpeg.getvalue()), dtype=torch.uint8)
    scene = {"key": "k1", "url": "", "timestamps": torch.tensor([0, 1]), "cameras": torch.tensor([row, row]),
             "images": [image, image.clone()]}
    torch.save([scene], tmp_path / "test" / "000000.torch")
    (tmp_path / "test" / "index.json").write_text(json.dumps({"k1": "000000.torch"}))
    reader = RE10KReader(str(tmp_path), split="test")
    with reader.open(reader.scenes()[0]) as opened:
        assert relative(opened.meta.c2ws[1], C2W) <= 1e-6
        np.testing.assert_allclose(opened.meta.intrinsics[0], [16.0, 14.4, 9.0, 6.6], rtol=1e-6)
        assert opened.views([0, 1]).rgbs.shape == (2, 3, height, width)


def test_kubric_hand_built_tar(tmp_path):
    """Members named ./x, metadata in OpenGL axes, the release's intrinsics formula, RGBA and float depth."""
    scene = tmp_path / "v1" / "0007"
    scene.mkdir(parents=True)
    # A camera at (1, 2, 3) whose OpenGL rotation is 90 degrees about z: w x y z = (cos 45, 0, 0, sin 45).
    s = np.sqrt(0.5)
    metadata = {"metadata": {"resolution": [8, 8]},
                "camera": {"focal_length": 35.0, "sensor_width": 32.0, "positions": [[1.0, 2.0, 3.0]] * 2,
                           "quaternions": [[s, 0.0, 0.0, s]] * 2}}
    depth = np.linspace(1, 2, 64, dtype=np.float32).reshape(8, 8)
    tiff = io.BytesIO()
    Image.fromarray(depth, mode="F").save(tiff, format="TIFF")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0
    with tarfile.open(scene / "output_000.tar", "w") as archive:
        for name, data in [("./metadata.json", json.dumps(metadata).encode()), ("./rgba_00000.png", png_bytes(rgba)),
                           ("./rgba_00001.png", png_bytes(rgba)), ("./depth_00000.tiff", tiff.getvalue()),
                           ("./depth_00001.tiff", tiff.getvalue())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    reader = KubricReader(str(tmp_path))
    [ref] = reader.scenes()
    assert ref.name == "v1/0007"
    with reader.open(ref) as opened:
        expected = np.array([[0.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 1.0]])
        expected[:3, 1:3] *= -1  # OpenGL -> OpenCV
        np.testing.assert_allclose(opened.meta.c2ws[1], expected, atol=1e-12)
        np.testing.assert_allclose(opened.meta.intrinsics[0], [8.75, 8.75, 4.0, 4.0])
        views = opened.views([1], depth=True)
    np.testing.assert_array_equal(views.depths[0, 0].numpy(), depth)
    assert float(views.masks[0, 0, 0, 0]) == 0.0 and float(views.masks[0, 0, 1, 1]) == 1.0
    assert abs(float(views.rgbs[0, 0, 1, 1]) - 200 / 255) < 1e-6


# ---------------------------------------------------------------------------------------------
# Registry, sampling, camera math
# ---------------------------------------------------------------------------------------------

def test_registry_names_scales_and_kwargs(tmp_path):
    assert parse_name("dl3dv_scaled_0.15")[1] == 0.15 and parse_name("dl3dv_scaled_0.15")[0].name == "dl3dv"
    assert parse_name("dl3dv_eval_scaled_0.15")[0].name == "dl3dv_eval"
    assert parse_name("kubric")[1] == 1.0
    assert REGISTRY["dl3dv"].gap == (10, 40) and REGISTRY["kubric"].gap == (3, 23)
    assert REGISTRY["dl3dv_eval"].gap == (0, 1e6) and REGISTRY["dl3dv"].default_root == "data/dl3dv"
    with pytest.raises(ValueError, match="unknown dataset"):
        parse_name("dl3dvv")
    opt = get_preset("tiny").evolve(dataset_kwargs={"root_path": str(tmp_path / "nowhere"), "colour": "x"})
    assert "colour" in dataset_root_problems(opt)[0]
    opt = get_preset("tiny").evolve(dataset_kwargs={"root_path": str(tmp_path / "nowhere")})
    assert "does not exist" in dataset_root_problems(opt)[0]


def test_static_sampling_respects_gaps():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        choice = sample_static_views(rng, 100, 4, 3, (10, 40))
        context = list(choice.context)
        assert context == sorted(context) and len(set(context)) == 4
        assert 10 <= context[-1] - context[0] <= 40
        assert all(context[0] <= t <= context[-1] for t in choice.targets)
    short = sample_static_views(np.random.default_rng(0), 5, 2, 2, (10, 40))  # shorter than the gap
    assert list(short.context) == [0, 4]


def test_dynamic_sampling_grid_and_interpolated_targets():
    for seed in range(100):
        choice = sample_dynamic_views(np.random.default_rng(seed), 9, 24, 4, 4, (3, 23), True)
        cams = [i // 24 for i in choice.context]
        times = [i % 24 for i in choice.context]
        assert cams[:2] == cams[2:] and len(set(cams[:2])) == 2  # the same cameras at both times
        assert times[0] == times[1] and times[2] == times[3] and 3 <= times[2] - times[0] <= 23
        assert all(times[0] <= i % 24 <= times[2] for i in choice.targets)
    fixed = sample_dynamic_views(np.random.default_rng(1), 9, 24, 4, 8, (3, 23), False)
    assert {i % 24 for i in fixed.targets} <= {i % 24 for i in fixed.context}


def test_training_views_reproducible_per_seed_and_epoch(synthetic):
    root, _ = synthetic["dl3dv"]
    opt = tiny("dl3dv", root, num_views=5, num_input_views=3)
    a, b = build_dataset(opt, "train"), build_dataset(opt, "train")
    for epoch in (0, 3):
        a.set_epoch(epoch), b.set_epoch(epoch)
        for i in range(len(a)):
            sa, sb = a[i].all_views(), b[i].all_views()
            assert torch.equal(sa.timesteps, sb.timesteps) and torch.equal(sa.images, sb.images)
            assert torch.equal(sa.w2c, sb.w2c)
            context = sa.timesteps[0, :3].tolist()
            assert context == sorted(context) and context[-1] - context[0] >= min(10, FRAMES["dl3dv"] - 1)
    a.set_epoch(0)
    first = [a[i].all_views().timesteps for i in range(len(a))]
    changed = False
    for epoch in range(1, 6):
        a.set_epoch(epoch)
        changed |= any(not torch.equal(a[i].all_views().timesteps, first[i]) for i in range(len(a)))
    assert changed


def test_splits_hold_out_last_batch_and_collate(synthetic):
    root, made = synthetic["dl3dv"]
    opt = tiny("dl3dv", root, batch_size=1, data_mode=(("dl3dv_scaled_0.5", 2),))
    train, val = build_dataset(opt, "train"), build_dataset(opt, "val")
    names = sorted(s.name for s in made)
    assert len(train) == 2 * (len(made) - 1) and len(val) == 1
    assert val[0].scene_names == (names[-1],)
    batch = next(iter(DataLoader(train, batch_size=2, collate_fn=collate)))
    assert batch.context.images.shape == (2, opt.num_input_views, 3, *opt.img_size)
    assert batch.target.rays.shape == (2, opt.num_views - opt.num_input_views, 6, *opt.img_size)
    assert len(batch.scene_names) == 2


def test_eval_uses_the_json_views(synthetic):
    root, made = synthetic["dl3dv_eval"]
    opt = tiny("dl3dv_eval", root)
    index = json.loads((root / "evaluation.json").read_text())
    dataset = build_dataset(opt, "eval")
    sample = dataset[0]
    entry = index[sample.scene_names[0]]
    assert sample.context.timesteps[0].long().tolist() == entry["context"]
    assert sample.target.timesteps[0].long().tolist() == entry["target"]
    assert sample.target.num_views == len(entry["target"])
    with pytest.raises(DataLoadError, match="context views"):
        build_dataset(opt.evolve(num_input_views=3), "eval")


def test_crop_offset_rounds_half_to_even():
    # raw width 96, crop 81 -> offset 7.5 -> 8; raw height 60, crop 45 -> 7.5 -> 8; 5 -> 2.5 -> 2
    assert cameras.center_crop_box((54, 96), (32, 48))[:2] == (0, 8)
    assert cameras.center_crop_box((60, 80), (32, 56))[:2] == (8, 0)
    assert cameras.center_crop_box((10, 25), (10, 20))[1] == 2


def test_camera_conventions_round_trip():
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.normal(size=(16, 4)))
    r = cameras.quaternion_to_matrix(q)
    back = cameras.matrix_to_quaternion(r)
    assert torch.allclose(cameras.quaternion_to_matrix(back), r, atol=1e-12)
    c2w = torch.eye(4, dtype=torch.float64).repeat(16, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = r, torch.from_numpy(rng.normal(size=(16, 3)))
    assert torch.allclose(cameras.nerfstudio_to_opencv(cameras.opencv_to_nerfstudio(c2w)), c2w, atol=1e-12)
    assert torch.allclose(cameras.reflect_c2w(cameras.reflect_c2w(c2w)), c2w)
    w2c = torch.linalg.inv(c2w)[:, :3]
    assert torch.allclose(cameras.w2c_to_c2w(w2c), c2w, atol=1e-10)
    # a reflected camera sees the mirrored point at the mirrored pixel
    k = torch.tensor([[20.0, 21.0, 13.0, 9.0]], dtype=torch.float64)
    point = torch.tensor([0.3, -0.2, 2.5], dtype=torch.float64)

    def project(c2w_one, k_one, p):
        cam = torch.linalg.inv(c2w_one)[:3, :3] @ p + torch.linalg.inv(c2w_one)[:3, 3]
        return torch.stack([k_one[0] * cam[0] / cam[2] + k_one[2], k_one[1] * cam[1] / cam[2] + k_one[3]])

    c = c2w[0].clone()
    c[:3, 3] = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    c[:3, :3] = torch.eye(3, dtype=torch.float64)
    uv = project(c, k[0], point)
    uv_reflected = project(cameras.reflect_c2w(c), cameras.reflect_intrinsics(k, 30)[0], point * torch.tensor([-1.0, 1, 1]))
    assert torch.allclose(uv_reflected, torch.stack([30 - uv[0], uv[1]]))


def test_rays_and_time_embedding():
    c2w = torch.eye(4)[None]
    k = torch.tensor([[10.0, 10.0, 2.0, 1.0]])
    origins, directions = cameras.pixel_rays(c2w, k, 2, 4)
    assert torch.allclose(directions.norm(dim=1), torch.ones(1, 2, 4))
    expected = torch.tensor([1.5 - 2.0, 0.5 - 1.0, 10.0]) / torch.tensor([1.5 - 2.0, 0.5 - 1.0, 10.0]).norm()
    assert torch.allclose(directions[0, :, 0, 1], expected)
    p = cameras.plucker(origins + torch.tensor([1.0, 0, 0])[None, :, None, None], directions)
    assert torch.allclose(p[:, :3], torch.linalg.cross(torch.tensor([1.0, 0, 0])[None, :, None, None].expand_as(directions),
                                                      directions, dim=1))
    emb = cameras.time_embedding(torch.tensor([2.0, 4.0, 3.0]), 4)
    t = torch.tensor([0.0, 1.0, 0.5])
    assert torch.allclose(emb, torch.stack([torch.cos(t), torch.cos(t / 100), torch.sin(t), torch.sin(t / 100)], -1))
    # scenes of a batch: each rescaled by its own span; one with a single time is all at 0
    batched = cameras.time_embedding(torch.tensor([[2.0, 4.0, 3.0], [5.0, 5.0, 5.0]]), 4)
    assert torch.equal(batched[0], emb) and torch.equal(batched[1], cameras.time_embedding(torch.zeros(3), 4))


def test_pointmap_scale_matches_an_independent_computation(synthetic):
    """The pointmap scale of Kubric depths against a plain per-pixel loop in world coordinates."""
    from tokengs.data.provider import preprocess_views

    root, made = synthetic["kubric"]
    scene = made[0]
    frames = FRAMES["kubric"]
    picks = [0, frames + 2]  # camera 0 frame 0, camera 1 frame 2
    depths = scene.depths[picks]
    c2ws, ks = scene.c2ws[picks], scene.intrinsics[picks]
    first_inv = np.linalg.inv(c2ws[0])
    distances = []
    for depth, c2w, k in zip(depths, c2ws, ks):
        normalized = first_inv @ c2w
        for v in range(depth.shape[0]):
            for u in range(depth.shape[1]):
                z = float(depth[v, u])
                if z > 1e-8:
                    camera = np.array([(u - k[2]) / k[0] * z, (v - k[3]) / k[1] * z, z, 1.0])
                    distances.append(np.linalg.norm((normalized @ camera)[:3]))
    expected = 0.7 / np.mean(distances)
    factor = cameras.scene_scale_factor("pointmap", cameras.normalize_cameras(torch.from_numpy(c2ws), 2, "first_cam"),
                                        2, 0.7, torch.from_numpy(depths)[:, None], torch.from_numpy(ks))
    assert abs(factor - expected) / expected < 1e-6
    lo, hi = np.quantile(distances, [0.1, 0.9])
    kept = [d for d in distances if lo <= d <= hi]
    trimmed = cameras.scene_scale_factor("pointmap", cameras.normalize_cameras(torch.from_numpy(c2ws), 2, "first_cam"),
                                         2, 0.7, torch.from_numpy(depths)[:, None], torch.from_numpy(ks), (0.1, 0.9))
    assert abs(trimmed - 0.7 / np.mean(kept)) / trimmed < 1e-5
    # and through preprocess_views: the second context camera's translation is scaled by it
    opt = get_preset("tiny_kubric_dyn").evolve(camera_normalization_method="first_cam")
    views = preprocess_views(opt, torch.rand(4, 3, *HW), None, torch.from_numpy(scene.depths[picks + picks])[:, None],
                             torch.from_numpy(c2ws[[0, 1, 0, 1]]).float(), torch.from_numpy(ks[[0, 1, 0, 1]]).float(),
                             torch.arange(4.0), 0.7)
    translation = (first_inv @ c2ws[1])[:3, 3] * expected
    assert relative(views.c2w[0, 1, :3, 3], translation) < 1e-5


# ---------------------------------------------------------------------------------------------
# The check CLI
# ---------------------------------------------------------------------------------------------

def test_check_cli_clean_root(synthetic, tmp_path):
    root, made = synthetic["dl3dv"]
    report_path = tmp_path / "report.json"
    assert check_main(["dl3dv_scaled_0.15", "--root", str(root), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["problems"] == [] and len(report["scenes"]) == len(made)
    record = next(r for r in report["scenes"] if r["name"] == made[0].name)
    assert record["frames"] == FRAMES["dl3dv"] and record["image_hw"] == list(HW)
    assert relative(record["c2w"], made[0].c2ws[0]) <= 1e-5
    assert relative(record["intrinsics"], made[0].intrinsics[0]) <= 1e-5


def test_check_cli_flags_truncated_archive_missing_frame_and_nan_pose(synthetic, tmp_path):
    source, made = synthetic["dl3dv"]
    root = tmp_path / "dl3dv"
    (root / "1K").mkdir(parents=True)
    zips = sorted((source / "1K").glob("*.zip"))
    truncated, missing, nan_pose = (root / "1K" / z.name for z in zips)
    truncated.write_bytes(zips[0].read_bytes()[: zips[0].stat().st_size // 2])
    with zipfile.ZipFile(zips[1]) as src, zipfile.ZipFile(missing, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("frame_00003.png"):
                dst.writestr(item, src.read(item))
    with zipfile.ZipFile(zips[2]) as src, zipfile.ZipFile(nan_pose, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("transforms.json"):
                transforms = json.loads(data)
                transforms["frames"][4]["transform_matrix"][0][3] = float("nan")
                data = json.dumps(transforms)
            dst.writestr(item, data)
    report_path = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "tokengs.data.check", "dl3dv", "--root", str(root), "--json",
                             str(report_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    problems = json.loads(report_path.read_text())["problems"]
    by_path = {}
    for problem in problems:
        by_path.setdefault(problem["path"], []).append(problem["problem"])
    assert any("unreadable zip" in p for p in by_path[str(truncated)])
    assert any("missing frame" in p and "frame_00003.png" in p for p in by_path[str(missing)])
    assert any("non-finite pose" in p and "frame_00005.png" in p for p in by_path[str(nan_pose)])
    assert "PROBLEM" in result.stdout


def test_check_cli_flags_kubric_size_mismatch_and_short_scene(tmp_path):
    generate("kubric", tmp_path, 1, seed=1, frames=2, height=HW[0], width=HW[1], cameras_per_scene=1)
    tar_path = tmp_path / "v0" / "00000" / "output_000.tar"
    with tarfile.open(tar_path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(tar_path, "w") as archive:
        for member, data in members:
            if member.name.endswith("metadata.json"):
                metadata = json.loads(data)
                metadata["metadata"]["resolution"] = [HW[0] * 2, HW[1]]
                data = json.dumps(metadata).encode()
                member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    report_path = tmp_path / "r.json"
    assert check_main(["kubric", "--root", str(tmp_path), "--json", str(report_path)]) == 1
    problems = " | ".join(p["problem"] for p in json.loads(report_path.read_text())["problems"])
    assert "aspect ratio" in problems and "fewer than the 4" in problems


def test_check_command_mistakes_exit_2_listing_every_one_before_reading(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        check_main(["dl3dv", "--root", str(tmp_path / "absent"), "--preset", "dmeo"])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: fix 2 problem(s) before checking:"
    assert "unknown preset 'dmeo' (did you mean demo?)" in lines[1] and f"--root {tmp_path / 'absent'}" in lines[2]
    with pytest.raises(SystemExit) as stopped:
        check_main(["dl3dv", "--rot", str(tmp_path)])
    assert stopped.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("error: the following arguments are required: --root") and "data.check --help" in first


# ---------------------------------------------------------------------------------------------
# Resilient loading
# ---------------------------------------------------------------------------------------------

def test_failure_limit_stops_a_root_of_broken_scenes(tmp_path, caplog):
    (tmp_path / "1K").mkdir()
    for i in range(4):
        (tmp_path / "1K" / f"bad{i}.zip").write_bytes(b"not a zip at all")
    opt = get_preset("tiny").evolve(dataset_kwargs={"root_path": str(tmp_path)}, batch_size=1,
                                    max_consecutive_load_failures=12)
    dataset = build_dataset(opt, "train")
    with caplog.at_level(logging.WARNING, logger="tokengs.data"), \
            pytest.raises(DataLoadError, match=r"12 loads in a row failed \(3 distinct scene\(s\) failed so far; "
                                             r"max_consecutive_load_failures=12.*bad\d\.zip"):
        dataset[0]
    assert dataset.load_failures == 12
    logged = [r.getMessage() for r in caplog.records if "skipping scene" in r.getMessage()]
    assert len(logged) == 3 and all("unreadable zip" in m for m in logged)  # once per path


def test_broken_scene_is_replaced_in_training_and_fatal_in_evaluation(synthetic, tmp_path):
    source, _ = synthetic["dl3dv"]
    (tmp_path / "1K").mkdir()
    zips = sorted((source / "1K").glob("*.zip"))
    for z in zips:
        (tmp_path / "1K" / z.name).write_bytes(z.read_bytes())
    broken = tmp_path / "1K" / zips[0].name
    broken.write_bytes(b"PK\x03\x04 broken")
    opt = get_preset("tiny").evolve(dataset_kwargs={"root_path": str(tmp_path)}, batch_size=1)
    dataset = build_dataset(opt, "train")
    samples = [dataset[i] for i in range(len(dataset))]
    assert dataset.load_failures >= 1 and dataset.consecutive_failures == 0
    assert all(s.scene_names[0] != broken.stem for s in samples)
    eval_opt = get_preset("tiny_eval").evolve(data_mode=(("dl3dv", 1),), dataset_kwargs={"root_path": str(tmp_path)})
    with pytest.raises(DataLoadError, match=str(broken.name)):
        build_dataset(eval_opt, "eval")[0]


def test_evaluation_json_null_entries_are_skipped(synthetic, tmp_path):
    root, _ = synthetic["dl3dv_eval"]
    index = json.loads((root / "evaluation.json").read_text())
    first, *rest = list(index)
    index[first] = None  # pixelSplat's indices mark unusable scenes with null
    path = tmp_path / "index.json"
    path.write_text(json.dumps(index))
    opt = tiny("dl3dv_eval", root, dataset_kwargs={"root_path": str(root), "evaluation_json": str(path)})
    dataset = build_dataset(opt, "eval")
    assert len(rest) == 2 and [dataset[i].scene_names[0] for i in range(len(dataset))] == rest


def test_orbit_path_circles_the_mean_camera_in_its_image_plane():
    from tokengs.cameras import mean_camera, orbit_path

    c2ws = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    c2ws[1, 0, 3], c2ws[2, 1, 3] = 1.0, 1.0  # cameras at (0,0,0), (1,0,0), (0,1,0), all looking down +z
    path = orbit_path(c2ws, 12, radius=0.5)
    center = mean_camera(c2ws)
    offsets = path[:, :3, 3] - center[:3, 3]
    assert torch.allclose(offsets.norm(dim=-1), torch.full((12,), 0.5, dtype=torch.float64))
    assert torch.allclose(offsets @ center[:3, 2], torch.zeros(12, dtype=torch.float64), atol=1e-12)  # in-plane
    assert torch.allclose(path[:, :3, :3], center[:3, :3].expand(12, 3, 3))  # orientation kept
    assert torch.allclose(offsets.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)  # a full circle
    default = orbit_path(c2ws, 4)  # half the largest distance of a camera from the mean
    spread = (c2ws[:, :3, 3] - center[:3, 3]).norm(dim=-1).max()
    assert torch.allclose((default[:, :3, 3] - center[:3, 3]).norm(dim=-1), (spread / 2).expand(4))


def test_input_supervision_makes_every_view_a_training_target(synthetic):
    """use_input_supervision: the training loss renders every view, the context first (so a sample
    with no view beyond the context still has targets); without it, the targets alone."""
    from tokengs.train import supervised_views

    root, _ = synthetic["dl3dv"]
    for num_views in (2, 4):
        opt = tiny("dl3dv", root, num_views=num_views, num_input_views=2, use_input_supervision=True)
        batch = build_dataset(opt, "train")[0]
        supervised, every_view = supervised_views(opt, batch), batch.all_views()
        assert supervised.num_views == num_views
        assert torch.equal(supervised.images, every_view.images) and torch.equal(supervised.w2c, every_view.w2c)
        assert torch.equal(supervised.intrinsics, every_view.intrinsics) and supervised.masks.shape[1] == num_views
    opt = tiny("dl3dv", root, num_views=4, num_input_views=2)
    batch = build_dataset(opt, "train")[0]
    assert supervised_views(opt, batch) is batch.target


def test_input_supervision_loss_counts_the_context_views(synthetic):
    """The training loss with input supervision is the loss over context and target views together:
    recomputed from the two renders separately (PSNR from the pooled MSE)."""
    from tokengs.losses import LossComputer
    from tokengs.metrics import psnr
    from tokengs.models import TokenGS
    from tokengs.rendering import render_chunked
    from tokengs.train import supervised_views

    root, _ = synthetic["dl3dv"]
    opt = tiny("dl3dv", root, num_views=3, num_input_views=2, use_input_supervision=True, lambda_ssim=0.0,
               lambda_visibility=0.0, random_reflect=False)
    torch.manual_seed(0)
    model = TokenGS(opt).eval()
    batch = build_dataset(opt, "train")[0]
    every_view = batch.all_views()
    with torch.no_grad():
        packed = model(batch)
        out = LossComputer(opt).evaluate(packed, supervised_views(opt, batch))
        context, target = render_chunked(opt, packed, batch.context), render_chunked(opt, packed, batch.target)
    images = torch.cat([context.images, target.images], dim=1)
    assert images.shape[1] == 3
    mse = (images - every_view.images).square().mean()
    assert float(out.loss) == pytest.approx(float(mse), rel=1e-5)
    assert float(out.psnr[0]) == pytest.approx(float(psnr(images, every_view.images)[0]), rel=1e-5)


def test_release_adapter_round_trips_a_batch(synthetic):
    """to_release_dict then from_release_dict gives the batch back (the context images through the
    normalized RGB of `input`, up to rounding), and the model sees the same views in both forms;
    without `timesteps` the times come back from the time channels and embed to the same ones."""
    from tokengs.data.release_batch import from_release_dict, to_release_dict
    from tokengs.models.encoder_input import view_time_embeddings

    root, _ = synthetic["kubric"]
    opt = tiny("kubric", root)  # time embedding on: the time channels are in `input`
    batch = build_dataset(opt, "train")[0]
    release = to_release_dict(batch, opt)
    assert release["input"].shape[2] == 3 + opt.time_embedding_dim + 6
    back = from_release_dict(release)
    assert back.scene_names == batch.scene_names
    for ours, theirs in ((batch.context, back.context), (batch.target, back.target)):
        for name in ("images", "masks", "w2c", "intrinsics", "timesteps", "rays"):
            assert torch.allclose(getattr(ours, name), getattr(theirs, name), atol=1e-5), name
        assert torch.equal(ours.has_mask, theirs.has_mask)
    without_times = from_release_dict({k: v for k, v in release.items() if k != "timesteps"})
    assert torch.allclose(view_time_embeddings(without_times, opt.time_embedding_dim),
                          view_time_embeddings(batch, opt.time_embedding_dim), atol=1e-6)


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3), ("RGBA", 4), ("I;16", 1)])
def test_every_reader_decodes_a_frame_to_three_channels_of_its_stored_values(mode, channels):
    """One decoder for every reader's frames: grey repeated into RGB, alpha dropped, 16-bit kept
    (RealEstate10K's reader once kept a grey JPEG's single channel)."""
    from tokengs.data.scene import decode_rgb, stack_views

    rng = np.random.default_rng(0)
    high = 65535 if mode == "I;16" else 255
    values = rng.integers(0, high + 1, size=(5, 7, channels)).astype(np.uint16 if mode == "I;16" else np.uint8)
    buffer = io.BytesIO()
    image = Image.fromarray(values[:, :, 0] if channels == 1 else values)
    assert image.mode == mode
    image.save(buffer, format="PNG")
    rgb = decode_rgb(buffer.getvalue(), "frame.png")
    assert rgb.shape == (5, 7, 3) and rgb.dtype == values.dtype
    expected = np.repeat(values, 3, 2) if channels == 1 else values[:, :, :3]
    np.testing.assert_array_equal(rgb, expected)
    stacked = stack_views([rgb], ["frame.png"], (5, 7))
    torch.testing.assert_close(stacked[0], torch.from_numpy(expected.astype(np.float64) / high).float().permute(2, 0, 1))
