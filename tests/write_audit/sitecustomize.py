"""Records every file a process writes, renames or creates under a watched folder, one file per
process. Put this folder first on PYTHONPATH and set TOKENGS_AUDIT_WATCH (the folder to watch)
and TOKENGS_AUDIT_OUT (where the records go); a multi-process run then shows which rank wrote what.

Python's audit hooks see every `open`, `os.rename`/`os.replace`, `os.mkdir` and `os.remove` made
from Python, in this process and its forked children. (A file written by native code, such as
safetensors' writer, is seen when our atomic write renames it into place.)
"""

import os
import sys

_WATCH = os.environ.get("TOKENGS_AUDIT_WATCH")
_OUT = os.environ.get("TOKENGS_AUDIT_OUT")


def _install() -> None:
    watch = os.path.realpath(_WATCH)
    os.makedirs(_OUT, exist_ok=True)
    rank = os.environ.get("RANK", "0")

    def watched(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        path = os.fsdecode(path)
        return os.path.realpath(path).startswith(watch)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or \
                (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        elif event in ("os.rename", "os.mkdir", "os.remove"):
            paths = list(args[:2]) if event == "os.rename" else [args[0]]
        else:
            return
        paths = [os.fsdecode(p) for p in paths if watched(p)]
        if paths:
            # os.open is audited too, but the records lie outside the watched folder
            fd = os.open(os.path.join(_OUT, f"rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, ("\t".join([event, *paths]) + "\n").encode())
            finally:
                os.close(fd)

    sys.addaudithook(hook)


if _WATCH and _OUT:
    _install()
