"""Training: the loss falls; a run killed (SIGKILL) or preempted (SIGTERM) resumes to the same
weights; checkpoints survive a kill mid-write; the NaN guard; the optimizer, schedule and
auxiliary weight; the workspace's life (COMPLETE, --retrain, config.yaml, start-up checks);
gradient accumulation; what a run logs.

Every run trains the tiny preset on synthetic DL3DV-layout scenes on the CPU. Runs that must be
killed go through the real command line in a subprocess; the rest run in this process.
"""

import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokengs import workspace as ws
from tokengs.data.synthetic import generate
from tokengs.models import TokenGS
from tokengs.models.checkpoint import load_model_checkpoint, save_model
from tokengs.options import Options, get_preset
from tokengs.train import (NonFiniteError, Trainer, build_optimizer, build_scheduler, dyn_aux_weight, main,
                           param_groups, run)
from conftest import ONE_THREAD_ENV

ROOT = Path(__file__).resolve().parents[1]
SCENES = 6  # with batch_size 1 the last scene is held out for validation: 5 training scenes
# The interrupted runs: 3 epochs of 5 steps, a checkpoint every 3 steps, so most checkpoints fall mid-epoch.
RUN_FLAGS = ["--batch_size", "1", "--max_iters_per_epoch", "5", "--num_epochs", "3", "--save_every_steps", "3"]
TOTAL_STEPS = 15
RUN_TIMEOUT = 300
RUN_ENV = ONE_THREAD_ENV


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dl3dv")
    generate("dl3dv", root, SCENES, seed=0)
    return root


def tiny(data_root: Path, workspace: Path, **changes) -> Options:
    values = dict(workspace=str(workspace), dataset_kwargs={"root_path": str(data_root)}, batch_size=1)
    values.update(changes)
    return get_preset("tiny").evolve(**values)


def train_command(data_root: Path, workspace: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tokengs.train", "tiny", "--workspace", str(workspace),
            "--dataset_kwargs", "root_path", str(data_root), *RUN_FLAGS, *flags]


def start_run(command: list[str], log_path: Path) -> subprocess.Popen:
    """The run in a process group of its own (as a SLURM job step), its output to a file (a pipe
    nobody reads while we wait would fill and stall the run)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=RUN_ENV,
                                start_new_session=True)


def wait_for_checkpoint(process: subprocess.Popen, workspace: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while ws.read_metadata(workspace) is None:  # metadata.json is replaced atomically: never read half-written
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.02)


def step_of(workspace: Path) -> int:
    return ws.read_metadata(workspace)["step"]


def assert_same_weights(workspace: Path, reference: Path) -> None:
    ours, theirs = load_file(workspace / ws.MODEL_FILE), load_file(reference / ws.MODEL_FILE)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= 1e-6, f"weights differ from the uninterrupted run by up to {worst}"


def resume_to_the_end(command: list[str], workspace: Path, from_step: int) -> None:
    """Run the same command again: it must resume at from_step and finish."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=RUN_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {workspace} at step {from_step} " in done.stderr
    assert (workspace / ws.COMPLETE_FILE).exists() and step_of(workspace) == TOTAL_STEPS


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory) -> Path:
    """The uninterrupted run that the interrupted ones must reproduce; its workspace."""
    workspace = tmp_path_factory.mktemp("reference") / "ws"
    subprocess.run(train_command(data_root, workspace), cwd=ROOT, check=True, capture_output=True,
                   timeout=RUN_TIMEOUT, env=RUN_ENV)
    assert step_of(workspace) == TOTAL_STEPS
    return workspace


# ---- learning ----------------------------------------------------------------------------------

def test_loss_falls_when_training_on_a_fixed_batch(data_root, tmp_path):
    # One fixed batch: the loss of different samples varies more than 30 steps of learning lower it.
    # At the tiny preset's lr (1e-3) the Gaussians barely move in 30 steps; 3e-3 drops the loss by ~70%.
    steps, k = 30, 5
    trainer = Trainer(tiny(data_root, tmp_path / "ws", lr=3e-3, pct_start_steps=5, num_epochs=steps,
                           max_iters_per_epoch=1))
    trainer.setup()
    batch = next(iter(trainer.loader))
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(steps)]
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.6 * first, f"mean loss of the first {k} steps {first:.4f}, of the last {k} {last:.4f}"


# ---- interruption and resumption ---------------------------------------------------------------

def test_run_killed_mid_way_resumes_to_the_weights_of_an_uninterrupted_run(data_root, reference_run, tmp_path):
    workspace = tmp_path / "ws"
    command = train_command(data_root, workspace)
    process = start_run(command, tmp_path / "killed.log")
    wait_for_checkpoint(process, workspace)
    process.kill()
    process.wait()
    assert not (workspace / ws.COMPLETE_FILE).exists(), "the kill came after the run had finished"
    killed_at = step_of(workspace)
    assert 0 < killed_at < TOTAL_STEPS
    resume_to_the_end(command, workspace, killed_at)
    assert_same_weights(workspace, reference_run)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_sigterm_or_ctrl_c_saves_the_current_step_exits_0_and_resumes(data_root, reference_run, tmp_path, stop):
    workspace = tmp_path / "ws"
    command = train_command(data_root, workspace, "--num_workers", "1")
    process = start_run(command, tmp_path / "terminated.log")
    wait_for_checkpoint(process, workspace)
    # every process of the job, data workers too: as SLURM preempts, and as a terminal sends Ctrl-C
    os.killpg(process.pid, stop)
    exit_code = process.wait(timeout=RUN_TIMEOUT)
    output = (tmp_path / "terminated.log").read_text()
    assert exit_code == 0, output[-3000:]
    said = re.search(r"stopped \(SIGTERM or Ctrl-C\): checkpoint saved at step (\d+)", output)
    assert said, "the run did not report its checkpoint"
    stopped_at = int(said[1])
    assert step_of(workspace) == stopped_at < TOTAL_STEPS
    assert not (workspace / ws.COMPLETE_FILE).exists()
    assert not list(workspace.glob("*.tmp")) and not (workspace / ws.PENDING_FILE).exists()
    resume_to_the_end(command, workspace, stopped_at)
    assert_same_weights(workspace, reference_run)


def test_saved_model_loads_strictly_into_a_fresh_model(data_root, reference_run):
    opt = tiny(data_root, reference_run)
    saved = load_file(reference_run / ws.MODEL_FILE)
    model = TokenGS(opt)
    load_model_checkpoint(model, reference_run / ws.MODEL_FILE, opt, strict=True)
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


# ---- checkpoints interrupted mid-write ------------------------------------------------------------

def checkpoint_writers(model: torch.nn.Module, step: int) -> dict:
    """The four files of a checkpoint, as the trainer writes them, marked with the step."""
    return {ws.MODEL_FILE: lambda p: save_model(model, p),
            ws.OPTIMIZER_FILE: lambda p: torch.save({"step": step}, p),
            ws.SCHEDULER_FILE: lambda p: torch.save({"last_epoch": step}, p),
            ws.METADATA_FILE: lambda p: p.write_text(json.dumps({"step": step}))}


@pytest.fixture
def two_models():
    """The weights of the checkpoint on disk (step 1) and of the one being saved (step 2)."""
    opt = get_preset("tiny")
    torch.manual_seed(1)
    old = TokenGS(opt)
    torch.manual_seed(2)
    return old, TokenGS(opt)


def assert_whole_checkpoint(workspace: Path, model: torch.nn.Module, step: int) -> None:
    """The workspace holds exactly one loadable checkpoint, all four files from `step`."""
    assert sorted(p.name for p in workspace.iterdir()) == sorted(ws.CHECKPOINT_FILES)
    assert ws.read_metadata(workspace) == {"step": step}
    assert torch.load(workspace / ws.OPTIMIZER_FILE) == {"step": step}
    assert torch.load(workspace / ws.SCHEDULER_FILE) == {"last_epoch": step}
    fresh = TokenGS(model.opt)
    load_model_checkpoint(fresh, workspace / ws.MODEL_FILE, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def save_then_die(workspace: Path, writers: dict, os_function: str, call: int) -> None:
    """In a forked child, save the checkpoint and SIGKILL the child at the `call`-th os.<os_function>."""
    def child():
        original, calls = getattr(os, os_function), [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == call:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(os, os_function, dying)
        ws.save_checkpoint(workspace, writers, step=2)
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL, "the save finished before the planned kill"


# (os function, which call) -> which checkpoint recovery must leave. The save's calls, in order:
# fsync 1 of the model's own temporary file, fsyncs 2-5 of the four NAME.tmp, fsync 6 of the folder;
# replace 1 of the model's temporary file, replace 2 of checkpoint.pending (the commit), replaces 3-6
# of the four files.
@pytest.mark.parametrize("os_function, call, survivor", [
    ("fsync", 1, "old"),  # inside the model's write
    ("fsync", 4, "old"),  # between the files
    ("replace", 2, "old"),  # every file written, not yet committed
    ("replace", 4, "new"),  # committed, the model renamed, the other three not yet
])
def test_checkpoint_killed_mid_write_recovers_one_whole_checkpoint(tmp_path, two_models, os_function, call,
                                                                   survivor):
    old, new = two_models
    ws.save_checkpoint(tmp_path, checkpoint_writers(old, 1), step=1)
    save_then_die(tmp_path, checkpoint_writers(new, 2), os_function, call)
    ws.recover(tmp_path)
    assert_whole_checkpoint(tmp_path, *((old, 1) if survivor == "old" else (new, 2)))


def test_checkpoint_write_that_fails_leaves_the_previous_one(tmp_path, two_models):
    old, new = two_models
    ws.save_checkpoint(tmp_path, checkpoint_writers(old, 1), step=1)

    def disk_full(path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ws.save_checkpoint(tmp_path, {**checkpoint_writers(new, 2), ws.SCHEDULER_FILE: disk_full}, step=2)
    assert_whole_checkpoint(tmp_path, old, 1)


# ---- non-finite steps --------------------------------------------------------------------------

def test_nonfinite_loss_skips_the_update_and_a_run_of_them_stops_training(data_root, tmp_path, caplog):
    trainer = Trainer(tiny(data_root, tmp_path / "ws", max_consecutive_nonfinite_steps=3))
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = next(iter(trainer.loader))
    poisoned = replace(batch, target=replace(batch.target, images=torch.full_like(batch.target.images, float("nan"))))

    def snapshot():
        optimizer_state = trainer.optimizer.state_dict()["state"]
        return ({k: v.clone() for k, v in model.state_dict().items()},
                {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer_state.items()})

    def unchanged(before, after) -> bool:
        (w0, o0), (w1, o1) = before, after
        return (all(torch.equal(w0[k], w1[k]) for k in w0) and o0.keys() == o1.keys()
                and all(torch.equal(o0[i][k], o1[i][k]) for i in o0 for k in o0[i]))

    trainer.train_step(batch)  # a real update first, so the optimizer holds moments to compare
    before = snapshot()
    assert not torch.isfinite(trainer.train_step(poisoned)["loss"])
    assert unchanged(before, snapshot()), "a NaN step changed the weights or the optimizer state"
    assert trainer.nonfinite_total == 1
    assert "non-finite loss, update skipped" in caplog.text

    trainer.train_step(batch)  # a good step updates again and ends the run of bad ones
    assert not unchanged(before, snapshot())
    trainer.train_step(poisoned)
    trainer.train_step(poisoned)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row .*max_consecutive_nonfinite_steps 3"):
        trainer.train_step(poisoned)
    assert trainer.nonfinite_total == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # a finite loss whose gradient is not: skipped too, and the warning says which it was
    trainer.nonfinite_in_row = 0
    hook = next(model.parameters()).register_hook(lambda grad: grad * float("nan"))
    before = snapshot()
    assert torch.isfinite(trainer.train_step(batch)["loss"])
    hook.remove()
    assert unchanged(before, snapshot()) and trainer.nonfinite_total == 5
    assert "non-finite gradient, update skipped (5 so far)" in caplog.text


# ---- optimizer, schedule, auxiliary weight ----------------------------------------------------------

def test_weight_decay_on_2d_weights_and_tokens_not_on_latents_head_or_1d():
    opt = get_preset("tiny_latent")  # a latent-bottleneck model: it has scene latents
    model = TokenGS(opt)
    optimizer = build_optimizer(opt, model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay, exempt = ({name_of[id(p)] for p in group["params"]} for group in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert not decay & exempt and decay | exempt == set(name_of.values())
    assert {"gs_tokens", "patch_embed.proj.weight", "enc_dec_backbone.latent_kv_proj.weight"} <= decay
    head = {n for n in name_of.values() if n.startswith("activation_head.")}
    assert head and head | {"enc_dec_backbone.latents"} <= exempt
    two_dim = {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert decay == two_dim - head - {"enc_dec_backbone.latents"}
    assert param_groups(model)[0]["params"] == optimizer.param_groups[0]["params"]


@pytest.mark.parametrize("pct_start_steps, total, peak", [(30, 100, 29), (500, 100, 98)])  # 500 > 100: 0.99
def test_one_cycle_schedule_of_lr_and_beta1(pct_start_steps, total, peak):
    opt = get_preset("tiny").evolve(lr=1e-3, pct_start_steps=pct_start_steps, final_div_factor=1000.0)
    optimizer = build_optimizer(opt, torch.nn.Linear(3, 3))
    scheduler = build_scheduler(opt, optimizer, total)
    lrs, beta1s = [], []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        beta1s.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3 / 25)  # OneCycleLR's default div_factor
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == peak
    assert lrs[-1] == pytest.approx(1e-3 / 25 / 1000)
    assert beta1s[0] == pytest.approx(0.95) and beta1s[peak] == pytest.approx(0.85)
    assert beta1s[-1] == pytest.approx(0.95) and min(beta1s) == pytest.approx(0.85)
    assert optimizer.param_groups[0]["betas"][1] == 0.95


def test_dyn_aux_weight_holds_then_decays_linearly():
    release = get_preset("finetune_dl3dv_kubric_dyn_release")
    expected = {0: 0.3, 4999: 0.3, 5000: 0.3, 7500: 0.225, 10000: 0.15, 12500: 0.075, 15000: 0.0, 40000: 0.0}
    assert {step: dyn_aux_weight(release, step) for step in expected} == pytest.approx(expected)
    floor = release.evolve(lambda_dyn_aux_min=0.1)
    assert [dyn_aux_weight(floor, s) for s in (5000, 10000, 15000, 40000)] == pytest.approx([0.3, 0.2, 0.1, 0.1])
    constant = get_preset("finetune_dl3dv_kubric_dyn_v2")
    assert [dyn_aux_weight(constant, s) for s in (0, 5000, 40000)] == pytest.approx([0.3, 0.3, 0.3])
    assert dyn_aux_weight(get_preset("finetune_dl3dv_kubric_dyn"), 0) == 0.0


# ---- the workspace ---------------------------------------------------------------------------------

def test_config_yaml_is_written_before_training(data_root, tmp_path):
    opt = tiny(data_root, tmp_path / "ws")
    Trainer(opt).setup()
    assert Options.load_yaml(tmp_path / "ws" / ws.CONFIG_FILE) == opt
    assert ws.read_metadata(tmp_path / "ws") is None


def test_resume_flag_on_a_workspace_with_its_own_checkpoint_is_named_as_unused(data_root, tmp_path, caplog):
    opt = tiny(data_root, tmp_path / "ws")
    first = Trainer(opt)
    first.setup()
    first.save()
    other = tmp_path / "other.safetensors"
    shutil.copy(tmp_path / "ws" / ws.MODEL_FILE, other)
    with caplog.at_level(logging.WARNING, logger="tokengs.train"):
        Trainer(opt).setup()
        assert "is not used" not in caplog.text
        Trainer(opt.evolve(resume=str(other))).setup()
    assert f"--resume {other} is not used: {tmp_path / 'ws'} holds its own checkpoint (step 0)" in caplog.text


def test_complete_workspace_is_trained_again_only_with_retrain(data_root, tmp_path):
    workspace = tmp_path / "ws"
    opt = tiny(data_root, workspace, num_epochs=1, max_iters_per_epoch=2)
    assert run(opt)
    first = load_file(workspace / ws.MODEL_FILE)
    saved_at = ws.read_metadata(workspace)["time"]
    assert run(opt)
    assert ws.read_metadata(workspace)["time"] == saved_at, "a COMPLETE workspace was trained again"
    events = sorted((workspace / "tensorboard").glob("events.out.tfevents*"))
    assert run(opt.evolve(retrain=True))
    assert ws.read_metadata(workspace)["time"] > saved_at
    assert not set(events) & set((workspace / "tensorboard").glob("events.out.tfevents*"))  # the old curves went
    assert step_of(workspace) == 2 and (workspace / ws.COMPLETE_FILE).exists()
    again = load_file(workspace / ws.MODEL_FILE)  # from the start with the same seed: the same weights
    assert max((again[k] - first[k]).abs().max().item() for k in first) <= 1e-6


def cli_failure(argv: list[str], capsys) -> str:
    """Run the training command line in this process; it must exit 2. Its message."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_flags_that_disagree_with_the_workspace_exit_2_with_every_problem(data_root, tmp_path, capsys):
    workspace = tmp_path / "ws"
    assert run(tiny(data_root, workspace, num_epochs=1, max_iters_per_epoch=1))
    (workspace / ws.COMPLETE_FILE).unlink()  # as if killed after its last checkpoint
    missing_root = tmp_path / "no_data"
    message = cli_failure(["tiny", "--workspace", str(workspace), "--batch_size", "1", "--num_epochs", "1",
                           "--max_iters_per_epoch", "1", "--lr", "0.5", "--dataset_kwargs", "root_path",
                           str(missing_root)], capsys)
    assert "2 problem(s)" in message
    assert "lr (workspace 0.001, flags 0.5)" in message
    assert f"root {missing_root} does not exist" in message


def test_flags_that_disagree_with_a_complete_workspace_exit_2_with_every_difference(data_root, tmp_path, capsys):
    workspace = tmp_path / "ws"
    assert run(tiny(data_root, workspace, num_epochs=1, max_iters_per_epoch=1))
    saved_at = ws.read_metadata(workspace)["time"]
    same = ["tiny", "--workspace", str(workspace), "--batch_size", "1", "--num_epochs", "1", "--max_iters_per_epoch",
            "1", "--dataset_kwargs", "root_path", str(data_root), "--print_freq", "3"]  # print_freq: resumable
    message = cli_failure([*same, "--lr", "0.5", "--seed", "7"], capsys)
    assert "1 problem(s)" in message and "COMPLETE" in message and "--retrain" in message
    assert "seed (workspace 42, flags 7); lr (workspace 0.001, flags 0.5)." in message
    assert "print_freq" not in message
    main(same)  # the workspace's own options: COMPLETE, nothing to do
    assert ws.read_metadata(workspace)["time"] == saved_at, "a COMPLETE workspace was trained again"


def test_resume_from_a_missing_file_exits_2_naming_it(data_root, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    message = cli_failure(["tiny", "--workspace", str(tmp_path / "ws"), "--dataset_kwargs", "root_path",
                           str(data_root), "--resume", str(missing)], capsys)
    assert f"--resume: checkpoint {missing} does not exist" in message
    assert not (tmp_path / "ws").exists(), "a failed start-up check must not create the workspace"


# ---- gradient accumulation and logging ------------------------------------------------------------

def test_gradient_accumulation_takes_one_optimizer_step_per_two_batches(data_root, tmp_path):
    workspace = tmp_path / "ws"
    # 4 batches per epoch for 2 epochs: 8 batches, 4 optimizer steps
    assert run(tiny(data_root, workspace, gradient_accumulation_steps=2, max_iters_per_epoch=4, num_epochs=2))
    assert step_of(workspace) == 4
    optimizer = torch.load(workspace / ws.OPTIMIZER_FILE)
    assert {float(state["step"]) for state in optimizer["state"].values()} == {4.0}
    assert torch.load(workspace / ws.SCHEDULER_FILE, weights_only=False)["last_epoch"] == 4


def test_logged_lr_is_the_one_each_step_used_and_never_climbs_back(data_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workspace = tmp_path / "ws"
    opt = tiny(data_root, workspace, num_epochs=2, max_iters_per_epoch=2)  # 4 steps: 2 up to lr, 2 down
    assert run(opt)
    optimizer = build_optimizer(opt, torch.nn.Linear(3, 3))
    scheduler = build_scheduler(opt, optimizer, 4)
    used = []
    for _ in range(4):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([1e-3 / 25, 1e-3, 5e-4, 1e-3 / 25 / 1000], rel=1e-3)
    events = EventAccumulator(str(workspace / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/lr")]
    assert logged == pytest.approx(used, rel=1e-6)  # float32 in the event file
    assert [h["lr"] for h in ws.read_metadata(workspace)["history"] if "lr" in h] == pytest.approx(used)
    peak = logged.index(max(logged))
    assert all(a >= b for a, b in zip(logged[peak:], logged[peak + 1:])), f"the lr climbs back: {logged}"


def test_run_logs_tensorboard_validation_grids_and_offline_wandb(data_root, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workspace = tmp_path / "ws"
    command = train_command(data_root, workspace, "--num_epochs", "2", "--max_iters_per_epoch", "2", "--use_wandb")
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=RUN_TIMEOUT,
                   env=dict(RUN_ENV, WANDB_MODE="offline"))
    for epoch in (1, 2):
        with Image.open(workspace / "val" / f"epoch_{epoch:04d}.png") as grid:
            assert grid.width > 0 and grid.height >= 2 * 32  # the target row above the render row
    events = EventAccumulator(str(workspace / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/psnr")] == [2, 4]
    assert "gaussians/opacity" in events.Tags()["histograms"]
    run_id = ws.read_metadata(workspace)["wandb_run_id"]
    assert run_id and list((workspace / "wandb").glob(f"offline-run-*-{run_id}"))
