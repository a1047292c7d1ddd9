"""Faults and bad input, caused on purpose: damaged data, damaged or foreign checkpoints, garbage
in a workspace's own files, two runs on one workspace, a workspace path that cannot be one, a
read-only or full disk, non-finite numbers, mistyped command lines and option values. Each test
shows what the user gets: a logged skip, one line naming the file or option (exit 2 at start-up,
1 later), or a run that stops with its last checkpoint intact.

Cases already shown elsewhere are not repeated here (the README's "What survives what" lists
them all): a truncated zip, a missing frame and a NaN pose in the check CLI and a broken zip
replaced in training (test_data.py); a kill or SIGTERM mid-run and mid-write, a NaN loss, flags
that disagree with the workspace (test_train.py); a truncated, empty or foreign checkpoint loaded
directly (test_model.py, test_evaluate.py); parse_options' one-line errors (test_options.py).

Everything runs on tiny synthetic scenes in this process, on one thread, except one real
command line per entry point and the runs that hold a workspace's lock. The full-disk and
read-only tests mount a small tmpfs where they run as root (as CI does) and skip elsewhere.
"""

import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tokengs import workspace as ws
from tokengs.cli import run_main, work_started
from tokengs.data import Batch, build_dataset
from tokengs.data.check import main as check_main
from tokengs.data.scene import DataLoadError, SceneError
from tokengs.data.synthetic import generate
from tokengs.evaluate import main as evaluate_main
from tokengs.evaluate import score_views
from tokengs.gaussians import Gaussians
from tokengs.models import TokenGS
from tokengs.models.checkpoint import CheckpointError, checkpoint_file_problems, load_model_checkpoint, save_model
from tokengs.options import OptionsError, get_preset
from tokengs.rendering import render
from tokengs.scene_files import SceneFileError
from tokengs.train import NonFiniteError, Trainer
from tokengs.train import main as train_main
from conftest import ONE_THREAD_ENV

ROOT = Path(__file__).resolve().parents[1]
HW = (32, 48)  # the tiny presets' image size: no resize, fast decoding
FRAMES = 12  # DL3DV's smallest context gap is 10 frames: 11 is the fewest a scene may have
ENTRY_POINTS = {"train": train_main, "evaluate": evaluate_main}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**changes):
    return get_preset("tiny").evolve(**changes)


# ---------------------------------------------------------------------------------------------
# Data: one damaged scene of each kind beside good ones
# ---------------------------------------------------------------------------------------------

def rewrite_zip(path: Path, edit) -> None:
    """Rewrite the archive with edit(member, data) -> new data, or None to leave the member out."""
    with zipfile.ZipFile(path) as archive:
        items = [(name, archive.read(name)) for name in archive.namelist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in items:
            data = edit(name, data)
            if data is not None:
                archive.writestr(name, data)


def edit_first_pose(change):
    """A zip edit that applies change(matrix) to frame 0's transform_matrix (a 4x4 list) in transforms.json."""
    def edit(name, data):
        if not name.endswith("transforms.json"):
            return data
        transforms = json.loads(data)
        change(transforms["frames"][0]["transform_matrix"])
        return json.dumps(transforms).encode()
    return edit


def cut_pngs(name, data):
    # the PNG header (read for the size) survives, the pixels do not: the decoder must refuse it
    return data[: len(data) // 2] if name.endswith(".png") else data


def small_first_frame(name, data):
    if not name.endswith("frame_00001.png"):
        return data
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.imencode(".png", image[::2, ::2])[1].tobytes()  # half the size of every other frame


def nan_translation(matrix):
    matrix[0][3] = float("nan")


def zero_rotation(matrix):
    for row in matrix[:3]:
        row[:3] = [0.0, 0.0, 0.0]


# damage -> (zip edit, what the error says). Each damage breaks the whole scene whichever views a
# sample draws: every frame, frame 0 (whose size and pose every scene check reads), or the archive.
DL3DV_DAMAGES = {
    "undecodable": (cut_pngs, "cannot decode the image"),
    "no_transforms": (lambda name, data: None if name.endswith("transforms.json") else data,
                      "no transforms.json in the archive"),
    "nan_pose": (edit_first_pose(nan_translation), "non-finite pose"),
    "singular_pose": (edit_first_pose(zero_rotation), "degenerate pose"),
    "wrong_size": (small_first_frame, "frames of mixed size"),
}


@pytest.fixture(scope="module")
def dl3dv(tmp_path_factory):
    """A DL3DV root: one scene per damage, a 3-frame scene, and 2 good scenes (the last is held out
    for validation). Returns (root, {damage: zip path}, [good names])."""
    root = tmp_path_factory.mktemp("dl3dv")
    generate("dl3dv", root, len(DL3DV_DAMAGES) + 2, seed=0, frames=FRAMES, height=HW[0], width=HW[1])
    short = tmp_path_factory.mktemp("short")
    generate("dl3dv", short, 1, seed=1, frames=3, height=HW[0], width=HW[1])
    (short_zip,) = (short / "1K").glob("*.zip")
    zips = sorted((root / "1K").glob("*.zip"))
    damaged = dict(zip(DL3DV_DAMAGES, zips))
    for damage, path in damaged.items():
        rewrite_zip(path, DL3DV_DAMAGES[damage][0])
    damaged["few_frames"] = shutil.copy(short_zip, root / "1K" / short_zip.name)
    return root, damaged, [p.stem for p in zips[len(DL3DV_DAMAGES):]]


def check_report(name: str, root: Path, tmp_path: Path, *flags: str) -> dict:
    """Run the data check CLI (in this process); it must exit 1. {path: [problems]}."""
    report = tmp_path / "report.json"
    assert check_main([name, "--root", str(root), "--json", str(report), *flags]) == 1
    by_path = {}
    for problem in json.loads(report.read_text())["problems"]:
        by_path.setdefault(problem["path"], []).append(problem["problem"])
    return by_path


def assert_skipped_in_training(opt, bad: dict, caplog) -> None:
    """Every sample of a bad scene (name -> what its log line says, the path first) is replaced by
    a good scene's, and each bad file is logged once (scenes of one broken chunk share a line)."""
    dataset = build_dataset(opt, "train")
    with caplog.at_level(logging.WARNING, logger="tokengs.data"):
        for index in range(len(dataset)):
            sample = dataset[index]
            assert sample.scene_names[0] not in bad
            assert torch.isfinite(sample.context.images).all() and torch.isfinite(sample.context.rays).all()
    logged = [r.getMessage() for r in caplog.records if "skipping scene" in r.getMessage()]
    for reason in set(bad.values()):
        (line,) = [m for m in logged if reason in m]
        assert any(f"skipping scene {name} " in line for name in bad), line
    # a replacement may draw a bad scene not met yet: more failures than bad scenes
    assert dataset.load_failures >= len(bad) and dataset.consecutive_failures == 0


def test_check_cli_names_each_damaged_dl3dv_scene_and_its_problem(dl3dv, tmp_path):
    root, damaged, good = dl3dv
    problems = check_report("dl3dv", root, tmp_path, "--preset", "tiny")
    expected = {damage: reason for damage, (_, reason) in DL3DV_DAMAGES.items()}
    expected["few_frames"] = "3 frames, fewer than the 11 that view sampling needs"
    for damage, reason in expected.items():
        assert any(reason in p for p in problems[str(damaged[damage])]), (damage, problems[str(damaged[damage])])
    assert set(problems) == {str(p) for p in damaged.values()}  # the good scenes have none


def test_training_logs_and_replaces_each_damaged_dl3dv_scene(dl3dv, caplog):
    root, damaged, _ = dl3dv
    # the 3-frame scene trains: a short scene's gap is clipped to its length (the check CLI warns of it)
    bad = {damaged[d].stem: f"{damaged[d]}" for d in DL3DV_DAMAGES}
    assert_skipped_in_training(tiny(dataset_kwargs={"root_path": str(root)}, batch_size=1), bad, caplog)
    logged = caplog.text
    for damage, (_, reason) in DL3DV_DAMAGES.items():
        assert reason in logged, damage


def test_an_evaluation_scene_that_cannot_be_read_raises_naming_its_file(dl3dv):
    root, damaged, _ = dl3dv
    opt = get_preset("tiny_eval").evolve(data_mode=(("dl3dv", 1),), dataset_kwargs={"root_path": str(root)})
    dataset = build_dataset(opt, "eval")
    index_of = {ref.name: i for i, (_, ref) in enumerate(dataset.entries)}
    for damage, (_, reason) in DL3DV_DAMAGES.items():
        with pytest.raises(DataLoadError) as error:
            dataset[index_of[damaged[damage].stem]]
        assert str(damaged[damage]) in str(error.value) and reason in str(error.value), damage


@pytest.fixture(scope="module")
def kubric(tmp_path_factory):
    """A Kubric root: scene 0 with a truncated camera tar, scene 1 without metadata.json, 2 good."""
    root = tmp_path_factory.mktemp("kubric")
    generate("kubric", root, 4, seed=0, frames=4, height=32, width=32, cameras_per_scene=2)
    truncated = root / "v0" / "00000" / "output_001.tar"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    no_metadata = root / "v0" / "00001" / "output_000.tar"
    with tarfile.open(no_metadata) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers() if m.isfile()]
    with tarfile.open(no_metadata, "w") as archive:
        for member, data in members:
            if not member.name.endswith("metadata.json"):
                archive.addfile(member, io.BytesIO(data))
    return root, {"v0/00000": truncated, "v0/00001": no_metadata}


def test_kubric_truncated_tar_and_missing_metadata_are_skipped_and_reported(kubric, tmp_path, caplog):
    root, bad = kubric
    problems = check_report("kubric", root, tmp_path)
    reports = {name: " | ".join(p for path, ps in problems.items() if path.startswith(str(root / name)) for p in ps)
               for name in bad}
    assert str(bad["v0/00000"]) in reports["v0/00000"]
    assert f"{bad['v0/00001']}:metadata.json: missing file" in reports["v0/00001"]
    opt = tiny(data_mode=(("kubric", 1),), dataset_kwargs={"root_path": str(root)}, batch_size=1)
    assert_skipped_in_training(opt, {"v0/00000": str(bad["v0/00000"]),
                                     "v0/00001": f"{bad['v0/00001']}:metadata.json: missing file"}, caplog)


def test_re10k_truncated_chunk_is_skipped_and_reported(tmp_path, caplog):
    root = tmp_path / "re10k"
    generate("re10k", root, 8, seed=0, frames=6, height=HW[0], width=HW[1])  # train: 2 chunks of 4 scenes
    chunk = root / "train" / "000000.torch"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    in_chunk = [k for k, v in json.loads((root / "train" / "index.json").read_text()).items() if v == chunk.name]
    problems = check_report("re10k", root, tmp_path)
    # (the other scenes are reported too, as shorter than re10k's context gap: only this chunk is unreadable)
    assert len(problems[str(chunk)]) == len(in_chunk) and all("unreadable chunk" in p for p in problems[str(chunk)])
    assert not any("unreadable" in p for path, ps in problems.items() if path != str(chunk) for p in ps)
    opt = tiny(data_mode=(("re10k", 1),), dataset_kwargs={"root_path": str(root)}, batch_size=1)
    assert_skipped_in_training(opt, {key: f"{chunk}: unreadable chunk" for key in in_chunk}, caplog)


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl3dv_eval")
    generate("dl3dv_eval", root, 2, seed=0, frames=6, height=HW[0], width=HW[1])
    checkpoint = root.parent / "tiny_eval.safetensors"  # any model of the preset: start-up only checks it is there
    save_model(TokenGS(get_preset("tiny_eval")), checkpoint)
    return root, checkpoint


def test_evaluation_json_naming_an_absent_scene_exits_2_before_any_work(eval_root, tmp_path, capsys):
    root, checkpoint = eval_root
    index = json.loads((root / "evaluation.json").read_text())
    index["no_such_scene"] = next(iter(index.values()))
    bad_json = tmp_path / "evaluation.json"
    bad_json.write_text(json.dumps(index))
    with pytest.raises(SystemExit) as stop:
        evaluate_main(["tiny_eval", "--workspace", str(tmp_path / "ws"), "--resume", str(checkpoint),
                       "--dataset_kwargs", "root_path", str(root), "evaluation_json", str(bad_json)])
    message = capsys.readouterr().err
    assert stop.value.code == 2 and "1 problem(s)" in message
    assert f"evaluation JSON {bad_json} names 1 scene(s) not under {root} (first: no_such_scene)" in message
    assert not (tmp_path / "ws").exists()
    # the check CLI reads the root's own evaluation.json: give it the bad one in a copy of the root
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    shutil.copy(bad_json, copy / "evaluation.json")
    problems = check_report("dl3dv_eval", copy, tmp_path)
    assert any("not under the root (first: no_such_scene)" in p for p in problems[str(copy / "evaluation.json")])


def fails(entry, argv: list, capsys, code: int = 2) -> str:
    """Run a command line in this process; it must exit with `code`. What it wrote on stderr."""
    with pytest.raises(SystemExit) as stop:
        entry(argv)
    assert stop.value.code == code
    return capsys.readouterr().err


def last_line(text: str) -> str:
    """The message after anything a progress bar or a log wrote above it."""
    line = text.strip().splitlines()[-1]
    assert line.startswith("error: "), text[-2000:]
    return line


def evaluate_flags(eval_root, workspace: Path, *flags: str) -> list[str]:
    root, checkpoint = eval_root
    return ["tiny_eval", "--workspace", str(workspace), "--resume", str(checkpoint), "--dataset_kwargs", "root_path",
            str(root), *flags]


def test_evaluation_skips_a_scene_it_cannot_read_lists_it_and_exits_3(eval_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(eval_root[0], root)
    broken = next(iter(json.loads((root / "evaluation.json").read_text())))
    damage_truncate(root / f"{broken}.zip")
    workspace = tmp_path / "ws"
    argv = evaluate_flags((root, eval_root[1]), workspace)
    err = fails(evaluate_main, argv, capsys, code=3)
    report = json.loads((workspace / "metrics.json").read_text())
    (skipped,) = report["skipped"]
    assert skipped["scene"] == broken and f"{root / broken}.zip" in skipped["reason"]
    assert report["num_scenes"] == 1 and [s["scene"] for s in report["scenes"]] != [broken]  # the other one is scored
    assert f"{skipped['index']:5d}  {broken}: {skipped['reason']}" in (workspace / "metrics.txt").read_text()
    assert "skipped 1 scenes that could not be read" in err and f"{broken} (index {skipped['index']})" in err
    # --strict: the first scene it cannot read stops the run, exit 1 (the evaluation had begun)
    line = last_line(fails(evaluate_main, evaluate_flags((root, eval_root[1]), tmp_path / "strict", "--strict"),
                           capsys, code=1))
    assert broken in line and f"{root / broken}.zip" in line


def test_evaluation_json_asking_for_frames_a_scene_lacks_names_the_scene(eval_root, tmp_path):
    root, _ = eval_root
    index = json.loads((root / "evaluation.json").read_text())
    first = next(iter(index))
    index[first]["target"].append(6)  # the scenes have frames 0..5: fewer than the JSON needs
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(index))
    opt = get_preset("tiny_eval").evolve(dataset_kwargs={"root_path": str(root), "evaluation_json": str(path)})
    with pytest.raises(DataLoadError) as error:
        build_dataset(opt, "eval")[0]
    assert f"{root / first}.zip: the evaluation JSON asks for frames [6] of a scene with 6 frames" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Checkpoints: damaged, foreign or incomplete ones stop the run at start-up, untouched
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    generate("dl3dv", root, 3, seed=2, frames=FRAMES, height=HW[0], width=HW[1])
    return root


def train_flags(root: Path, workspace: Path, *flags: str, epochs: int = 1, batch_size: int = 1) -> list[str]:
    """Epochs of 2 steps (3 scenes, the last held out for validation)."""
    return ["tiny", "--workspace", str(workspace), "--dataset_kwargs", "root_path", str(root), "--batch_size",
            str(batch_size), "--num_epochs", str(epochs), *flags]


@pytest.fixture(scope="module")
def trained(clean_root, tmp_path_factory) -> Path:
    """A workspace killed after its last checkpoint (no COMPLETE): the same command resumes it."""
    workspace = tmp_path_factory.mktemp("trained") / "ws"
    train_main(train_flags(clean_root, workspace))
    (workspace / ws.COMPLETE_FILE).unlink()
    return workspace


def checkpoint_bytes(workspace: Path) -> dict:
    return {name: (workspace / name).read_bytes() for name in ws.CHECKPOINT_FILES if (workspace / name).exists()}


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_empty(path: Path) -> None:
    path.write_bytes(b"")


def damage_other_preset(path: Path) -> None:
    save_model(TokenGS(get_preset("tiny_latent")), path)


@pytest.mark.parametrize("damage, says", [
    (damage_truncate, "is not a readable safetensors file"),
    (damage_empty, "is empty (0 bytes)"),
    (damage_other_preset, "does not fit this model (strict loading); it probably belongs to preset 'tiny_latent'"),
])
def test_resuming_a_damaged_or_foreign_workspace_model_exits_2_and_touches_nothing(clean_root, trained, tmp_path,
                                                                                   capsys, damage, says):
    workspace = tmp_path / "ws"
    shutil.copytree(trained, workspace)
    damage(workspace / ws.MODEL_FILE)
    before = checkpoint_bytes(workspace)
    message = fails(train_main, train_flags(clean_root, workspace), capsys)
    assert f"checkpoint {workspace / ws.MODEL_FILE} {says}" in message
    assert checkpoint_bytes(workspace) == before, "a failed resume changed the workspace's files"


@pytest.mark.parametrize("damage", [damage_truncate, damage_empty])
def test_resume_flag_naming_a_damaged_checkpoint_is_listed_with_the_other_start_up_problems(trained, tmp_path,
                                                                                           capsys, damage):
    checkpoint = tmp_path / "weights.safetensors"
    shutil.copy(trained / ws.MODEL_FILE, checkpoint)
    damage(checkpoint)
    missing_root = tmp_path / "no_data"
    message = fails(train_main, train_flags(missing_root, tmp_path / "ws", "--resume", str(checkpoint)), capsys)
    assert "2 problem(s)" in message and f"root {missing_root} does not exist" in message
    assert f"--resume: checkpoint {checkpoint}" in message
    assert "not a readable safetensors file" in message or "is empty" in message
    assert not (tmp_path / "ws").exists()


# (the checkpoint's preset and changes, the new run's preset and changes, whether it may start from it)
FINETUNES = [
    (("tiny_latent", {}), ("tiny", {}), False),  # another architecture
    (("tiny", {"enc_depth": 1}), ("tiny", {}), False),  # the model's second block would start fresh
    (("tiny", {"num_gs_tokens": 32}), ("tiny", {}), False),  # tokens of another count, no rule to resize them
    (("tiny", {"num_gs_tokens": 32}), ("tiny", {"init_tokens_from_existing": True}), True),
    # the release's dynamic finetune: resized latents; dynamic tokens and time embeddings added
    (("tiny_latent", {"num_latents": 8}), ("tiny_kubric_dyn", {"init_latents_from_existing": True}), True),
]


@pytest.mark.parametrize("source, target, accepted", FINETUNES)
def test_a_run_starts_from_another_presets_checkpoint_only_when_every_weight_has_a_place(tmp_path, source, target,
                                                                                        accepted):
    checkpoint = tmp_path / "weights.safetensors"
    save_model(TokenGS(get_preset(source[0]).evolve(**source[1])), checkpoint)
    problems = checkpoint_file_problems(checkpoint, "--resume", get_preset(target[0]).evolve(**target[1]),
                                        strict=False)
    assert (problems == []) == accepted, problems


def test_a_validation_scene_that_cannot_be_read_is_dropped_and_none_left_stops_at_start_up(tmp_path, capsys,
                                                                                            caplog):
    root = tmp_path / "root"
    generate("dl3dv", root, 4, seed=3, frames=FRAMES, height=HW[0], width=HW[1])
    broken = sorted((root / "1K").glob("*.zip"))[-1]  # held out for validation at every batch size
    damage_truncate(broken)
    workspace = tmp_path / "ws"
    with caplog.at_level(logging.WARNING, logger="tokengs.train"):
        train_main(train_flags(root, workspace, batch_size=2))  # 2 scenes to train on, 2 to validate on
    (dropped,) = [r.getMessage() for r in caplog.records if "dropping a validation scene" in r.getMessage()]
    assert f"scene {broken.stem} failed to load: {broken}" in dropped
    assert (workspace / ws.COMPLETE_FILE).exists() and (workspace / "val" / "epoch_0001.png").is_file()
    line = last_line(fails(train_main, train_flags(root, tmp_path / "ws1"), capsys))  # batch 1: the broken one alone
    assert "none of the 1 validation scenes (the last batch_size of each dataset) loads; the first: " in line
    assert str(broken) in line and not (tmp_path / "ws1" / ws.CONFIG_FILE).exists()  # refused: nothing written


def test_resume_flag_naming_another_presets_checkpoint_exits_2_at_start_up(clean_root, tmp_path, capsys):
    checkpoint = tmp_path / "latent.safetensors"
    save_model(TokenGS(get_preset("tiny_latent")), checkpoint)
    message = fails(train_main, train_flags(clean_root, tmp_path / "ws", "--resume", str(checkpoint)), capsys)
    assert f"--resume: checkpoint {checkpoint} does not fit this model (finetuning); it probably belongs to preset " \
           "'tiny_latent'" in message
    assert not (tmp_path / "ws").exists()


# (the workspace's file, what is written into it, what the one line says)
GARBAGE = [
    (ws.METADATA_FILE, b"{", "is damaged (JSONDecodeError: "),
    (ws.METADATA_FILE, b"[]", "is damaged (TypeError: a list, not the mapping"),
    (ws.METADATA_FILE, b'{"step": "two", "epoch": 1, "batch_in_epoch": 0}', "is damaged (ValueError: step is 'two'"),
    (ws.OPTIMIZER_FILE, b"garbage", "is damaged (UnpicklingError: "),
    (ws.SCHEDULER_FILE, b"", "is damaged (EOFError: "),
    (ws.PENDING_FILE, b"garbage", "is damaged (JSONDecodeError: "),
    (ws.CONFIG_FILE, b"lr: [", "is not valid YAML"),
]


@pytest.mark.parametrize("name, garbage, says", GARBAGE, ids=[f"{n}-{g[:6]!r}" for n, g, _ in GARBAGE])
def test_garbage_in_a_workspace_file_exits_2_with_one_line_naming_it(clean_root, trained, tmp_path, capsys, name,
                                                                     garbage, says):
    workspace = tmp_path / "ws"
    shutil.copytree(trained, workspace)
    (workspace / name).write_bytes(garbage)
    before = checkpoint_bytes(workspace)
    message = fails(train_main, train_flags(clean_root, workspace), capsys)
    assert "Traceback" not in message and f"{workspace / name}" in message and says in message, message
    assert checkpoint_bytes(workspace) == before and (workspace / name).read_bytes() == garbage


def test_a_save_killed_after_its_commit_is_finished_before_the_start_up_checks(clean_root, trained, tmp_path, capsys):
    """Killed between checkpoint.pending and the renames of a first save, a workspace has no
    metadata.json yet: the start-up checks must see the checkpoint the save committed (here: a
    config.yaml that disagrees with the flags), not a workspace without one."""
    workspace = tmp_path / "ws"
    shutil.copytree(trained, workspace)
    files = [name for name in ws.CHECKPOINT_FILES if (workspace / name).exists()]
    for name in files:
        (workspace / name).rename(workspace / (name + ".tmp"))
    (workspace / ws.PENDING_FILE).write_text(json.dumps({"step": 2, "files": files}))
    message = fails(train_main, train_flags(clean_root, workspace, "--lr", "0.123"), capsys)
    assert f"{workspace / ws.CONFIG_FILE} disagrees with the flags given: lr" in message, message
    assert not (workspace / ws.PENDING_FILE).exists() and checkpoint_bytes(workspace) == checkpoint_bytes(trained)


def test_missing_optimizer_file_on_resume_exits_2_before_training(clean_root, trained, tmp_path, capsys):
    workspace = tmp_path / "ws"
    shutil.copytree(trained, workspace)
    (workspace / ws.OPTIMIZER_FILE).unlink()
    before = checkpoint_bytes(workspace)
    message = fails(train_main, train_flags(clean_root, workspace), capsys)
    assert f"workspace {workspace} holds metadata.json but not optimizer.pth" in message
    assert f"--resume {workspace / ws.MODEL_FILE}" in message  # how to keep the weights
    assert checkpoint_bytes(workspace) == before


# ---------------------------------------------------------------------------------------------
# One writer per workspace: a second run refuses naming the holder; a killed holder's lock is taken over
# ---------------------------------------------------------------------------------------------

def wait_for_lock(process: subprocess.Popen, workspace: Path) -> None:
    deadline = time.monotonic() + 120
    while ws._read_holder(workspace / ws.LOCK_FILE) is None:  # written whole right after the file is created
        assert process.poll() is None, "the run ended before it locked its workspace"
        assert time.monotonic() < deadline, "no lock within the time limit"
        time.sleep(0.01)


def test_a_second_run_on_a_locked_workspace_refuses_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
        clean_root, eval_root, tmp_path, capsys, caplog):
    workspace = tmp_path / "ws"
    argv = train_flags(clean_root, workspace)
    holder = subprocess.Popen([sys.executable, "-m", "tokengs.train", *argv], cwd=ROOT, env=ONE_THREAD_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock(holder, workspace)
        os.kill(holder.pid, signal.SIGSTOP)  # frozen while it holds the lock, wherever it was
        lock = json.loads((workspace / ws.LOCK_FILE).read_text())
        assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname()
        holder_said = f"in use by process {holder.pid} on {socket.gethostname()} (since {lock['started']})"
        second = subprocess.run([sys.executable, "-m", "tokengs.train", *argv], cwd=ROOT, env=ONE_THREAD_ENV,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and holder_said in last_line(second.stderr), second.stderr[-2000:]
        assert holder_said in last_line(fails(evaluate_main, evaluate_flags(eval_root, workspace), capsys))
    finally:
        holder.kill()  # SIGKILL, stopped or not: no clean-up; the kernel lets go of its flock
        holder.wait(timeout=60)
    with caplog.at_level(logging.WARNING, logger="tokengs.workspace"):
        train_main(argv)
    assert f"taking over the lock {workspace / ws.LOCK_FILE} of process {holder.pid}" in caplog.text
    assert (workspace / ws.COMPLETE_FILE).exists() and not (workspace / ws.LOCK_FILE).exists()


def test_an_evaluation_stopped_by_sigterm_releases_its_lock_in_one_line(eval_root, tmp_path):
    """SIGTERM unwinds a command that has no checkpoint to save (evaluation): without the handler
    the process died at once and left its lock for the next run to take over."""
    workspace = tmp_path / "ws"
    # long test-time tuning keeps it working: a plain evaluation of these scenes takes 0.1 s and
    # was once past its work (signal lost at exit, rc 0) by the time the test saw the lock
    slow = ("--use_ttt_for_eval", "--ttt_n_steps", "100000")
    process = subprocess.Popen([sys.executable, "-m", "tokengs.evaluate", *evaluate_flags(eval_root, workspace, *slow)],
                               cwd=ROOT, env=ONE_THREAD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lock(process, workspace)
        os.kill(process.pid, signal.SIGSTOP)  # wherever it is while it holds the lock
        os.kill(process.pid, signal.SIGTERM)  # delivered when it continues
        os.kill(process.pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert last_line(stderr) == "error: stopped by SIGTERM" and "Traceback" not in stderr, stderr[-2000:]
    assert not (workspace / ws.LOCK_FILE).exists()


def test_a_lock_of_another_host_is_never_taken_over(clean_root, tmp_path, capsys):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    lock = workspace / ws.LOCK_FILE
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": os.getpid(), "started": "yesterday"}))
    line = last_line(fails(train_main, train_flags(clean_root, workspace), capsys))
    assert "in use by process" in line and "on node-elsewhere" in line and f"delete {lock} and run again" in line
    assert [p.name for p in workspace.iterdir()] == [ws.LOCK_FILE] and "node-elsewhere" in lock.read_text()


def test_an_empty_lock_file_left_by_a_killed_run_is_taken_over(clean_root, trained, tmp_path, caplog):
    workspace = tmp_path / "ws"
    shutil.copytree(trained, workspace)
    (workspace / ws.LOCK_FILE).write_bytes(b"")  # killed between creating its lock file and writing it
    with caplog.at_level(logging.WARNING, logger="tokengs.workspace"):
        train_main(train_flags(clean_root, workspace))
    assert "of an unknown process (the lock file is empty or unreadable)" in caplog.text
    assert (workspace / ws.COMPLETE_FILE).exists() and not (workspace / ws.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Where a workspace cannot be: through a file, on a read-only or full disk
# ---------------------------------------------------------------------------------------------

def workspace_command(entry: str, workspace: Path, clean_root: Path, eval_root) -> list[str]:
    return train_flags(clean_root, workspace) if entry == "train" else evaluate_flags(eval_root, workspace)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("where, says", [(".", "is an existing file, not a folder; choose another --workspace"),
                                         ("ws", ": Not a directory; part of the path is a file")])
def test_a_workspace_path_through_an_existing_file_exits_2_with_one_line(clean_root, eval_root, tmp_path, capsys,
                                                                         entry, where, says):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    workspace = existing / where if where != "." else existing
    line = last_line(fails(ENTRY_POINTS[entry], workspace_command(entry, workspace, clean_root, eval_root), capsys))
    assert str(workspace) in line and says in line, line
    assert existing.read_text() == "mine"


def test_the_demos_output_path_through_an_existing_file_exits_2_with_one_line(tmp_path, capsys):
    from tokengs.demo import main as demo_main

    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    line = last_line(fails(demo_main, ["--out", str(existing), "--data", str(tmp_path / "data")], capsys))
    assert line == f"error: {existing}: File exists; a file stands where a folder belongs: move it or choose " \
                   "another path"


def mount_tmpfs(folder: Path, options: str) -> None:
    """A tmpfs at `folder` (unmounted at the end of the test by `unmount_at_exit`); skips where it cannot."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def unmount_at_exit():
    mounted = []
    yield mounted.append
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def read_only_folder(tmp_path, unmount_at_exit) -> Path:
    """A folder this process may not write in: a read-only tmpfs as root (root ignores modes), mode 555 else."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:
        mount_tmpfs(folder, "ro,size=64k")
        unmount_at_exit(folder)
    else:
        folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_read_only_workspace_exits_2_with_one_line(clean_root, eval_root, read_only_folder, capsys, entry):
    line = last_line(fails(ENTRY_POINTS[entry], workspace_command(entry, read_only_folder, clean_root, eval_root),
                           capsys))
    assert f"{read_only_folder / ws.LOCK_FILE}: " in line
    assert "Read-only file system; choose a path on a writable file system" in line or "Permission denied" in line


@pytest.fixture
def small_disk(tmp_path, unmount_at_exit) -> Path:
    """A real 8 MiB tmpfs."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk, "size=8m")
    unmount_at_exit(disk)
    return disk


def fill(disk: Path, leave: int = 0) -> Path:
    """Take all the free space of `disk` but `leave` bytes (rounded to its blocks) with one file; that file."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, stats.f_bavail * stats.f_frsize - leave)
    return filler


# which writer meets the full disk: safetensors' (the model, written first) when none is left; torch.save's (the
# optimizer, next) when room for the model is left
@pytest.mark.parametrize("writer, room_for_the_model, raised", [("safetensors", False, "SafetensorError"),
                                                                 ("torch.save", True, "RuntimeError: [enforce fail")])
def test_a_full_disk_while_saving_stops_with_one_line_and_the_last_checkpoint_resumes(
        clean_root, small_disk, monkeypatch, capsys, caplog, writer, room_for_the_model, raised):
    workspace = small_disk / "ws"
    argv = train_flags(clean_root, workspace, "--save_every_steps", "1", epochs=2)  # 4 steps
    real_save = Trainer.save

    def save_then_fill_the_disk(trainer):
        real_save(trainer)
        if trainer.global_step == 1:
            fill(small_disk, (workspace / ws.MODEL_FILE).stat().st_size + 2**18 if room_for_the_model else 0)

    monkeypatch.setattr(Trainer, "save", save_then_fill_the_disk)
    err = fails(train_main, [*argv, "--debug"], capsys, code=1)
    assert raised in err  # --debug shows the writer's own error, and torch's is not an OSError
    line = last_line(err)
    assert f"cannot write the checkpoint of step 2 to {workspace} (No space left on device)" in line
    assert "the checkpoint of step 1 is intact" in line
    assert sorted(p.name for p in workspace.iterdir() if p.is_file()) == sorted(ws.CHECKPOINT_FILES +
                                                                                (ws.CONFIG_FILE,))
    assert ws.read_metadata(workspace)["step"] == 1
    load_model_checkpoint(TokenGS(get_preset("tiny")), workspace / ws.MODEL_FILE, strict=True)

    monkeypatch.undo()
    (small_disk / "filler").unlink()  # space freed: the same command resumes at step 1 and finishes
    with caplog.at_level(logging.INFO, logger="tokengs.train"):
        train_main(argv)
    assert f"resuming {workspace} at step 1 " in caplog.text
    assert (workspace / ws.COMPLETE_FILE).exists() and ws.read_metadata(workspace)["step"] == 4


def test_a_full_disk_at_start_up_exits_2_with_one_line_naming_the_file(clean_root, small_disk, capsys):
    fill(small_disk)
    workspace = small_disk / "ws"
    line = last_line(fails(train_main, train_flags(clean_root, workspace), capsys))
    assert f"{workspace / ws.LOCK_FILE}: No space left on device; free space there" in line
    assert not workspace.exists()


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------

def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def poison_images(batch: Batch) -> Batch:
    # what the encoder sees
    return replace(batch, context=replace(batch.context, images=nan_like(batch.context.images)))


def poison_cameras(batch: Batch) -> Batch:
    # every camera of the sample: the encoder's rays and the target cameras the loss renders into
    return replace(batch, context=replace(batch.context, rays=nan_like(batch.context.rays)),
                   target=replace(batch.target, w2c=nan_like(batch.target.w2c)))


def test_nonfinite_inputs_and_gradients_skip_the_update_and_are_bounded(clean_root, tmp_path):
    # test_train.py shows a NaN target image (a NaN loss); here the NaN enters the model, or only its gradient
    trainer = Trainer(tiny(workspace=str(tmp_path / "ws"), dataset_kwargs={"root_path": str(clean_root)},
                           batch_size=1, num_epochs=10, max_consecutive_nonfinite_steps=2))  # room for 13 steps
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = next(iter(trainer.loader))
    trainer.train_step(batch)  # a real update first: the optimizer holds moments that a bad step could spoil

    def state():
        return [p.detach().clone() for p in model.parameters()] + \
            [t.clone() for s in trainer.optimizer.state.values() for t in s.values()]

    def infinite_gradient(grad):
        return torch.full_like(grad, float("inf"))

    for poison in (poison_images, poison_cameras, None):
        hook = None if poison else model.gs_tokens.register_hook(infinite_gradient)  # a finite loss, an Inf gradient
        before, skipped = state(), trainer.nonfinite_total
        stats = trainer.train_step(poison(batch) if poison else batch)
        assert all(torch.equal(a, b) for a, b in zip(before, state())), f"{poison}: the bad step changed the model"
        assert trainer.nonfinite_total == skipped + 1 and not torch.isfinite(stats["grad_norm"])
        if hook:
            assert torch.isfinite(stats["loss"])
            hook.remove()
        trainer.train_step(batch)  # a good step: the run of bad ones ends
        assert trainer.nonfinite_in_row == 0
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        for _ in range(2):
            trainer.train_step(poison_cameras(batch))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def gaussians_of(rows) -> Gaussians:
    """One scene from rows of (mean xyz, opacity, scale xyz, rgb), identity rotations, gradients on."""
    columns = [torch.tensor([row[k] for row in rows], dtype=torch.float32)[None].requires_grad_()
               for k in range(4)]
    quats = torch.tensor([[1.0, 0, 0, 0]] * len(rows))[None].requires_grad_()
    return Gaussians(means=columns[0], opacities=columns[1], scales=columns[2], quats=quats, colors=columns[3])


def render_scene(gaussians: Gaussians, bg=(1.0, 1.0, 1.0), image_hw=(24, 32)):
    height, width = image_hw
    intrinsics = torch.tensor([[[30.0, 30.0, width / 2, height / 2]]])
    return render(gaussians, torch.eye(4)[None, None], intrinsics, image_hw, bg, 0.01, 100.0, backend="torch")


NORMAL = [([0.1, 0.0, 2.0], 0.8, [0.1] * 3, [0.9, 0.2, 0.1]), ([-0.3, 0.1, 3.0], 0.6, [0.2] * 3, [0.1, 0.7, 0.3])]
EXTREME = [([0.0, 0.0, -2.0], 0.9, [0.1] * 3, [1.0, 0.0, 0.0]),  # behind the camera
           ([0.0, 0.0, 0.0], 0.9, [0.1] * 3, [1.0, 0.0, 0.0]),  # at the camera's centre
           ([1e6, -1e6, 2.0], 0.9, [0.1] * 3, [1.0, 0.0, 0.0]),  # far off-screen
           ([1e30, 0.0, 1e-30], 0.9, [0.1] * 3, [1.0, 0.0, 0.0]),  # projects to about 1e62 px
           ([0.0, 0.0, 5.0], 0.9, [0.0] * 3, [0.0, 0.0, 1.0]),  # zero scale: a dilated point
           ([0.0, 0.0, 8.0], 0.9, [1e6] * 3, [0.0, 1.0, 0.0])]  # huge: covers the view


def test_renderer_stays_finite_for_gaussians_behind_off_screen_huge_or_zero():
    normal = render_scene(gaussians_of(NORMAL))
    gaussians = gaussians_of(NORMAL + EXTREME[:4])
    out = render_scene(gaussians)
    # the ones behind, at or far beside the camera are culled: they change no pixel
    assert torch.equal(out.images, normal.images) and torch.equal(out.alphas, normal.alphas)
    gaussians = gaussians_of(NORMAL + EXTREME)
    out = render_scene(gaussians)
    for name in ("images", "alphas", "depths"):
        assert torch.isfinite(getattr(out, name)).all(), name
    assert out.alphas.min() > 0.8  # the huge one covers the whole view
    (out.images.sum() + out.depths.sum()).backward()
    for name in ("means", "opacities", "scales", "quats", "colors"):
        assert torch.isfinite(getattr(gaussians, name).grad).all(), name


def test_an_all_transparent_prediction_scores_as_its_background():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 24, 32, generator=generator)
    opt = get_preset("tiny_eval")
    for opacity in (0.0, 1e-6):  # exactly transparent, and below gsplat's 1/255 cull
        rows = [(row[0], opacity, *row[2:]) for row in NORMAL]
        pred = render_scene(gaussians_of(rows), bg=opt.bg_rgb).images[0].detach()
        background = torch.tensor(opt.bg_rgb).view(3, 1, 1).expand_as(target)
        assert torch.equal(pred, background[:1])
        scores = score_views(opt, pred.expand_as(target), target, None, None)
        mse = (background - target).square().mean()
        assert scores["psnr"] == pytest.approx(float(-10 * torch.log10(mse)), abs=1e-4)
        assert np.isfinite(scores["ssim"]) and abs(scores["ssim"]) < 0.05  # a flat image shares no structure


# ---------------------------------------------------------------------------------------------
# Command lines: one line saying what to fix, exit 2, before any data is read
# ---------------------------------------------------------------------------------------------

# (arguments after the preset, what the message must say); test_options.py checks parse_options alone
MISTAKES = [
    (["tiny_evl"], "unknown preset 'tiny_evl' (did you mean tiny_eval"),
    (["--lrr", "0.1"], "unknown flag --lrr; did you mean --lr?"),
    (["--lr", "abc"], "--lr takes a number, not 'abc'"),
    (["--batch_size", "2.5"], "--batch_size takes an integer, not '2.5'"),
    (["--use_wandb", "maybe"], "--use_wandb is a switch: give it alone (--no-use_wandb turns it off) or as "
                               "--use_wandb True|False, not 'maybe'"),
    ([], "name a preset before the flags"),
    (["--data_mode", "dl3dv", "abc"], "--data_mode cannot take 'dl3dv' 'abc'; `PRESET --help` shows what it takes"),
    (["--deferred_bp", "--mean_of_grads", "per-view"], "deferred_bp and mean_of_grads both change backpropagation"),
    (["--batch_size", "0"], "batch_size=0 is out of range: it must be an integer >= 1; set --batch_size"),
    (["--lr", "nan"], "lr=nan is out of range: it must be a finite number > 0; set --lr"),
    (["--num_epochs", "0"], "num_epochs=0 is out of range"),  # no run of 0 steps marked COMPLETE
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("args, says", MISTAKES, ids=["preset", "flag", "type", "integer", "switch", "no-preset", "pairs",
                                                      "conflict", "batch", "lr", "epochs"])
def test_command_line_mistakes_exit_2_with_one_line_before_any_data(entry, args, says, tmp_path, capsys):
    missing_root = tmp_path / "no_data_here"  # were the data read first, this would be the complaint
    workspace = tmp_path / "ws"
    preset = [] if args[:1] in (["tiny_evl"], []) else ["tiny_eval" if entry == "evaluate" else "tiny"]
    with pytest.raises(SystemExit) as stop:
        ENTRY_POINTS[entry]([*preset, *args, "--workspace", str(workspace), "--dataset_kwargs", "root_path",
                             str(missing_root)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and line.startswith("error: ") and says in line, line
    assert str(missing_root) not in line and not workspace.exists()


@pytest.mark.parametrize("module", ["tokengs.train", "tokengs.evaluate"])
def test_real_command_line_with_a_wrong_type_exits_2_with_one_line(module, tmp_path):
    done = subprocess.run([sys.executable, "-m", module, "tiny", "--lr", "abc", "--dataset_kwargs", "root_path",
                           str(tmp_path / "no_data_here")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=ONE_THREAD_ENV)
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 2 and line.startswith("error: ") and "--lr" in line and "no_data_here" not in line


def raising(error: BaseException, after_start: bool):
    """A command's main that raises `error` during start-up or after its work has begun."""
    def main(argv):
        assert "--debug" not in argv  # the wrapper's own flag
        if after_start:
            work_started()
        raise error
    return main


def worker_error(error: Exception) -> Exception:
    """`error` as it reaches the main process from a DataLoader worker: its traceback in the message."""
    from torch._utils import ExceptionWrapper

    try:
        raise error
    except Exception:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except Exception as reraised:
        return reraised


# every error class that options, data, checkpoints, workspaces and the file system raise -> what the line says
USER_ERRORS = [
    (OptionsError("lr=0 is out of range"), "lr=0 is out of range"),
    (ws.WorkspaceError("workspace W is an existing file"), "workspace W is an existing file"),
    (ws.WorkspaceBusy("workspace W is in use by process 7"), "workspace W is in use by process 7"),
    (CheckpointError("checkpoint C is empty (0 bytes)"), "checkpoint C is empty (0 bytes)"),
    (DataLoadError("eval: scene S failed to load: S.zip: truncated"), "eval: scene S failed to load"),
    (worker_error(DataLoadError("50 scenes in a row failed to load")), "50 scenes in a row failed to load"),
    (SceneError("S.zip", "no frames"), "S.zip: no frames"),
    (SceneFileError("X.cameras.json is not valid JSON"), "X.cameras.json is not valid JSON"),
    (NonFiniteError("20 steps in a row had a NaN/Inf loss"), "20 steps in a row had a NaN/Inf loss"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/d/x"), "/d/x: No such file or directory; check"),
    (PermissionError(errno.EACCES, "Permission denied", "/d/x"), "/d/x: Permission denied; this user may not"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/d/x"), "/d/x: Is a directory; a folder stands where"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "/f/x: Not a directory; part of the path is"),
    (FileExistsError(errno.EEXIST, "File exists", "/f"), "/f: File exists; a file stands where a folder belongs"),
    (OSError(errno.EROFS, "Read-only file system", "/r/x"), "/r/x: Read-only file system; choose a path on a"),
    (OSError(errno.ENOSPC, "No space left on device", "/d/x"), "/d/x: No space left on device; free space there"),
    # how safetensors' writer reports a full disk (torch.save's: the real-disk test above)
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "No space left on device; free space there"),
]


@pytest.mark.parametrize("after_start, code", [(False, 2), (True, 1)], ids=["start-up", "later"])
@pytest.mark.parametrize("error, says", USER_ERRORS, ids=[type(e).__name__ for e, _ in USER_ERRORS])
def test_a_users_or_the_environments_error_is_one_line_exit_2_at_start_up_1_later(capsys, error, says, after_start,
                                                                                   code):
    (line,) = fails(lambda argv: run_main(raising(error, after_start), argv), [], capsys, code).strip().splitlines()
    assert line.startswith(f"error: {says}"), line


def test_every_error_class_of_the_package_is_a_user_error():
    """An exception class the package defines either tells the user what to fix (a UserError, one
    line from every command) or is one the viewer or the demo handle themselves."""
    import importlib
    import inspect
    import pkgutil

    import tokengs
    from tokengs.errors import UserError

    handled_where_raised = {"ViewError", "DemoStopped"}
    found = []
    for module_info in pkgutil.walk_packages(tokengs.__path__, "tokengs."):
        module = importlib.import_module(module_info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception) and cls is not UserError:
                found.append(name)
                assert issubclass(cls, UserError) or name in handled_where_raised, f"{module.__name__}.{name}"
    assert {"CheckpointError", "DataLoadError", "LPIPSWeightsMissing", "NonFiniteError", "OptionsError"} <= set(found)


def test_debug_shows_the_traceback_and_a_bug_keeps_it(capsys, monkeypatch):
    for argv, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("TOKENGS_DEBUG", env)
        err = fails(lambda args: run_main(raising(OptionsError("lr=0 is out of range"), False), args), argv, capsys)
        assert err.startswith("Traceback (most recent call last)")
        assert err.strip().endswith("error: lr=0 is out of range")
    with pytest.raises(ZeroDivisionError):  # a bug: not ours to explain
        run_main(raising(ZeroDivisionError("division by zero"), False), [])
