"""A training workspace W on disk: config, the latest checkpoint, the COMPLETE marker.

The checkpoint is the release's four files side by side, W/model.safetensors, W/optimizer.pth,
W/scheduler.pth and W/metadata.json, replaced together by a two-phase commit so that a kill at
any instant leaves one whole checkpoint, never a mix of two:
  1. every file is written to `NAME.tmp` and fsynced;
  2. `checkpoint.pending` (the list of files and the step) is written atomically: the commit point;
  3. each `NAME.tmp` is renamed over `NAME`, metadata.json last; then the pending file goes.
On start-up, `recover` finishes a committed save (rolls forward) or discards an uncommitted one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pth"
SCHEDULER_FILE = "scheduler.pth"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.yaml"
COMPLETE_FILE = "COMPLETE"
PENDING_FILE = "checkpoint.pending"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, METADATA_FILE)


class WorkspaceError(RuntimeError):
    """The workspace cannot be used as it is; the message names the file and the fix."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_durably(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(path)` and fsync the result (raises OSError on a full disk, leaving `path` partial)."""
    write(path)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a single file atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_file_durably(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(workspace: str | Path, writers: Dict[str, Callable[[Path], None]], step: int) -> None:
    """Replace the workspace checkpoint with the files that `writers` (name -> write(path)) produce."""
    workspace = Path(workspace)
    names = [n for n in CHECKPOINT_FILES if n in writers] + [n for n in writers if n not in CHECKPOINT_FILES]
    if METADATA_FILE in names:  # metadata is what a resume reads first: it goes last
        names.remove(METADATA_FILE)
        names.append(METADATA_FILE)
    tmps = [workspace / (n + ".tmp") for n in names]
    try:
        for name, tmp in zip(names, tmps):
            write_file_durably(tmp, writers[name])
        _fsync_dir(workspace)
        atomic_write(workspace / PENDING_FILE,
                     lambda p: p.write_text(json.dumps({"step": step, "files": names})))
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    _roll_forward(workspace, names)


def _roll_forward(workspace: Path, names: list[str]) -> None:
    for name in names:
        tmp = workspace / (name + ".tmp")
        if tmp.exists():
            os.replace(tmp, workspace / name)
    _fsync_dir(workspace)
    (workspace / PENDING_FILE).unlink(missing_ok=True)
    _fsync_dir(workspace)


def recover(workspace: str | Path) -> None:
    """Finish or discard a checkpoint save that a kill interrupted."""
    workspace = Path(workspace)
    pending = workspace / PENDING_FILE
    if pending.exists():
        info = json.loads(pending.read_text())
        log.warning("finishing the checkpoint save of step %s that was interrupted in %s", info["step"], workspace)
        _roll_forward(workspace, info["files"])
    for tmp in workspace.glob("*.tmp"):
        log.warning("discarding %s, left by an interrupted checkpoint save (the previous checkpoint is intact)", tmp)
        tmp.unlink()


def read_metadata(workspace: str | Path) -> Dict[str, Any] | None:
    path = Path(workspace) / METADATA_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WorkspaceError(f"{path} is not valid JSON ({exc}); restore it or start a new --workspace") from None


def forget_checkpoint(workspace: str | Path) -> None:
    """Make a completed workspace train again from the start (--retrain).

    Only metadata.json makes a checkpoint resumable, so it goes, and the other files are replaced
    by the first save; the COMPLETE marker goes last, so a kill in between leaves a workspace that
    still reads as complete and a repeated --retrain finishes the job.
    """
    workspace = Path(workspace)
    (workspace / METADATA_FILE).unlink(missing_ok=True)
    _fsync_dir(workspace)
    (workspace / COMPLETE_FILE).unlink(missing_ok=True)
    _fsync_dir(workspace)


def missing_checkpoint_files(workspace: str | Path) -> list[str]:
    return [n for n in CHECKPOINT_FILES if not (Path(workspace) / n).exists()]
