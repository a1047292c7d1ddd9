"""Shared test helpers: where the release's reference fixtures live, running on one thread, and
target views built from images and cameras."""

import os
import socket
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from tokengs.data.types import Views

ROOT = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    """The shared/ folder that holds the release's reference fixtures: $TOKENGS_SHARED, else the
    first of ../shared (beside the checkout) and ./shared (inside it, on the GPU machine) that has them.
    The fixtures' own terms keep them out of the repository, so a clone elsewhere points here."""
    if os.environ.get("TOKENGS_SHARED"):
        return Path(os.environ["TOKENGS_SHARED"])
    return next((p for p in (ROOT.parent / "shared", ROOT / "shared") if (p / "fixtures" / "reference").is_dir()),
                ROOT.parent / "shared")


SHARED = _shared()
REFERENCE = SHARED / "fixtures" / "reference"
# TOKENGS_REQUIRE_FIXTURES=1: a missing fixture fails the test instead of skipping it
_REQUIRED = os.environ.get("TOKENGS_REQUIRE_FIXTURES", "") not in ("", "0")


def shared_file(path: Path) -> Path:
    """`path` under shared/, or skip (fail with TOKENGS_REQUIRE_FIXTURES=1) saying how to provide it."""
    if not path.exists():
        message = (f"release reference fixtures not found at {path}: put the shared/ folder beside the "
                   "checkout, or set TOKENGS_SHARED to it")
        if _REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def reference_dir() -> Path:
    return shared_file(REFERENCE)


# The tiny models of the tests run fastest on one intra-op thread; beside another busy process on
# a 2-core machine, two OpenMP threads wait on each other at every op and make the pure-PyTorch
# rasterizer up to ~100x slower. ONE_THREAD_ENV is the same for subprocesses, and hides any GPU
# from them: the runs they check (bit-identical resumes, gloo process groups) are the CPU path's,
# on a GPU host too, where CUDA kernels would make them nondeterministic or put two ranks on one GPU.
ONE_THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a whole test module (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A free TCP port for a multi-process launch, so that concurrent runs on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launch(port: int) -> list:
    """`accelerate launch` of 2 processes on the CPU. Its --cpu launcher starts ONE process (more
    need mpirun); --multi_gpu starts them with torchrun, and the Accelerator, finding no GPU, joins
    them over gloo."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port)]


def target_views(images: torch.Tensor, w2c: torch.Tensor, intrinsics: torch.Tensor,
                 masks: Optional[torch.Tensor] = None, has_mask: Optional[torch.Tensor] = None) -> Views:
    """Views [B, V] for the loss and the renderer: images, cameras and optional masks (has_mask [B]
    per scene; without masks all ones, applying nowhere). Times 0, rays zero: neither reads them."""
    lead = images.shape[:2]
    if masks is None:
        masks, has_mask = torch.ones_like(images[:, :, :1]), torch.zeros(lead[0], dtype=torch.bool)
    return Views(images=images, masks=masks, has_mask=has_mask[:, None].expand(lead), w2c=w2c, intrinsics=intrinsics,
                 timesteps=torch.zeros(lead), rays=torch.zeros(*lead, 6, *images.shape[-2:], dtype=images.dtype))
