"""The CPU thread count of training, evaluation and the demo."""

import os
import subprocess
import sys

import pytest

from tokengs import threads


def test_half_the_usable_cores_unless_told(monkeypatch):
    monkeypatch.delenv("TOKENGS_CPU_THREADS", raising=False)
    for cores, expected in ((1, 1), (2, 1), (3, 1), (8, 4)):
        monkeypatch.setattr(threads, "usable_cores", lambda cores=cores: cores)
        assert threads.cpu_threads() == expected
    monkeypatch.setenv("TOKENGS_CPU_THREADS", "3")
    assert threads.cpu_threads() == 3
    monkeypatch.setenv("TOKENGS_CPU_THREADS", "many")
    with pytest.raises(ValueError, match="TOKENGS_CPU_THREADS='many' is not a whole number"):
        threads.cpu_threads()


@pytest.mark.parametrize("env, expected", [({"TOKENGS_CPU_THREADS": "1"}, 1),
                                           ({"TOKENGS_CPU_THREADS": "1", "OMP_NUM_THREADS": "2"}, 2)])
def test_configure_sets_torch_threads_and_leaves_an_explicit_omp_count(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TOKENGS_CPU_THREADS")}
    script = ("from tokengs.threads import configure_cpu_threads; configure_cpu_threads(); "
              "import torch; print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", script], env={**base, **env, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) == expected
