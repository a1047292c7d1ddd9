"""What the render scripts share: options from a preset or a workspace, start-up checks that
collect every problem (exit 2), and the model and evaluation scenes to render."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from tokengs.cli import fail
from tokengs.options import Options, OptionsError, get_preset


def rendering_options(preset: Optional[str], workspace: Optional[str], dataset_kwargs: dict,
                      problems: list[str]) -> Optional[Options]:
    """The options of a preset or of a training workspace's config.yaml, set up to render
    evaluation scenes with the given dataset kwargs (None values are left as they are)."""
    try:
        if workspace:
            config = Path(workspace) / "config.yaml"
            if not config.is_file():
                problems.append(f"--workspace {workspace}: no config.yaml there (a training workspace writes one)")
                return None
            opt = Options.load_yaml(config)
        else:
            opt = get_preset(preset)
    except (OptionsError, KeyError, ValueError) as exc:
        problems.append(f"{'--workspace ' + workspace if workspace else '--preset ' + str(preset)}: {exc}")
        return None
    kwargs = dict(opt.dataset_kwargs or {})
    kwargs.update({k: v for k, v in dataset_kwargs.items() if v is not None})
    return opt.evolve(evaluating=True, use_input_supervision=False, batch_size=1, dataset_kwargs=kwargs)


def load_for_rendering(opt: Optional[Options], ckpt: Path, problems: list[str], what: str,
                       extra_checks: Callable[[Options], list[str]] = lambda opt: []):
    """Check everything (dataset roots, checkpoint, extra_checks), exit 2 listing every problem
    found; then the model on the best device, in eval mode, and the evaluation dataset."""
    from tokengs.data import build_dataset, dataset_root_problems
    from tokengs.models import TokenGS, load_model_checkpoint
    from tokengs.models.checkpoint import CheckpointError, checkpoint_file_problems

    problems = problems + checkpoint_file_problems(ckpt, "--ckpt")
    if opt is not None:
        problems += dataset_root_problems(opt) + extra_checks(opt)
    if problems:
        fail(f"fix {len(problems)} problem(s) before {what}:\n  - " + "\n  - ".join(problems))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = TokenGS(opt)
    try:
        load_model_checkpoint(model, ckpt, opt, strict=opt.strict_checkpoint_loading)
    except CheckpointError as exc:
        fail(str(exc))
    return model.to(device).eval(), build_dataset(opt, "eval"), device


def scene_range(dataset, scene_idx: int, n_scenes: int) -> range:
    last = min(scene_idx + n_scenes, len(dataset))
    if scene_idx >= last:
        fail(f"--scene_idx {scene_idx} is past the {len(dataset)} scenes of the dataset")
    return range(scene_idx, last)
