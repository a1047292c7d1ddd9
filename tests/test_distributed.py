"""Several processes without several GPUs: the sampler's sharding; 2-process training on gloo
against 1 process with the same global batch (same weights, same logged losses, one writer, a
preempted run resumes); the SLURM launch command."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokengs import workspace as ws
from tokengs.data.synthetic import generate
from tokengs.models import TokenGS
from tokengs.options import get_preset
from tokengs.train import EpochSampler
from conftest import ONE_THREAD_ENV, free_port, two_process_launch

ROOT = Path(__file__).resolve().parents[1]


def test_each_process_sees_different_scenes_each_epoch_seeded_and_reproducible():
    size, world = 11, 2
    for epoch in range(3):
        shards = []
        for rank in range(world):
            sampler = EpochSampler(size, seed=42, rank=rank, world_size=world)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            again = EpochSampler(size, seed=42, rank=rank, world_size=world)
            again.set_epoch(epoch)
            assert list(again) == shards[-1]  # the same seed and epoch give the same order
        assert len(shards[0]) == len(shards[1]) == 6  # equal shares: one scene repeats to pad 11 to 12
        assert set(shards[0]) | set(shards[1]) == set(range(size))  # every scene is seen in the epoch
        assert len(set(shards[0]) & set(shards[1])) <= 1  # only the padding repeats across ranks
    orders = []
    for epoch in range(2):
        sampler = EpochSampler(size, seed=42)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] != orders[1]  # a new permutation each epoch


def test_resumed_sampler_skips_the_batches_already_seen():
    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=3)
    assert list(sampler) == full[3:] and len(sampler) == 7


@pytest.mark.parametrize("nodelist, first", [("gpu[03-05,09]", "gpu03"), ("node7,node8", "node7"), ("a1", "a1")])
def test_slurm_launch_command_for_each_node(nodelist, first):
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": nodelist, "PATH": "/nonexistent"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "slurm_launch.py"), "--gpus_per_node", "8",
                           "--dry_run", "--", "finetune_dl3dv_6view", "--workspace", "W"],
                          capture_output=True, text=True, env=env)  # PATH without scontrol: our own parsing
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout)
    assert command[:2] == ["accelerate", "launch"]
    option = lambda name: command[command.index(name) + 1]
    assert option("--num_machines") == "2" and option("--num_processes") == "16"
    assert option("--machine_rank") == "1" and option("--main_process_ip") == first
    assert command[-4:] == ["tokengs.train", "finetune_dl3dv_6view", "--workspace", "W"]


def test_slurm_launch_outside_slurm_says_so():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "slurm_launch.py"), "--dry_run", "--", "tiny"],
                          capture_output=True, text=True, env={"PATH": "/nonexistent"})
    assert done.returncode != 0 and "SLURM_NNODES is not set" in done.stderr


# ---- 2-process training on the CPU ---------------------------------------------------------------

SCENES = 7  # batch 1 holds the last one out for validation: 6 training scenes, 3 per process
EPOCHS, STEPS_PER_EPOCH = 3, 3
TRAIN_FLAGS = ["--batch_size", "1", "--num_epochs", str(EPOCHS), "--max_iters_per_epoch", "6",
               "--print_freq", "1", "--save_every_steps", "2"]
AUDIT = ROOT / "tests" / "write_audit"
TIMEOUT = 600


def train_args(data_root: Path, workspace: Path) -> list:
    return ["-m", "tokengs.train", "tiny", "--workspace", str(workspace), "--dataset_kwargs", "root_path",
            str(data_root), *TRAIN_FLAGS]


def audited_env(watch: Path, records: Path) -> dict:
    return dict(ONE_THREAD_ENV, PYTHONPATH=os.pathsep.join([str(AUDIT), str(ROOT), ONE_THREAD_ENV.get("PYTHONPATH", "")]),
                TOKENGS_AUDIT_WATCH=str(watch), TOKENGS_AUDIT_OUT=str(records))


def logged(workspace: Path, tag: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workspace / "tensorboard")).Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """One process accumulating 2 batches per step, and 2 processes of 1 batch each: the same
    scenes make each optimizer step (sample i of the epoch's order goes to rank i % 2)."""
    base = tmp_path_factory.mktemp("distributed")
    data_root = base / "dl3dv"
    generate("dl3dv", data_root, SCENES, seed=1)
    one, two = base / "one", base / "two"
    done = subprocess.run([sys.executable, *train_args(data_root, one), "--gradient_accumulation_steps", "2"],
                          cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    done = subprocess.run([*two_process_launch(free_port()), *train_args(data_root, two)], cwd=ROOT,
                          env=audited_env(two, base / "audit"), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return data_root, one, two, base / "audit"


def test_two_processes_train_as_one_process_with_the_same_global_batch(distributed_runs):
    _, one, two, _ = distributed_runs
    total = EPOCHS * STEPS_PER_EPOCH
    assert ws.read_metadata(one)["step"] == ws.read_metadata(two)["step"] == total
    first, second = load_file(one / ws.MODEL_FILE), load_file(two / ws.MODEL_FILE)
    torch.manual_seed(get_preset("tiny").seed)
    initial = TokenGS(get_preset("tiny")).state_dict()
    moved = max((first[k] - initial[k]).abs().max().item() for k in first)
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    # float32 sums in another order (gloo's all-reduce vs accumulation) differ by rounding only
    assert worst < 1e-4 * moved, f"weights differ by {worst} while training moved them by {moved}"
    losses_one, losses_two = logged(one, "train/loss"), logged(two, "train/loss")
    assert sorted(losses_one) == sorted(losses_two) == list(range(1, total + 1))
    for step in losses_one:  # the logged loss is the global batch's mean, not rank 0's half
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-4)


def test_only_the_main_process_writes_to_the_workspace(distributed_runs):
    _, _, two, records = distributed_runs
    assert not (records / "rank1.txt").exists(), (records / "rank1.txt").read_text()
    written = (records / "rank0.txt").read_text()
    for name in (ws.MODEL_FILE, ws.OPTIMIZER_FILE, ws.METADATA_FILE, "events.out.tfevents", ws.CONFIG_FILE):
        assert name in written, f"rank 0 never wrote {name}"


def test_preempted_two_process_run_resumes_at_its_step_to_the_same_weights(distributed_runs, tmp_path):
    data_root, _, two, _ = distributed_runs
    workspace = tmp_path / "preempted"
    command = [*two_process_launch(free_port()), *train_args(data_root, workspace)]
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=ONE_THREAD_ENV, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while ws.read_metadata(workspace) is None:
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM preempts: every process of the job gets it
    process.wait(timeout=TIMEOUT)
    stopped = ws.read_metadata(workspace)["step"]
    assert 2 <= stopped < EPOCHS * STEPS_PER_EPOCH, (tmp_path / "log").read_text()[-3000:]
    done = subprocess.run(command, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resuming {workspace} at step {stopped} " in done.stderr
    assert ws.read_metadata(workspace)["step"] == EPOCHS * STEPS_PER_EPOCH
    ours, reference = load_file(workspace / ws.MODEL_FILE), load_file(two / ws.MODEL_FILE)
    worst = max((ours[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-6, f"the resumed run's weights differ from the uninterrupted run's by up to {worst}"


# ---- how a process of several ends -----------------------------------------------------------------

EXIT_PROGRAM = """
import atexit, sys
from tokengs.cli import entry_point

class Teardown:
    def __del__(self):
        print("interpreter teardown ran", flush=True)

kept_until_teardown = Teardown()
atexit.register(lambda: print("atexit handler ran", end=""))  # unflushed on purpose

@entry_point
def main(argv):
    print("work done", end="")
    if argv[0] == "bug":
        raise ValueError("a bug")
    sys.exit(int(argv[0]))

main()
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
@pytest.mark.parametrize("outcome, code", [("0", 0), ("3", 3), ("bug", 1)])
def test_a_process_of_several_exits_with_its_code_and_output_but_without_interpreter_teardown(
        world_size, outcome, code):
    """torch 2.14's DDP keeps gloo's threads alive past destroy_process_group, and the interpreter's
    teardown then aborts now and then: a process of a multi-process launch skips the teardown."""
    env = dict(ONE_THREAD_ENV, WORLD_SIZE=world_size, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", EXIT_PROGRAM, outcome], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == code, done.stderr
    assert done.stdout.startswith("work done") and "atexit handler ran" in done.stdout
    assert ("interpreter teardown ran" in done.stdout) == (world_size == "1")
    assert ("ValueError: a bug" in done.stderr) == (outcome == "bug")
