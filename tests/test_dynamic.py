"""The dynamic (Kubric) model end to end on synthetic Kubric-layout scenes, at the tiny size."""

import pytest
import torch

from tokengs import train
from tokengs.data.synthetic import generate
from tokengs.gaussians import Gaussians
from tokengs.models import TokenGS
from tokengs.options import get_preset


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kubric_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kubric")
    generate("kubric", root, 4, frames=8, cameras_per_scene=4, height=32, width=48)
    return root


def test_training_follows_the_auxiliary_weight_schedule(kubric_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opt = get_preset("tiny_kubric_dyn").evolve(workspace=str(tmp_path / "ws"), batch_size=1, num_epochs=3,
                                               max_iters_per_epoch=3, dataset_kwargs={"root_path": str(kubric_root)})
    assert train.run(opt)
    events = EventAccumulator(str(tmp_path / "ws" / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/dyn_aux_weight")}
    assert sorted(logged) == list(range(1, 10))  # 3 epochs of 3 steps, every step logged (print_freq 1)
    # hold 0.3 for 2 steps, then linearly to 0 over 4: the weight step s used is that of global step s - 1
    expected = {1: 0.3, 2: 0.3, 3: 0.3, 4: 0.225, 5: 0.15, 6: 0.075, 7: 0.0, 8: 0.0, 9: 0.0}
    assert logged == pytest.approx(expected, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/loss"))


def test_static_and_dynamic_gaussians_partition_the_full_set(kubric_root):
    from tokengs.data import build_dataset
    from torch.utils.data import default_collate

    opt = get_preset("tiny_kubric_dyn").evolve(dataset_kwargs={"root_path": str(kubric_root)})
    batch = default_collate([build_dataset(opt, "val")[0]])
    torch.manual_seed(0)
    model = TokenGS(opt).eval()
    with torch.no_grad():
        packed = model.forward_gaussians(batch)
    dynamic = model.dynamic_gaussian_mask()
    assert dynamic.sum() == opt.num_dynamic_gs_tokens * opt.dec_patch_size**2
    full = Gaussians.unpack(packed)
    parts = Gaussians.cat([full.select(~dynamic), full.select(dynamic)])
    assert torch.equal(parts.pack(), packed)  # static first, dynamic last: nothing lost, nothing twice
