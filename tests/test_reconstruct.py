"""Your own captures (tokengs.data.captures, tokengs.reconstruct, `tokengs.data.check` of captures).

One synthetic room is written in each of the four formats by writers independent of the readers
(pycolmap writes the COLMAP model; the JSON files are built here by hand; the DL3DV zip is the
generator's own), read back and reconstructed with the shipped demo checkpoint.
"""

import json
import math
import posixpath
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ONE_THREAD_ENV

from tokengs.cameras import opencv_to_nerfstudio, opengl_to_opencv
from tokengs.data.captures import open_capture
from tokengs.data.check import main as check_main
from tokengs.data.synthetic import generate
from tokengs.reconstruct import main as reconstruct_main
from tokengs.reconstruct import spread_frames

pycolmap = pytest.importorskip("pycolmap", reason='the COLMAP reader needs pycolmap: pip install -e ".[captures]"')

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo.safetensors"
FRAMES, HW = 8, (64, 96)


# ---- independent writers of the four formats ------------------------------------------------

def photos(zip_path: Path) -> list:
    """(file name, PNG bytes) of the generator's frames, in frame order."""
    with zipfile.ZipFile(zip_path) as archive:
        return [(Path(m).name, archive.read(m)) for m in sorted(n for n in archive.namelist() if n.endswith(".png"))]


def write_images(root: Path, pictures: list) -> None:
    (root / "images").mkdir(parents=True)
    for name, data in pictures:
        (root / "images" / name).write_bytes(data)


def write_colmap(root: Path, c2ws, intrinsics, pictures, hw, text=False, model="PINHOLE", params=None) -> Path:
    """A COLMAP capture written by pycolmap: sparse/0 beside images/, image ids in another order than the names."""
    write_images(root, pictures)
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
        camera_id=1, model=model, width=hw[1], height=hw[0],
        params=list(intrinsics[0]) if params is None else list(params)))
    for (name, _), c2w, image_id in zip(pictures, c2ws, np.random.default_rng(0).permutation(len(pictures)) + 1):
        reconstruction.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=1, image_id=int(image_id)),
                                                    pycolmap.Rigid3d(np.linalg.inv(c2w)[:3]))
    sparse = root / "sparse" / "0"
    sparse.mkdir(parents=True)
    (reconstruction.write_text if text else reconstruction.write_binary)(str(sparse))
    return root


def opengl(c2w: np.ndarray) -> list:
    """An OpenCV camera-to-world as transforms.json stores it: camera y and z axes negated."""
    matrix = np.array(c2w, dtype=np.float64)
    matrix[:3, 1:3] *= -1
    return matrix.tolist()


def write_nerfstudio(root: Path, c2ws, intrinsics, pictures, hw) -> Path:
    """nerfstudio: fl_x fl_y cx cy w h, the frames listed backwards (the reader sorts them by name)."""
    write_images(root, pictures)
    fx, fy, cx, cy = intrinsics[0]
    frames = [{"file_path": f"images/{name}", "transform_matrix": opengl(c2w)}
              for (name, _), c2w in zip(pictures, c2ws)]
    data = {"camera_model": "OPENCV", "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": hw[1], "h": hw[0],
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames[::-1]}
    (root / "transforms.json").write_text(json.dumps(data))
    return root / "transforms.json"


def write_instant_ngp(root: Path, c2ws, intrinsics, pictures, hw) -> Path:
    """instant-ngp: camera_angle_x / camera_angle_y, file paths without their suffix."""
    write_images(root, pictures)
    fx, fy, cx, cy = intrinsics[0]
    frames = [{"file_path": f"./images/{Path(name).stem}", "transform_matrix": opengl(c2w)}
              for (name, _), c2w in zip(pictures, c2ws)]
    data = {"camera_angle_x": 2 * math.atan(hw[1] / (2 * fx)), "camera_angle_y": 2 * math.atan(hw[0] / (2 * fy)),
            "cx": cx, "cy": cy, "w": hw[1], "h": hw[0], "aabb_scale": 16, "frames": frames}
    (root / "transforms.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """One synthetic room (8 frames, 64x96) in every format: (the generated scene, {format: path})."""
    base = tmp_path_factory.mktemp("captures")
    scene = generate("dl3dv", base / "dl3dv", 1, seed=3, frames=FRAMES, height=HW[0], width=HW[1])[0]
    pictures = photos(scene.path)
    args = (scene.c2ws, scene.intrinsics, pictures, HW)
    paths = {"dl3dv": scene.path, "colmap": write_colmap(base / "colmap", *args),
             "colmap_text": write_colmap(base / "colmap_text", *args, text=True) / "sparse" / "0",
             "nerfstudio": write_nerfstudio(base / "nerfstudio", *args),
             "instant_ngp": write_instant_ngp(base / "instant_ngp", *args),
             "dl3dv_folder": unzipped_with_images_4(scene.path, base / "dl3dv_folder")}
    # an unzipped DL3DV benchmark scene: <hash>/gaussian_splat/ holds the capture
    paths["dl3dv_benchmark_folder"] = base / "benchmark" / scene.path.stem
    shutil.copytree(paths["dl3dv_folder"], paths["dl3dv_benchmark_folder"] / "gaussian_splat")
    return scene, paths


def unzipped_with_images_4(zip_path: Path, root: Path) -> Path:
    """A DL3DV scene unzipped, its photos in images_4/ while transforms.json lists images/ (as DL3DV
    ships the downscaled copy)."""
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(root)
    [scene] = [p for p in root.iterdir() if p.is_dir()]
    (scene / "images").rename(scene / "images_4")
    return scene


# the format each capture is read as: an unzipped DL3DV scene is a nerfstudio capture
READ_AS = {"colmap_text": "colmap", "dl3dv_folder": "nerfstudio", "dl3dv_benchmark_folder": "nerfstudio"}


def in_world_of(fmt: str, c2ws: np.ndarray) -> np.ndarray:
    """The generator's cameras in the world frame a capture keeps: its own file's. The DL3DV zip
    reader undoes DL3DV's permuted world, as training does; read as a nerfstudio capture, the
    unzipped scene keeps it (a fixed rotation of the world, which camera normalization removes)."""
    if fmt not in ("dl3dv_folder", "dl3dv_benchmark_folder"):
        return c2ws
    return opengl_to_opencv(opencv_to_nerfstudio(torch.from_numpy(c2ws))).numpy()


def reconstruct(scene: Path, out: Path, *flags: str) -> None:
    reconstruct_main(["--scene", str(scene), "--out", str(out), "--ckpt", str(DEMO), "--video_frames", "0", *flags])


def read_ply(path: Path) -> np.ndarray:
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    return np.stack([np.asarray(vertex[name]) for name in vertex.data.dtype.names], 1)


# ---- the tests ------------------------------------------------------------------------------

def test_four_formats_read_back_the_generators_cameras_and_give_identical_gaussians(room, tmp_path, capsys):
    scene, paths = room
    for fmt, path in paths.items():
        with open_capture(path) as capture:
            meta = capture.meta
            assert meta.format == READ_AS.get(fmt, fmt) and meta.problems() == [], fmt
            assert meta.name == scene.path.stem or fmt not in ("dl3dv", "dl3dv_benchmark_folder"), meta.name
            assert meta.num_frames == FRAMES and tuple(meta.image_hw) == HW, fmt
            assert np.abs(meta.c2ws - in_world_of(fmt, scene.c2ws)).max() < 1e-6, fmt
            assert np.abs(meta.intrinsics - scene.intrinsics).max() < 1e-6, fmt
    for fmt, path in paths.items():
        reconstruct(path, tmp_path / fmt)
    summary = capsys.readouterr().out
    assert summary.count("look at it: python -m tokengs.view") == len(paths)
    reference = read_ply(tmp_path / "dl3dv" / "gaussians.ply")
    for fmt in paths:
        assert np.abs(read_ply(tmp_path / fmt / "gaussians.ply") - reference).max() <= 1e-6, fmt

    out = tmp_path / "colmap"
    metrics = (out / "metrics.txt").read_text().splitlines()
    assert metrics[1] == "# context frames: 0 2 4 7"  # the demo preset's 4 views, spread along the walk
    rows = [line.split() for line in metrics if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 3, 5, 6]  # every other frame is a target, scored
    mean_psnr = float(next(line for line in metrics if line.startswith("psnr")).split()[1])
    assert mean_psnr == pytest.approx(np.mean([float(r[1]) for r in rows]), abs=1e-3) and mean_psnr > 15
    assert sorted(p.name for p in (out / "renders").iterdir()) == \
        ["001_frame_00002.png", "003_frame_00004.png", "005_frame_00006.png", "006_frame_00007.png"]
    render = cv2.imread(str(out / "renders" / "001_frame_00002.png"))
    assert render.shape[1] > 2 * render.shape[0]  # the render beside the photo

    from tokengs.view import find_scenes, load_scene  # what `python -m tokengs.view OUT` opens
    [source] = find_scenes(out)
    loaded = load_scene(source)
    assert source.ply.name == "gaussians.ply" and len(loaded.cameras) == 4 and not loaded.notes
    assert all(camera.image.is_file() for camera in loaded.cameras)


def test_data_check_reports_captures_in_the_schema_of_the_other_layouts(room, tmp_path, capsys):
    scene, paths = room
    for fmt in ("colmap", "nerfstudio", "instant_ngp"):
        report_path = tmp_path / f"{fmt}.json"
        assert check_main([fmt, "--root", str(paths[fmt]), "--json", str(report_path), "--preset", "demo"]) == 0
        report = json.loads(report_path.read_text())
        assert set(report) == {"dataset", "root", "scenes", "problems"} and report["problems"] == []
        [record] = report["scenes"]
        assert set(record) == {"name", "path", "frames", "image_hw", "c2w", "intrinsics"}
        assert record["frames"] == FRAMES and record["image_hw"] == list(HW)
        assert np.allclose(record["c2w"], scene.c2ws[0], atol=1e-6)
        assert np.allclose(record["intrinsics"], scene.intrinsics[0], atol=1e-6)
    assert check_main(["colmap", "--root", str(paths["nerfstudio"].parent)]) == 1
    assert "no COLMAP model here" in capsys.readouterr().out


def test_a_distorted_colmap_scene_is_undistorted_so_straight_lines_stay_straight(tmp_path, capsys):
    height, width, focal = 96, 128, 70.0
    coefficients = [-0.35, 0.12, 0.002, -0.001]  # OpenCV's k1 k2 p1 p2: strong barrel distortion
    a, b, c = 0.3, 1.0, -0.35  # a straight line a x + b y + c = 0 in normalized camera coordinates

    def line_picture(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Black on white, about 2 px wide: 0 within a pixel of the line, 1 beyond two."""
        pixels = np.abs(a * x + b * y + c) / math.hypot(a, b) * focal
        return np.round(np.clip(pixels - 1.0, 0, 1) * 255).astype(np.uint8)

    # the distorted photo: each pixel center (u + 0.5, v + 0.5) undistorted by OpenCV's iterative
    # inverse, then coloured by the ideal line there
    v, u = np.mgrid[0:height, 0:width] + 0.5
    normalized = np.stack([(u - width / 2) / focal, (v - height / 2) / focal], -1).reshape(-1, 1, 2)
    ideal = cv2.undistortPoints(normalized, np.eye(3), np.array(coefficients)).reshape(height, width, 2)
    photo = np.repeat(line_picture(ideal[..., 0], ideal[..., 1])[..., None], 3, 2)
    c2ws = np.tile(np.eye(4), (3, 1, 1))
    c2ws[:, 0, 3] = [0.0, 0.1, 0.2]
    pictures = [(f"frame_{i}.png", cv2.imencode(".png", photo)[1].tobytes()) for i in range(3)]
    root = write_colmap(tmp_path / "distorted", c2ws, None, pictures, (height, width), model="OPENCV",
                        params=[focal, focal, width / 2, height / 2, *coefficients])

    def line_error(image: np.ndarray, intrinsics) -> tuple:
        """(largest distance in px of the line's points from their straight-line fit, from the true
        line through the intrinsics); the points: per column, the darkness-weighted mean row."""
        dark = 1.0 - image[..., 0] / 255.0
        weight = dark.sum(0)
        columns = np.flatnonzero(weight > 0.5) + 0.5
        rows = (dark * (np.arange(image.shape[0]) + 0.5)[:, None]).sum(0)[weight > 0.5] / weight[weight > 0.5]
        fit = np.polyval(np.polyfit(columns, rows, 1), columns)
        fx, fy, cx, cy = intrinsics
        truth = np.abs(a * (columns - cx) / fx + b * (rows - cy) / fy + c) / math.hypot(a, b) * fx
        return np.abs(rows - fit).max(), truth.max()

    bent, _ = line_error(photo, [focal, focal, width / 2, height / 2])
    with open_capture(root) as capture:
        assert capture.meta.problems() == []
        straight, off_truth = line_error(capture.image(0), capture.meta.intrinsics[0])
    assert bent > 3.0 and straight < 0.25 and off_truth < 0.25
    reconstruct(root, tmp_path / "out", "--context", "2")
    assert (tmp_path / "out" / "gaussians.ply").is_file() and "1: mean PSNR" in capsys.readouterr().out


def test_bad_input_is_one_message_naming_each_file_exit_2_nothing_written(room, tmp_path, capsys):
    scene, _ = room
    pictures = photos(scene.path)
    # COLMAP: a frame absent, one truncated, one photo no camera poses, a lens OpenCV cannot undistort
    colmap = write_colmap(tmp_path / "colmap", scene.c2ws, None, pictures, HW, model="FOV",
                          params=[50.0, 50.0, 48.0, 32.0, 0.1])
    (colmap / "images" / "frame_00003.png").unlink()
    (colmap / "images" / "frame_00004.png").write_bytes(pictures[3][1][:100])
    (colmap / "images" / "stray.png").write_bytes(pictures[0][1])
    # nerfstudio: a NaN pose, a scaled (non-rigid) one, and 8 frames for 9 context views
    c2ws = scene.c2ws.copy()
    c2ws[0, 0, 3] = np.nan
    c2ws[1, :3, :3] *= 2
    nerfstudio = write_nerfstudio(tmp_path / "nerfstudio", c2ws, scene.intrinsics, pictures, HW)
    # instant-ngp without any focal length
    no_focal = write_instant_ngp(tmp_path / "ngp", scene.c2ws, scene.intrinsics, pictures, HW) / "transforms.json"
    data = json.loads(no_focal.read_text())
    del data["camera_angle_x"]
    no_focal.write_text(json.dumps(data))

    # DL3DV: a photo in the zip's image folder that its transforms.json does not list
    stray_zip = tmp_path / "dl3dv_stray" / scene.path.name
    stray_zip.parent.mkdir()
    shutil.copy(scene.path, stray_zip)
    with zipfile.ZipFile(stray_zip, "a") as archive:
        image_dir = posixpath.dirname(next(name for name in archive.namelist() if name.endswith(".png")))
        archive.writestr(f"{image_dir}/stray.png", pictures[0][1])

    # Windows separators in file_path: no image found, the message shows the first path it tried
    backslashed = write_nerfstudio(tmp_path / "backslash", scene.c2ws, scene.intrinsics, pictures, HW)
    data = json.loads(backslashed.read_text())
    for frame in data["frames"]:
        frame["file_path"] = frame["file_path"].replace("/", "\\")
    backslashed.write_text(json.dumps(data))
    tried = backslashed.parent / data["frames"][0]["file_path"]

    images = nerfstudio.parent / "images"
    cases = {
        backslashed: ([], [f"none of its {len(pictures)} images is there; the first it looked for: {tried}"]),
        stray_zip: ([], [f"images in {stray_zip}:{image_dir}/ but {len(pictures)} cameras in {stray_zip}:transforms.json "
                         "(1 unposed: stray.png); pose them or move them out"]),
        colmap: ([], ["missing frame " + str(colmap / "images" / "frame_00003.png"),
                      f"{colmap / 'images' / 'frame_00004.png'}: cannot decode the image",
                      "1 unposed: stray.png", "camera model FOV cannot be undistorted"]),
        nerfstudio: (["--context", "9"], [f"non-finite pose of frame {images / 'frame_00001.png'}",
                                          f"degenerate pose of frame {images / 'frame_00002.png'}",
                                          "8 frame(s), fewer than the 9 context views"]),
        no_focal.parent: ([], [f"{no_focal}: frame 0: no focal length; give fl_x (nerfstudio) or camera_angle_x"]),
        scene.path: (["--preset", "tiny", "--context_frames", "0", "9"],
                     ["--ckpt: checkpoint", "does not fit this model", "preset 'demo'", "--context_frames 9: "]),
    }
    for path, (flags, expected) in cases.items():
        out = tmp_path / f"out_{path.name}"
        with pytest.raises(SystemExit) as exit_info:
            reconstruct(path, out, *flags)
        message = capsys.readouterr().err
        assert exit_info.value.code == 2 and message.startswith("error: fix "), message
        assert all(text in message for text in expected), message
        assert "Traceback" not in message and not out.exists()

    unnamed = tmp_path / "mine.safetensors"  # not a released file name: the preset must be given
    unnamed.write_bytes(DEMO.read_bytes())
    with pytest.raises(SystemExit):
        reconstruct_main(["--scene", str(scene.path), "--out", str(tmp_path / "out"), "--ckpt", str(unnamed)])
    message = capsys.readouterr().err
    assert "--preset: name the preset of --ckpt" in message
    assert "it probably belongs to preset 'demo' (every name and shape fits)" in message, message


def test_a_colmap_scene_without_pycolmap_says_how_to_install_it(room, monkeypatch):
    from tokengs.data.scene import SceneError

    monkeypatch.setitem(sys.modules, "pycolmap", None)  # `import pycolmap` fails
    with pytest.raises(SceneError, match=r'pip install -e "\.\[captures\]"'):
        open_capture(room[1]["colmap"])


def test_context_views_spread_over_the_capture_by_camera_position():
    along = np.stack([np.arange(10.0), np.zeros(10), np.zeros(10)], 1)
    assert spread_frames(along, 3) == [0, 4, 9]
    assert spread_frames(along, 3) == spread_frames(along.copy(), 3)  # deterministic
    # a tripod: every camera at one point -> frames spread through the capture instead
    assert spread_frames(np.zeros((10, 3)), 3) == [0, 4, 9]
    # ... also where the pose file's rounding left the centers 1e-15 apart (COLMAP's round trip)
    noise = np.random.default_rng(0).normal(scale=1e-15, size=(10, 3))
    assert spread_frames(np.full((10, 3), 2.5) + noise, 3) == [0, 4, 9]
    # a loop back to the start: the far side of it, not the frames next to each other in time
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    loop = np.stack([np.cos(angles), np.sin(angles), np.zeros(12)], 1)
    assert spread_frames(loop, 2) == [0, 6]


def test_workspace_tuning_chosen_frames_and_a_video_without_ffmpeg(room, tmp_path, monkeypatch, capsys):
    from tokengs.media import read_video
    from tokengs.models import TokenGS, save_model
    from tokengs.options import get_preset

    torch.manual_seed(0)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    opt = get_preset("tiny").evolve(ttt_n_steps=3)
    opt.save_yaml(workspace / "config.yaml")
    save_model(TokenGS(opt), workspace / "model.safetensors")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # media falls back to OpenCV's encoder
    out = tmp_path / "out"
    reconstruct_main(["--scene", str(room[1]["nerfstudio"]), "--out", str(out), "--workspace", str(workspace),
                      "--context_frames", "1", "6", "--ttt", "--video_frames", "6"])
    printed = capsys.readouterr().out
    assert "workspace" in printed and str(out / "path.mp4") in printed
    metrics = (out / "metrics.txt").read_text()
    assert "# context frames: 1 6" in metrics and "token-tuning (3 steps" in metrics
    assert len(list((out / "renders").iterdir())) == FRAMES - 2
    assert read_video(out / "path.mp4").shape[0] == 6


def test_the_timing_script_runs_on_the_cpu_and_reports_every_phase(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "reconstruct_timing.py"), "--smoke", "--out",
                           str(tmp_path)], env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["scenes"] == 2 and report["weights"] == "fresh" and report["targets"] == 8
    phases = report["median_s"]
    assert set(phases) == {"read", "preprocess", "model", "render_metrics", "write", "end_to_end"}
    assert phases["end_to_end"] == pytest.approx(sum(v for k, v in phases.items() if k != "end_to_end"), rel=0.2)
    assert len(list((tmp_path / "out").glob("*/gaussians.ply"))) == 3


def test_a_second_run_into_the_same_folder_leaves_none_of_the_first_runs_renders_or_video(room, tmp_path):
    scene, paths = room
    out = tmp_path / "out"
    reconstruct(paths["dl3dv"], out, "--video_frames", "3")
    assert (out / "path.mp4").is_file() and len(list((out / "renders").glob("*.png"))) == FRAMES - 4
    reconstruct(paths["dl3dv"], out, "--context_frames", "0", "3", "5", "7")  # other targets, no video
    assert not (out / "path.mp4").exists()
    assert sorted(p.name[:3] for p in (out / "renders").glob("*.png")) == ["001", "002", "004", "006"]


def test_georeferenced_cameras_give_the_gaussians_of_the_same_cameras_near_the_origin(room, tmp_path):
    scene, paths = room
    shifted = scene.c2ws.copy()
    shifted[:, :3, 3] += (512345.0, 5412345.0, 312.0)  # UTM coordinates, in metres
    far = write_nerfstudio(tmp_path / "utm", shifted, scene.intrinsics, photos(scene.path), HW)
    reconstruct(paths["nerfstudio"], tmp_path / "near")
    reconstruct(far, tmp_path / "far")
    near, far = read_ply(tmp_path / "near" / "gaussians.ply"), read_ply(tmp_path / "far" / "gaussians.ply")
    assert np.abs(far - near).max() <= 1e-4


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_photos_resized_one_at_a_time_equal_the_stack_resized_at_once(dtype):
    from tokengs.data.provider import crop_resize
    from tokengs.data.scene import stack_views
    from tokengs.reconstruct import images_tensor

    top = np.iinfo(dtype).max
    photos = [np.random.default_rng(i).integers(0, top, size=(90, 160, 3), endpoint=True).astype(dtype)
              for i in range(3)]
    at_once = crop_resize(stack_views(photos, ["a", "b", "c"], (90, 160)), (48, 80))
    assert torch.equal(images_tensor(photos, torch.device("cpu"), (48, 80)), at_once)
