"""The dataset registry: the release's names, their default roots and context gaps, the
`_scaled_X` suffix, `dataset_kwargs` overrides, and `build_dataset` / `dataset_root_problems`.

| name        | default root      | reader                  | context gap (frames)          |
| dl3dv       | data/dl3dv        | subsets 1K ... 11K       | [10, 40] (release)            |
| dl3dv_eval  | data/dl3dv_eval   | flat                    | [0, 1e6] (release)            |
| kubric      | data/kubric       | splits v0 v1 v2          | [3, 23] (release)             |
| re10k       | data/re10k        | train / test chunks      | [45, 192] (ours, see below)   |

re10k's gap is pixelSplat's bounded view sampler after its warm-up (min 45, max 192 frames
between the two context views at 30 fps); its evaluation index was drawn with 45..135.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from tokengs.data.dl3dv import DL3DVReader
from tokengs.data.dl3dv_eval import DL3DVEvalReader
from tokengs.data.kubric import KubricReader
from tokengs.data.re10k import RE10KReader
from tokengs.data.scene import DataLoadError

log = logging.getLogger("tokengs.data")

STAGES = ("train", "val", "eval")


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its reader class, default root, context gap and kind.

    dynamic datasets are multi-camera videos (views x frames sampling); default_evaluation_json
    is a file name under the root read in evaluation when no evaluation_json is given.
    """

    name: str
    reader: Callable
    default_root: str
    gap: Tuple[float, float]
    dynamic: bool = False
    default_evaluation_json: Optional[str] = None
    eval_split: Optional[str] = None


REGISTRY: Dict[str, DatasetSpec] = {
    spec.name: spec for spec in (
        DatasetSpec("dl3dv", DL3DVReader, "data/dl3dv", (10, 40)),
        DatasetSpec("dl3dv_eval", DL3DVEvalReader, "data/dl3dv_eval", (0, 1e6), default_evaluation_json="evaluation.json"),
        DatasetSpec("kubric", KubricReader, "data/kubric", (3, 23), dynamic=True),
        DatasetSpec("re10k", RE10KReader, "data/re10k", (45, 192), default_evaluation_json="evaluation.json",
                    eval_split="test"),
    )
}

_SCALED = re.compile(r"^(?P<base>.+)_scaled_(?P<scale>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def parse_name(name: str) -> Tuple[DatasetSpec, float]:
    """'dl3dv_scaled_0.15' -> (the dl3dv spec, 0.15); a name without the suffix has scale 1.0."""
    match = _SCALED.match(name)
    base, scale = (match["base"], float(match["scale"])) if match else (name, 1.0)
    if base not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(REGISTRY)}, optionally with a "
                         "_scaled_X suffix (e.g. dl3dv_scaled_0.15)")
    return REGISTRY[base], scale


def _accepted(reader: Callable) -> set:
    return set(inspect.signature(reader).parameters)


def check_dataset_kwargs(names: List[str], kwargs: Dict[str, str]) -> None:
    """Raise ValueError for a dataset_kwargs key that no dataset of data_mode accepts."""
    accepted = {"evaluation_json"}
    for name in names:
        accepted |= _accepted(parse_name(name)[0].reader)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"dataset_kwargs {', '.join(unknown)} are not arguments of the readers of "
                         f"{', '.join(names)}; known: {', '.join(sorted(accepted))}")


def make_reader(spec: DatasetSpec, kwargs: Dict[str, str], stage: str):
    """The spec's reader with the kwargs it accepts (dataset_kwargs are shared by all of data_mode)."""
    arguments = {k: v for k, v in kwargs.items() if k in _accepted(spec.reader)}
    arguments.setdefault("root_path", spec.default_root)
    if stage == "eval" and spec.eval_split and "split" not in kwargs:
        arguments["split"] = spec.eval_split
    return spec.reader(**arguments)


def evaluation_json_path(spec: DatasetSpec, kwargs: Dict[str, str], root: Path) -> Optional[Path]:
    """The evaluation JSON to use: dataset_kwargs' evaluation_json, else the spec's default file
    under the root when it exists, else None (views drawn per index)."""
    given = kwargs.get("evaluation_json")
    if given not in (None, "", "None", "null"):
        return Path(given)
    if spec.default_evaluation_json and (root / spec.default_evaluation_json).is_file():
        return root / spec.default_evaluation_json
    return None


def load_evaluation_json(path: Path) -> Dict[str, Optional[dict]]:
    """{scene: {"context": [...], "target": [...]} or null}; null entries are scenes to skip."""
    try:
        index = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataLoadError(f"evaluation JSON {path} does not exist; fix --dataset_kwargs evaluation_json") from None
    except ValueError as exc:
        raise DataLoadError(f"evaluation JSON {path} is not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise DataLoadError(f"evaluation JSON {path} must map scene names to {{context, target}}")
    for scene, entry in index.items():
        if entry is not None and not (isinstance(entry, dict) and "context" in entry and "target" in entry):
            raise DataLoadError(f"evaluation JSON {path}: entry {scene!r} needs 'context' and 'target' lists")
    return index


def build_dataset(opt, split: str):
    """The torch Dataset of a stage: 'train' (data_mode mixed with repeats, the last batch_size
    scenes of each dataset held out), 'val' (those held-out scenes) or 'eval'."""
    from tokengs.data.provider import SceneDataset, Source

    if split not in STAGES:
        raise ValueError(f"split={split!r}; use one of {', '.join(STAGES)}")
    kwargs = dict(opt.dataset_kwargs or {})
    names = [name for name, _ in opt.data_mode]
    check_dataset_kwargs(names, kwargs)
    sources = []
    for name, repeat in opt.data_mode:
        spec, scale = parse_name(name)
        reader = make_reader(spec, kwargs, split)
        scenes = reader.scenes()
        if not scenes:
            raise DataLoadError(f"dataset {name}: no scenes under {reader.root} (layout: data/DATA.md; "
                                f"`python -m tokengs.data.synthetic --layout {spec.name} --out {reader.root}` makes some)")
        evaluation = None
        if split == "eval":
            path = evaluation_json_path(spec, kwargs, reader.root)
            if path is not None:
                evaluation = load_evaluation_json(path)
                scenes = _scenes_of_evaluation(scenes, evaluation, path, reader.root)
        elif split == "train":
            scenes = scenes[:-opt.batch_size]
            if not scenes:
                raise DataLoadError(f"dataset {name}: {len(reader.scenes())} scenes under {reader.root}, all held out "
                                    f"for validation (the last batch_size={opt.batch_size}); add scenes or lower "
                                    "--batch_size")
        else:
            scenes = scenes[-opt.batch_size:]
        sources.append(Source(name=name, spec=spec, reader=reader, scale=scale, scenes=scenes,
                              repeat=repeat if split == "train" else 1, evaluation=evaluation))
    return SceneDataset(opt, sources, split)


def _scenes_of_evaluation(scenes, evaluation: dict, path: Path, root: Path):
    """The scenes the evaluation JSON names (non-null entries), in the JSON's order; every one must be on disk."""
    by_name = {ref.name: ref for ref in scenes}
    wanted = [name for name, entry in evaluation.items() if entry is not None]
    absent = [name for name in wanted if name not in by_name]
    if absent:
        raise DataLoadError(f"evaluation JSON {path} names {len(absent)} scene(s) not under {root} "
                            f"(first: {', '.join(absent[:3])}); the benchmark's numbers need every one of them")
    return [by_name[name] for name in wanted]


def dataset_root_problems(opt) -> List[str]:
    """Cheap start-up checks (listing only, no archive opened) of every dataset of data_mode:
    unknown names or kwargs, missing roots, no scenes, evaluation JSONs, held-out scenes."""
    problems = []
    kwargs = dict(opt.dataset_kwargs or {})
    names = [name for name, _ in opt.data_mode]
    try:
        check_dataset_kwargs(names, kwargs)
    except ValueError as exc:
        return [str(exc)]
    stage = "eval" if opt.evaluating else "train"
    for name in names:
        spec, _ = parse_name(name)
        try:
            reader = make_reader(spec, kwargs, stage)
        except (TypeError, ValueError) as exc:
            problems.append(f"dataset {name}: {exc}")
            continue
        if not reader.root.is_dir():
            problems.append(f"dataset {name}: root {reader.root} does not exist; put the data there (data/DATA.md), "
                            f"pass --dataset_kwargs root_path DIR, or make synthetic scenes with `python -m "
                            f"tokengs.data.synthetic --layout {spec.name} --out {reader.root} --scenes 8`")
            continue
        try:
            scenes = reader.scenes()
        except Exception as exc:  # a damaged index is reported, not raised, at start-up
            problems.append(f"dataset {name}: cannot list scenes under {reader.root} ({exc})")
            continue
        if not scenes:
            problems.append(f"dataset {name}: no scenes under {reader.root} in its layout (data/DATA.md); pass "
                            "--dataset_kwargs root_path DIR where they are")
            continue
        if stage == "train" and len(scenes) <= opt.batch_size:
            problems.append(f"dataset {name}: {len(scenes)} scenes under {reader.root}; training holds out the last "
                            f"batch_size={opt.batch_size} for validation and needs at least one more")
        if stage == "eval":
            path = evaluation_json_path(spec, kwargs, reader.root)
            if path is not None:
                try:
                    _scenes_of_evaluation(scenes, load_evaluation_json(path), path, reader.root)
                except DataLoadError as exc:
                    problems.append(f"dataset {name}: {exc}")
    return problems
