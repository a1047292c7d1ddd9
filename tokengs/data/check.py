"""Read every scene of a dataset root, or one capture, and report each problem before a long run.

    python -m tokengs.data.check NAME --root R [--json OUT] [--preset P]

NAME is a registry name (a `_scaled_X` suffix is accepted), and every subset or split under R is
read; or a capture format (colmap, nerfstudio, instant_ngp: `tokengs.data.captures`), and R is
that capture (a COLMAP model or the folder above sparse/, a transforms.json or its folder), read
as a dataset of one scene: its frames must cover the preset's context views, and its images must
all be posed and its lenses ones OpenCV undistorts. Problems: an unreadable archive, a missing
frame or file, an image that does not decode, an image size that disagrees with the metadata
(aspect ratio off by more than one pixel) or frames of mixed size, a non-finite or degenerate
pose, fewer frames than sampling needs (the dataset's minimum context gap + 1, and the preset's
context views), evaluation-JSON indices out of range.
Exits 1 when there is any, else 0. `--json OUT` writes {"dataset", "root", "scenes": [{"name",
"path", "frames", "image_hw", "c2w" (first frame, OpenCV), "intrinsics" (fx, fy, cx, cy)}],
"problems": [{"scene", "path", "problem"}]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tokengs.cli import CommandParser, entry_point
from tokengs.data.captures import FORMATS, CaptureReader
from tokengs.data.registry import evaluation_json_path, load_evaluation_json, make_reader, parse_name
from tokengs.data.scene import DataLoadError, SceneError

CAPTURE_FORMATS = tuple(f for f in FORMATS if f != "dl3dv")  # a DL3DV zip is checked as the dl3dv layout


def _readers(spec, root: Path):
    """One reader per split for layouts whose splits are separate datasets (re10k), else one."""
    if spec.name == "re10k":
        return [make_reader(spec, {"root_path": str(root), "split": split}, "train") for split in ("train", "test")
                if (root / split).is_dir()]
    return [make_reader(spec, {"root_path": str(root)}, "train")]


def check_scene(reader, ref, min_frames: int, evaluation: Optional[dict]) -> Tuple[Optional[dict], List[str]]:
    """(the scene's JSON record or None when it cannot be opened, its problems)."""
    problems: List[str] = []
    try:
        scene = reader.open(ref)
    except SceneError as exc:
        return None, [str(exc)]
    except Exception as exc:  # anything else a damaged file raises is a problem of this scene
        return None, [f"{ref.path}: {type(exc).__name__}: {exc}"]
    with scene:
        meta = scene.meta
        problems += meta.problems()
        frames = meta.grid[1] if meta.grid else meta.num_frames
        if frames < min_frames:
            problems.append(f"{frames} frames{' per camera' if meta.grid else ''}, fewer than the {min_frames} "
                            "that view sampling needs")
        if evaluation is not None and evaluation.get(meta.name) is not None:
            entry = evaluation[meta.name]
            bad = [i for i in list(entry["context"]) + list(entry["target"]) if not 0 <= int(i) < meta.num_frames]
            if bad:
                problems.append(f"the evaluation JSON asks for frames {sorted(set(bad))} of {meta.num_frames}")
        for i in range(meta.num_frames):
            if i in meta.missing:
                continue  # already reported by meta.problems()
            # Kubric stores a depth file per frame; the benchmark derives every frame's depth from
            # one points file, so reading it once (with the first frame) checks it.
            try:
                scene.views([i], depth=scene.has_depth and (meta.grid is not None or i == 0))
            except SceneError as exc:
                problems.append(str(exc))
            except Exception as exc:
                problems.append(f"{meta.frame_names[i]}: {type(exc).__name__}: {exc}")
        record = {"name": meta.name, "path": str(meta.path), "frames": meta.num_frames,
                  "image_hw": list(meta.image_hw), "c2w": meta.c2ws[0].tolist() if meta.num_frames else None,
                  "intrinsics": meta.intrinsics[0].tolist() if meta.num_frames else None}
    return record, problems


def _check_scenes(reader, refs, min_frames: int, evaluation: Optional[dict], report: Dict) -> None:
    """Check each scene of refs; their records and problems go into the report."""
    for ref in refs:
        record, scene_problems = check_scene(reader, ref, min_frames, evaluation)
        if record is not None:
            report["scenes"].append(record)
        report["problems"] += [{"scene": ref.name, "path": str(ref.path), "problem": p} for p in scene_problems]


def check_capture(fmt: str, root: Path, num_input_views: int = 2) -> Dict:
    """The report of the capture at root, in format fmt, as a dataset of one scene."""
    report: Dict = {"dataset": fmt, "root": str(root), "scenes": [], "problems": []}
    reader = CaptureReader(fmt, root)
    refs = reader.scenes()
    if not refs:
        report["problems"].append({"scene": None, "path": str(root), "problem": "no such file or folder"})
    _check_scenes(reader, refs, num_input_views, None, report)
    return report


def check(name: str, root: Path, num_input_views: int = 2) -> Dict:
    """The report of every scene of dataset `name` under root, or of the capture at root when
    name is a capture format (see the module docstring)."""
    if name in CAPTURE_FORMATS:
        return check_capture(name, root, num_input_views)
    spec, _ = parse_name(name)
    report: Dict = {"dataset": name, "root": str(root), "scenes": [], "problems": []}
    problems = report["problems"]
    if not root.is_dir():
        problems.append({"scene": None, "path": str(root), "problem": "dataset root does not exist"})
        return report
    min_frames = max(int(spec.gap[0]) + 1, 1 if spec.dynamic else num_input_views)
    evaluation = None
    json_path = evaluation_json_path(spec, {}, root)
    if json_path is not None:
        try:
            evaluation = load_evaluation_json(json_path)
        except DataLoadError as exc:
            problems.append({"scene": None, "path": str(json_path), "problem": str(exc)})
    readers = _readers(spec, root)
    found = 0
    for reader in readers:
        try:
            refs = sorted(reader.scenes(), key=lambda r: (str(r.path), r.name))  # one chunk load per chunk
        except Exception as exc:
            problems.append({"scene": None, "path": str(reader.root), "problem": f"cannot list scenes ({exc})"})
            continue
        if spec.name == "re10k" and not reader.index_path.is_file():
            problems.append({"scene": None, "path": str(reader.index_path),
                             "problem": "missing index.json (scene key -> chunk file)"})
        found += len(refs)
        _check_scenes(reader, refs, min_frames, evaluation, report)
    if found == 0:
        problems.append({"scene": None, "path": str(root), "problem": f"no {spec.name} scenes in the layout of "
                                                                      "data/DATA.md"})
    if evaluation is not None:
        listed = {r["name"] for r in report["scenes"]} | {p["scene"] for p in problems}
        absent = [s for s, entry in evaluation.items() if entry is not None and s not in listed]
        if absent:
            problems.append({"scene": None, "path": str(json_path), "problem": f"{len(absent)} scene(s) of the "
                             f"evaluation JSON are not under the root (first: {', '.join(absent[:3])})"})
    return report


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m tokengs.data.check`: 0 when every scene reads, 1 when the report lists problems;
    a wrong flag, an unknown preset or dataset, or a root that does not exist: one line, exit 2."""
    from tokengs.options import OptionsError, get_preset
    from tokengs.startup import raise_problems

    parser = CommandParser(prog="python -m tokengs.data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="registry name: dl3dv, dl3dv_eval, re10k or kubric (_scaled_X accepted); or a "
                                     "capture format: colmap, nerfstudio or instant_ngp")
    parser.add_argument("--root", required=True, help="dataset root, or the capture")
    parser.add_argument("--json", help="write the per-scene report here")
    parser.add_argument("--preset", help="count the context views of this preset in the frames a scene needs")
    args = parser.parse_args(argv)
    problems, num_input_views = [], 2
    if args.preset:
        try:
            num_input_views = get_preset(args.preset).num_input_views
        except OptionsError as exc:
            problems.append(f"--preset: {exc}")
    if args.name not in CAPTURE_FORMATS:
        try:
            parse_name(args.name)
        except ValueError as exc:
            problems.append(str(exc))
    if not Path(args.root).exists():
        problems.append(f"--root {args.root} does not exist")
    raise_problems(problems, "checking")
    report = check(args.name, Path(args.root), num_input_views)
    for problem in report["problems"]:
        print(f"PROBLEM {problem['scene'] or '-'}: {problem['problem']}")
    print(f"{args.name} at {args.root}: {len(report['scenes'])} scene(s) read, {len(report['problems'])} problem(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
