"""Several processes without several GPUs: the sampler's sharding and the SLURM launch command."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tokengs.train import EpochSampler

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
