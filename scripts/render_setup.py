"""What the render scripts (render_trajectory.py, render_kubric_dyn.py) share: options from a preset
or a workspace (and a DL3DV root read in the layout found there), start-up checks that collect
every problem (exit 2), and the model and evaluation scenes to render."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

from tokengs.cli import fail
from tokengs.options import Options, OptionsError

# DL3DV's two folder layouts (data/DATA.md): a model trained on one renders scenes of the other.
DL3DV_LAYOUTS = ("dl3dv", "dl3dv_eval")


def rendering_options(ckpt: Path, preset: Optional[str], workspace: Optional[str], dataset_kwargs: dict,
                      problems: list[str]) -> Optional[Options]:
    """The options of a preset (None: the released checkpoint's own, by its file name) or of a
    training workspace's config.yaml, as reconstruct resolves them, set up to render evaluation
    scenes with the given dataset kwargs (None values are left as they are)."""
    from tokengs.reconstruct import resolve_options

    opt, _, _ = resolve_options(str(ckpt), preset, workspace, problems)
    if opt is None:
        return None
    kwargs = dict(opt.dataset_kwargs or {})
    kwargs.update({k: v for k, v in dataset_kwargs.items() if v is not None})
    return opt.evolve(evaluating=True, use_input_supervision=False, batch_size=1, dataset_kwargs=kwargs)


def in_layout_of_root(opt: Options, problems: list[str]) -> Optional[Options]:
    """opt with each DL3DV dataset read in the layout found at its root, keeping the scale suffix:
    a training workspace (dl3dv) renders benchmark scenes (dl3dv_eval) and back, with no preset to
    guess. None, with a problem naming the fix, when the root holds neither layout (the dataset
    checks would only repeat it, less precisely)."""
    from tokengs.data.registry import make_reader, parse_name

    data_mode = []
    for name, repeat in opt.data_mode:
        try:
            spec, _ = parse_name(name)
        except ValueError:
            spec = None  # an unknown name: the dataset checks report it
        if spec is not None and spec.name in DL3DV_LAYOUTS:
            root = make_reader(spec, opt.dataset_kwargs, "eval").root
            found = dl3dv_layouts_at(root)
            if not found:
                problems.append(f"dataset {name}: no DL3DV scenes under {root} in either layout ({root}/<subset>/"
                                f"<scene>.zip, or the benchmark's {root}/<scene>.zip holding <scene>/gaussian_splat/); "
                                f"{root_fix(root)} (data/DATA.md)")
                return None
            if spec.name not in found:
                renamed = found[0] + name[len(spec.name):]
                print(f"{root} holds {found[0]} scenes: reading it as {renamed} (the options name {name})")
                name = renamed
        data_mode.append((name, repeat))
    return opt.evolve(data_mode=tuple(data_mode))


def root_fix(root: Path) -> str:
    """What to pass instead of a root without DL3DV scenes: its parent when root is one subset
    folder of the training layout (a likely slip), else the folder that holds them."""
    if root.name and dl3dv_layouts_at(root.parent) == ["dl3dv"]:
        return f"pass --root {root.parent}"
    return "pass --root the folder that holds them"


def dl3dv_layouts_at(root: Path) -> list[str]:
    """The DL3DV layouts with scenes under root: dl3dv (zips in subset folders 1K ...), dl3dv_eval
    (zips directly under root holding the benchmark's gaussian_splat/transforms.json)."""
    from tokengs.data.dl3dv import DL3DVReader
    from tokengs.data.dl3dv_eval import TRANSFORMS, DL3DVEvalReader

    found = ["dl3dv"] if DL3DVReader(str(root)).scenes() else []
    benchmark = DL3DVEvalReader(str(root)).scenes()
    # flat zips alone do not tell: a subset folder of the training layout has them too
    if benchmark and _holds_member(benchmark[0].path, TRANSFORMS):
        found.append("dl3dv_eval")
    return found


def _holds_member(archive: Path, suffix: str) -> bool:
    try:
        with zipfile.ZipFile(archive) as opened:
            return any(member.endswith(suffix) for member in opened.namelist())
    except (OSError, zipfile.BadZipFile):
        return False  # a damaged archive shows no layout; `python -m tokengs.data.check` names it


def load_for_rendering(opt: Optional[Options], ckpt: Path, problems: list[str], what: str,
                       extra_checks: Callable[[Options], list[str]] = lambda opt: []):
    """Check everything (dataset roots, checkpoint, extra_checks), exit 2 listing every problem
    found; then the model on the best device, in eval mode, and the evaluation dataset."""
    from tokengs.data import build_dataset
    from tokengs.models.checkpoint import CheckpointError, checkpoint_file_problems
    from tokengs.startup import build_model, model_and_data_problems, raise_problems

    try:
        # without options (their problem is listed already) the checkpoint file is checked all the same
        checks = (model_and_data_problems(opt, ckpt, "--ckpt") + extra_checks(opt) if opt is not None
                  else checkpoint_file_problems(ckpt, "--ckpt"))
        raise_problems(problems + checks, what)
        model = build_model(opt, ckpt)
    except (OptionsError, CheckpointError) as exc:
        fail(str(exc))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), build_dataset(opt, "eval"), device


def scene_range(dataset, scene_idx: int, n_scenes: int) -> range:
    last = min(scene_idx + n_scenes, len(dataset))
    if scene_idx >= last:
        fail(f"--scene_idx {scene_idx} is past the {len(dataset)} scenes of the dataset")
    return range(scene_idx, last)
