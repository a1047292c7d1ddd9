"""Build (and run) the `accelerate launch` command of one SLURM task: one task per node.

    srun python scripts/slurm_launch.py --gpus_per_node 8 -- finetune_dl3dv_6view --workspace W

reads SLURM_NNODES, SLURM_NODEID and SLURM_JOB_NODELIST (the first node hosts rank 0) and runs
accelerate with the node rank and main address filled in. `--dry_run` prints the command instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def first_node(nodelist: str) -> str:
    """'gpu[03-05,09],cpu1' -> 'gpu03' (SLURM's compressed host list; scontrol is used when present)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def launch_command(env: dict, gpus_per_node: int, config_file: str, port: int, module: str, args: list[str]) -> list[str]:
    try:
        nodes, node_id, nodelist = int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"]), env["SLURM_JOB_NODELIST"]
    except KeyError as missing:
        raise SystemExit(f"error: {missing.args[0]} is not set: run this under srun/sbatch, one task per node")
    return ["accelerate", "launch", "--config_file", config_file, "--num_machines", str(nodes),
            "--num_processes", str(nodes * gpus_per_node), "--machine_rank", str(node_id),
            "--main_process_ip", first_node(nodelist), "--main_process_port", str(port),
            "-m", module, *args]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--config_file", default="acc_configs/multinode_example.yaml")
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--module", default="tokengs.train", help="tokengs.train or tokengs.evaluate")
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the preset and its flags")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    command = launch_command(dict(os.environ), ns.gpus_per_node, ns.config_file, ns.port, ns.module, args)
    if ns.dry_run:
        print(shlex.join(command))
        return
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main(sys.argv[1:])
