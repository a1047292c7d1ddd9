"""How many threads torch uses on the CPU.

torch's default, one OpenMP thread per core, stalls at every operation's barrier when another
process holds one of the cores: measured on 2 cores with one busy process beside it, a demo
training step went from 1.11 to 3.57 s (3.2x; 21x while a test suite also ran) on 2 threads, and
from 1.43 to 1.47 s on 1 thread (scripts/cpu_step_time.py). Half the cores keeps a step's time
whatever else runs.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("tokengs")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads() -> int:
    """torch threads for CPU work: $TOKENGS_CPU_THREADS, else half the usable cores (at least 1)."""
    given = os.environ.get("TOKENGS_CPU_THREADS")
    if given:
        try:
            return max(1, int(given))
        except ValueError:
            raise ValueError(f"TOKENGS_CPU_THREADS={given!r} is not a whole number of threads") from None
    return max(1, usable_cores() // 2)


def configure_cpu_threads() -> None:
    """On a machine without CUDA, give torch cpu_threads() threads, unless OMP_NUM_THREADS says otherwise."""
    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    threads = cpu_threads()
    torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread(s) of %d cores (TOKENGS_CPU_THREADS sets another count)", threads,
             usable_cores())
