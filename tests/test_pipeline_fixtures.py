"""The evaluation-mode input pipeline reproduces the release's pipeline fixtures (<= 1e-5 relative),
read through the release adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tokengs.data.provider import preprocess_views
from tokengs.data.release_batch import to_release_dict
from tokengs.data.types import Batch
from tokengs.options import Options

FIXTURES = ("first_cam_constant", "mean_cam_constant")


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", FIXTURES)
def test_pipeline_fixture(reference_dir, name):
    tensors = load_file(str(reference_dir / f"pipeline_{name}.safetensors"))
    settings = json.loads((reference_dir / f"pipeline_{name}.options.json").read_text())
    opt = Options(evaluating=True, **{k: v for k, v in settings.items() if not k.startswith("_")})
    assert tuple(tensors["in.rgbs"].shape[-2:]) == tuple(settings["_raw_hw"])
    views = preprocess_views(opt, tensors["in.rgbs"], None, tensors["in.depths"], tensors["in.c2ws"],
                             tensors["in.intrinsics"], tensors["in.timesteps"], settings.get("_scene_scale", 0.15))
    out = release_sample(views, opt)
    keys = [k for k in tensors if k.startswith("out.")]
    assert keys
    errors = {}
    for key in keys:
        ours, ref = out[key[4:]], tensors[key]
        assert ours.shape == ref.shape, key
        errors[key] = relative_error(ours, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{worst}: {errors[worst]:.3g} ({errors})"
    assert not bool(out["has_mask"])


def release_sample(views, opt: Options) -> dict:
    """One scene's views as the release's sample: its batch dict without the batch dim."""
    release = to_release_dict(Batch.from_views(views, opt.num_input_views, ["fixture"]), opt)
    return {key: value[0] for key, value in release.items()}


def test_pipeline_fixture_training_without_reflection_is_evaluation(reference_dir):
    """Training mode without random_reflect computes the same numbers (augmentation is the only difference)."""
    tensors = load_file(str(reference_dir / "pipeline_mean_cam_constant.safetensors"))
    settings = json.loads((reference_dir / "pipeline_mean_cam_constant.options.json").read_text())
    opt = Options(random_reflect=False, **{k: v for k, v in settings.items() if not k.startswith("_")})
    views = preprocess_views(opt, tensors["in.rgbs"], None, None, tensors["in.c2ws"], tensors["in.intrinsics"],
                             tensors["in.timesteps"], 0.15, training=True, generator=torch.Generator().manual_seed(0))
    assert relative_error(release_sample(views, opt)["input"], tensors["out.input"]) <= 1e-5
