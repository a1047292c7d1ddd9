"""A training workspace W on disk: config, the latest checkpoint, the COMPLETE marker.

The checkpoint is the release's four files side by side, W/model.safetensors, W/optimizer.pth,
W/scheduler.pth and W/metadata.json, replaced together by a two-phase commit so that a kill at
any instant leaves one whole checkpoint, never a mix of two:
  1. every file is written to `NAME.tmp` and fsynced;
  2. `checkpoint.pending` (the list of files and the step) is written atomically: the commit point;
  3. each `NAME.tmp` is renamed over `NAME`, metadata.json last; then the pending file goes.
On start-up, `recover` finishes a committed save (rolls forward) or discards an uncommitted one.

One process writes a workspace at a time: `claimed` holds the lock file W/.lock (JSON: host, pid,
since when; created with O_EXCL and held with flock where the file system has it) while a run
works there. A second run refuses, naming the holder; the lock of a process that is gone is taken
over (`lock_workspace` says when that can be known).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pickle
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from tokengs.errors import UserError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pth"
SCHEDULER_FILE = "scheduler.pth"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.yaml"
COMPLETE_FILE = "COMPLETE"
PENDING_FILE = "checkpoint.pending"
LOCK_FILE = ".lock"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, METADATA_FILE)
# Faults of the disk itself, which any writer may meet: full, over quota, failing.
DISK_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how safetensors' writer names one


class WorkspaceError(UserError, RuntimeError):
    """The workspace cannot be used as it is; the message names the file and the fix."""


class WorkspaceBusy(WorkspaceError):
    """Another process holds the workspace's lock."""


def disk_fault(exc: BaseException) -> Optional[OSError]:
    """The full disk, exceeded quota or I/O error behind exc, however the layer that met it
    reported it: an OSError, one that exc was raised from or during (torch.save into a Python
    file raises a RuntimeError while handling the file's OSError), or safetensors' text
    "... (os error 28)". None when exc has no such cause."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        match = None if isinstance(exc, OSError) else _OS_ERROR_IN_TEXT.search(str(exc))
        code = exc.errno if isinstance(exc, OSError) else int(match[1]) if match else None
        if code in DISK_FAULTS:
            return exc if isinstance(exc, OSError) else OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def reading(path: Path, fix: str) -> Iterator[None]:
    """Garbage met while the block reads the workspace's own file `path` (undecodable, keys or
    types that are not ours, a torch file that does not load) becomes one WorkspaceError naming
    the file and the fix."""
    try:
        yield
    except (ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]  # torch's messages run over many lines
        raise WorkspaceError(f"{path} is damaged ({type(exc).__name__}: {reason}); {fix}") from exc


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
    """Call `write(path)` and fsync the result. A full disk raises OSError naming `path` (leaving it
    partial), whatever type the writer raised it as; so does an OSError of a write, which names no file."""
    try:
        write(path)
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    except Exception as exc:
        fault = exc if isinstance(exc, OSError) else disk_fault(exc)
        if fault is None or fault.errno is None or fault.filename is not None:
            raise
        raise OSError(fault.errno, fault.strerror, str(path)) from exc


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
        with reading(pending, "whether the interrupted checkpoint save finished cannot be known: delete it to keep "
                              "the checkpoint files as they are"):
            info = json.loads(pending.read_text())
            step, files = info["step"], [str(name) for name in info["files"]]
        log.warning("finishing the checkpoint save of step %s that was interrupted in %s", step, workspace)
        _roll_forward(workspace, files)
    for tmp in workspace.glob("*.tmp"):
        log.warning("discarding %s, left by an interrupted checkpoint save (the previous checkpoint is intact)", tmp)
        tmp.unlink()


def read_metadata(workspace: str | Path) -> Dict[str, Any] | None:
    path = Path(workspace) / METADATA_FILE
    if not path.exists():
        return None
    with reading(path, "restore it or start a new --workspace"):
        metadata = json.loads(path.read_text())
        if not isinstance(metadata, dict):
            raise TypeError(f"a {type(metadata).__name__}, not the mapping of a checkpoint's metadata")
        return metadata


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


# ---------------------------------------------------------------------------------------------
# One writer at a time
# ---------------------------------------------------------------------------------------------

@contextmanager
def claimed(workspace: str | Path, hold: bool = True) -> Iterator[None]:
    """The workspace folder, created with its missing parents and locked by this process while the
    block runs; then unlocked, and the folders it created removed again if they are still empty (a
    run that stops at start-up leaves nothing behind). hold False (the processes of a distributed
    run besides the main one, which write nothing there): nothing is done."""
    if not hold:
        yield
        return
    workspace = Path(workspace)
    if workspace.exists() and not workspace.is_dir():
        raise WorkspaceError(f"workspace {workspace} is an existing file, not a folder; choose another --workspace")
    created = [folder for folder in (workspace, *workspace.parents) if not folder.exists()]
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        lock = lock_workspace(workspace)
    except BaseException:
        _remove_if_empty(created)
        raise
    try:
        yield
    finally:
        lock.release()
        _remove_if_empty(created)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders (innermost first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@dataclass
class WorkspaceLock:
    """The lock file this process holds: its path and the open descriptor that holds its flock."""

    path: Path
    fd: int

    def release(self) -> None:
        # unlinked before closed: a process that opened the file meanwhile finds it replaced, not free
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()
        finally:
            os.close(self.fd)


def lock_workspace(workspace: Path) -> WorkspaceLock:
    """Lock `workspace` for this process, or raise WorkspaceBusy naming the holder.

    The lock file is created with O_EXCL and held with flock, which the kernel lets go of when its
    process ends, however it ends. A lock file that exists is taken over when its holder is known to
    be gone: on this host, when its flock is free, or where the file system has no flock, when its
    pid is not running. Another host's lock is never taken over (its pid cannot be checked, and flock
    over a network file system is not to be trusted): the message says to delete it if that job is
    dead. Two processes taking over at once: the one holding the old file's flock wins.
    """
    path = workspace / LOCK_FILE
    for _ in range(3):  # the file may go or be replaced between our steps: look again, a few times
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            lock = _take_over_if_stale(path)
        else:
            lock = _hold_new(path, fd)
        if lock is not None:
            return lock
    raise WorkspaceBusy(_busy_message(path, _read_holder(path)))


def _hold_new(path: Path, fd: int) -> Optional[WorkspaceLock]:
    """Hold the lock file this process has just created; None when another took it over first
    (it found the file still empty and free)."""
    try:
        if _flock(fd) is False:
            os.close(fd)
            return None
        _write_holder(fd, path)
    except BaseException:
        path.unlink(missing_ok=True)
        os.close(fd)
        raise
    return WorkspaceLock(path, fd)


def _take_over_if_stale(path: Path) -> Optional[WorkspaceLock]:
    """Take over the existing lock file when its holder is gone; None to try again from the start
    (the file went or was replaced meanwhile); WorkspaceBusy when its holder may be running."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        free = _flock(fd)
        if free is not False and not _same_file(fd, path):
            return None
        holder = _read_holder(path)
        if free is False or not _holder_gone(holder, free):
            raise WorkspaceBusy(_busy_message(path, holder))
        log.warning("taking over the lock %s of %s, which is no longer running", path, _describe(holder))
        lock = _replace(path)
    finally:
        os.close(fd)  # after the replacement: until then its flock keeps other takers out
    return lock


def _holder_gone(holder: Optional[dict], flock_free: Optional[bool]) -> bool:
    if holder is None:  # empty or garbage: a creator killed before writing it, if nobody holds its flock
        return bool(flock_free)
    if holder["host"] != socket.gethostname():
        return False
    return bool(flock_free) if flock_free is not None else not _running(holder["pid"])


def _replace(path: Path) -> WorkspaceLock:
    """Put a lock file of this process in place of the stale one (a rename: no moment without a
    lock), then check that it is the one in place; WorkspaceBusy naming the winner if not."""
    fresh = path.with_name(f"{path.name}.{os.getpid()}.new")
    fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _flock(fd)
        _write_holder(fd, fresh)
        os.replace(fresh, path)
    except BaseException:
        fresh.unlink(missing_ok=True)
        os.close(fd)
        raise
    if _same_file(fd, path):
        return WorkspaceLock(path, fd)
    os.close(fd)
    raise WorkspaceBusy(_busy_message(path, _read_holder(path)))


def _flock(fd: int) -> Optional[bool]:
    """Take the file's flock: True, or False when another process holds it, or None where the file
    system has no flock (some network and parallel file systems)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _write_holder(fd: int, path: Path) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime())}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
    except OSError as exc:  # (a full disk) errors of a descriptor name no file
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _read_holder(path: Path) -> Optional[dict]:
    """The lock file's {host, pid, started}, or None when it is gone, empty or not ours."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(holder, dict) and isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int):
        return holder
    return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: Optional[dict]) -> str:
    if holder is None:
        return "an unknown process (the lock file is empty or unreadable)"
    return f"process {holder['pid']} on {holder['host']} (since {holder.get('started', '?')})"


def _busy_message(path: Path, holder: Optional[dict]) -> str:
    text = f"workspace {path.parent} is in use by {_describe(holder)}, which holds {path}"
    if holder is None:
        return text + f"; if no run is using the workspace, delete {path} and run again"
    if holder["host"] != socket.gethostname():
        return (text + f"; from {socket.gethostname()} it cannot be checked whether that process still runs: if "
                       f"that job has ended (a killed SLURM job), delete {path} and run again; else choose another "
                       "--workspace")
    if not _running(holder["pid"]):  # its data-loading workers still hold the flock
        return text + "; that process has ended and its last children are exiting: run again in a few seconds"
    return text + "; wait for it to finish, or choose another --workspace"
