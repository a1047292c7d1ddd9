"""The command lines: parsing shared by `tokengs.train` and `tokengs.evaluate`, and the one rule
for errors that every entry point follows (`entry_point`).

`PRESET [--field value ...]` (tyro subcommands over the presets) or `--config W/config.yaml
[--field value ...]` (a training workspace's options); `--help` lists both ways and the presets,
`PRESET --help` every option with its doc and the preset's value. Boolean fields
take the release's flag form (`--use_ttt_for_eval`, `--no-random_reflect`) and also an
explicit `--field True|False`. Every mistake ends in one line saying what to fix, exit code 2.

Errors: a command's `main(argv=None)` decorated with `@entry_point` turns a user's mistake or the
environment's fault (a `tokengs.errors.UserError`, the operating system's errors, a full disk however torch or
safetensors reports it) into one line naming the path or option and the fix: exit 2 during
start-up, 1 once the work has begun (`work_started`). `--debug` (or TOKENGS_DEBUG=1) prints the
traceback too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import difflib
import errno
import functools
import io
import os
import re
import signal
import sys
import textwrap
import traceback
import typing
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Sequence, TypeVar

from tokengs.errors import UserError
from tokengs.options import Options, OptionsError, config_defaults, config_doc
from tokengs.workspace import CONFIG_FILE, disk_fault

_FIELDS = {f.name: f for f in dataclasses.fields(Options)}
_BOOL_FIELDS = {name for name, hint in typing.get_type_hints(Options).items() if hint is bool}
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}
_CONFIG_HELP = "The options of a training workspace (its W/config.yaml) instead of a preset's."


def fail(message: str, code: int = 2) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _flag_name(arg: str) -> Optional[str]:
    """'--use-ttt_for-eval' / '--no-random_reflect' -> the Options field name, or None."""
    if not arg.startswith("--") or arg in ("--help",):
        return None
    name = arg[2:].split("=", 1)[0].replace("-", "_")
    if name.startswith("no_") and name[3:] in _BOOL_FIELDS:
        return name[3:]
    return name


def _normalize_bools(args: list[str]) -> list[str]:
    """Accept `--flag True/False` for boolean fields besides tyro's `--flag` / `--no-flag`."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = _flag_name(arg)
        if name in _BOOL_FIELDS and not arg[2:].replace("-", "_").startswith("no_"):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None)
            if value is not None and value.lower() in _TRUE | _FALSE:
                out.append(f"--{name}" if value.lower() in _TRUE else f"--no-{name}")
                i += 1 if "=" in arg else 2
                continue
            if value is not None and ("=" in arg or not value.startswith("-")):
                fail(f"--{name} is a switch: give it alone (--no-{name} turns it off) or as --{name} True|False, "
                     f"not {value!r}")
        out.append(arg)
        i += 1
    return out


def _flag_position(args: Sequence[str], flag: str) -> Optional[int]:
    """Where `flag` stands in args (as `flag VALUE` or `flag=VALUE`), or None when absent."""
    return next((i for i, arg in enumerate(args) if arg == flag or arg.startswith(flag + "=")), None)


def flag_value(args: Sequence[str], flag: str, what: str = "a value") -> Optional[str]:
    """The value of `flag` in args (`flag VALUE` or `flag=VALUE`), or None when absent; a flag
    without its value fails saying it needs `what`."""
    i = _flag_position(args, flag)
    if i is None:
        return None
    if args[i] != flag:
        return args[i].split("=", 1)[1]
    if i + 1 >= len(args):
        fail(f"{flag} needs {what}")
    return args[i + 1]


def _pop_flag(args: list[str], flag: str, what: str = "a value") -> Optional[str]:
    """Remove `flag VALUE` (or `flag=VALUE`) from args; its value, or None when absent."""
    value = flag_value(args, flag, what)
    if value is not None:
        i = _flag_position(args, flag)
        del args[i:i + (2 if args[i] == flag else 1)]
    return value


def _entries(docs: Mapping[str, str], width: int = 100) -> str:
    """Names in a column, each followed by its doc wrapped beside it."""
    column = max(map(len, docs)) + 4
    return "\n".join(textwrap.fill(doc, width, initial_indent=f"  {name:<{column - 2}}",
                                   subsequent_indent=" " * column) for name, doc in docs.items())


def _overview(prog: str, extra_flags: Mapping[str, str]) -> str:
    """`PROG --help`: how options are chosen, the presets, and the flags besides the options'."""
    flags = {"--config FILE": _CONFIG_HELP, **extra_flags, DEBUG_FLAG: DEBUG_HELP,
             "-h, --help": "Show this help; after PRESET or --config FILE, every option."}
    return (f"usage: {prog} (PRESET | --config FILE) [--OPTION VALUE ...]\n\n"
            + textwrap.fill("The options start from a preset's values or from a training workspace's config.yaml; "
                            "a flag changes any one of them (--lr 1e-4). "
                            f"`{prog} PRESET --help` lists every option with its value in the preset.", 100)
            + f"\n\npresets:\n{_entries(config_doc)}\n\nflags:\n{_entries(flags)}")


def _check_flags(args: Sequence[str]) -> None:
    """Name an unknown flag (with its closest field) before tyro prints a page of help."""
    for arg in args:
        name = _flag_name(arg)
        if name is None or name in _FIELDS:
            continue
        close = difflib.get_close_matches(name, _FIELDS, n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        fail(f"unknown flag {arg}{hint} (`--help` lists every option)")


def parse_options(argv: Optional[Sequence[str]] = None, prog: str = "tokengs",
                  extra_flags: Mapping[str, str] = MappingProxyType({}),
                  switches: Mapping[str, str] = MappingProxyType({})) -> Options:
    """Parse `PRESET [flags]` or `--config FILE [flags]` into a validated Options.

    extra_flags: the entry point's own `--flag VALUE`s, switches its own `--flag`s (flag -> one
    line of help each), which it reads from argv itself; they are left out of the options and
    listed by `--help`.
    """
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        fail(f"name a preset or --config FILE; `{prog} --help` lists the presets")
    if args[0] in ("-h", "--help"):
        print(_overview(prog, {**extra_flags, **switches}))
        raise SystemExit(0)
    for flag in extra_flags:
        _pop_flag(args, flag)
    args = [arg for arg in args if arg not in switches]
    config_path = _pop_flag(args, "--config", "the path of a config.yaml")
    if config_path is not None and args and not args[0].startswith("-"):
        fail(f"{args[0]!r} with --config: the config file holds every option; pass a preset or --config "
             f"{config_path}, not both")
    if config_path is None and args and args[0].startswith("-"):
        fail(f"name a preset before the flags ({prog} PRESET {args[0]} ...) or pass --config W/config.yaml; "
             f"`{prog} --help` lists the presets")
    if config_path is None and args and args[0] not in config_defaults:
        close = difflib.get_close_matches(args[0], config_defaults, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        fail(f"unknown preset {args[0]!r}{hint}; `{prog} --help` lists the presets")
    _check_flags(args[0:] if config_path else args[1:])
    args = _normalize_bools(args)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            if config_path is not None:
                base = Options.load_yaml(config_path)
                opt = tyro.cli(Options, default=base, args=args, prog=f"{prog} --config {config_path}",
                               description=f"The options of {config_path}; a flag changes any one of them.",
                               use_underscores=True)
            else:
                base = config_defaults[args[0]] if args else None
                configs = {name: (config_doc[name], opt) for name, opt in config_defaults.items()}
                # flags spelled as the release and the README spell them (tyro takes hyphens too)
                opt = tyro.extras.overridable_config_cli(configs, args=args, prog=prog, use_underscores=True)
        return _completed(opt, base, config_path, {_flag_name(arg) for arg in args})
    except OptionsError as exc:
        fail(str(exc))
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        fail(_reworded(_first_message(captured.getvalue())))


def _completed(opt: Options, base: Optional[Options], config_path: Optional[str], flags: set) -> Options:
    """What two options mean beyond tyro's reading of them. --dataset_kwargs changes the keys it
    gives and keeps the preset's (or the config's) others: `root_path X` must not drop an
    evaluation preset's evaluation_json. A workspace's own config.yaml (without --workspace) means
    the folder the file is in now, moved or copied, not the one recorded in it."""
    if base is not None and "dataset_kwargs" in flags:
        opt = opt.evolve(dataset_kwargs={**(base.dataset_kwargs or {}), **(opt.dataset_kwargs or {})})
    if config_path is not None and Path(config_path).name == CONFIG_FILE and "workspace" not in flags:
        opt = opt.evolve(workspace=str(Path(config_path).parent))
    return opt


_PARSE_ERROR = re.compile(r"Error parsing (--\w+): (.*)")
_BAD_LITERAL = {"int()": "an integer", "float": "a number"}


def _reworded(message: str) -> str:
    """tyro's 'Error parsing --flag: <python's conversion error>' -> '--flag takes an integer, not '2.5''
    (or what --flag cannot take), and our own checks' messages without tyro's prefix."""
    parsed = _PARSE_ERROR.fullmatch(message)
    if parsed is None:
        return message.removeprefix("Error parsing Options: ")  # our own check's message, as raised
    flag, detail = parsed.groups()
    unread = re.fullmatch(r"Could not find valid parse for arguments: \[(.*)\]", detail)
    if unread is not None:
        return f"{flag} cannot take {unread.group(1).replace(',', '')}; `PRESET --help` shows what it takes"
    value = re.search(r": ('.*')$", detail)
    kind = next((kind for marker, kind in _BAD_LITERAL.items() if marker in detail), None)
    if kind is None or value is None:
        return f"{flag}: {detail}"
    return f"{flag} takes {kind}, not {value.group(1)}"


def _first_message(boxed: str) -> str:
    """tyro's boxed error -> its message on one line (the text before the first rule)."""
    lines = []
    for line in boxed.splitlines()[1:]:
        text = line.strip().strip("│|╭╮╰╯").strip()
        if not text.strip("─-"):  # a rule: box-drawing, or ASCII where the output is not a terminal
            if lines:
                break
            continue
        lines.append(text)
    return " ".join(lines) or boxed.strip()


# ---------------------------------------------------------------------------------------------
# One rule for errors
# ---------------------------------------------------------------------------------------------

DEBUG_FLAG = "--debug"
DEBUG_HELP = "Print the Python traceback of an error too (as TOKENGS_DEBUG=1 does)."
# What to do about an operating-system error, by errno; the error itself says what happened.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EEXIST: "a file stands where a folder belongs: move it or choose another path",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "a folder stands where a file belongs: choose a file",
    errno.EACCES: "this user may not use it: change its permissions or choose another path",
    errno.EPERM: "this user may not use it: change its permissions or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOSPC: "free space there and run the same command again",
    errno.EDQUOT: "free space (or raise the quota) and run the same command again",
    errno.EIO: "check the disk, then run the same command again",
}
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_started = False
Main = TypeVar("Main", bound=Callable)


def work_started() -> None:
    """Mark the end of start-up (training's first step, evaluation's first scene): an error from
    here on exits 1 (the run may have changed its files), before here 2 (nothing was done)."""
    global _started
    _started = True


class Stopped(BaseException):
    """SIGTERM (or Ctrl-C) where no handler of the command's own saves on it: raised in the main
    thread so that the stack unwinds (the workspace lock released, half-made folders removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def signal_handlers(signums: Sequence[int], handler: Callable) -> typing.Iterator[None]:
    """`handler` for each of `signums` while the block runs, the previous handlers back afterwards.
    Outside the main thread (e.g. a notebook worker) signals keep their handlers."""
    previous = {}
    for signum in signums:
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:
            pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def entry_point(main: Main) -> Main:
    """Give a command's `main(argv=None)` the one rule for errors (see run_main): `@entry_point`."""
    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None):
        if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            exit_skipping_teardown(lambda: run_main(main))
        return run_main(main, argv)
    return typing.cast(Main, wrapped)


def exit_skipping_teardown(call: Callable[[], typing.Any]) -> typing.NoReturn:
    """Run call() and end the process as Python would (same exit code, output flushed, atexit
    handlers run) but without the interpreter's teardown. One process of several has joined a
    process group, and torch 2.14's DistributedDataParallel keeps gloo's process group, and its
    threads, alive past destroy_process_group; at interpreter teardown those threads now and then
    abort the process (SIGABRT, "terminate called without an active exception") after its work
    is done and saved, failing the launch. Used when a command runs as a program, never in-process."""
    code = 0
    try:
        call()
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # a bug: its traceback, as Python prints an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what a normal exit runs first (logging.shutdown flushes the log handlers)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


class CommandParser(argparse.ArgumentParser):
    """argparse for a command: a mistake is one line, `error: WHAT; PROG --help lists the options`,
    exit 2 (argparse prints its usage block first, burying what to fix under it)."""

    def error(self, message: str) -> typing.NoReturn:
        fail(f"{message}; `{self.prog} --help` lists the options")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """List --debug in an argparse command's help (run_main reads it before the parser sees argv)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)


def run_main(main: Callable[[list[str]], typing.Any], argv: Optional[Sequence[str]] = None) -> typing.Any:
    """Call main(args) (args: argv, else sys.argv[1:], without --debug) and return what it returns.
    A user's mistake or the environment's fault (a UserError, an operating-system
    errors, a full disk in any layer) ends in one line, `error: ...`, and SystemExit(2) during
    start-up or 1 after `work_started`; with --debug or TOKENGS_DEBUG=1 the traceback comes first.
    SIGTERM and Ctrl-C where the command does not handle them itself unwind the stack and end in
    `error: stopped by SIGTERM` (SIGINT), exit 128 + the signal's number. Any other exception
    propagates with its traceback: it is a bug."""
    global _started
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get("TOKENGS_DEBUG", "") not in ("", "0")
    _started = False
    try:
        # SIGTERM raises Stopped (training installs its own handler, which saves a checkpoint, for
        # its loop); without it the process would die at once and keep its workspace lock
        with signal_handlers((signal.SIGTERM,), _raise_stopped):
            return main([arg for arg in args if arg != DEBUG_FLAG])
    except (Stopped, KeyboardInterrupt) as exc:
        if debug:
            traceback.print_exc()
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        fail(f"stopped by {signal.Signals(signum).name}", code=128 + signum)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        fail(message, code=1 if _started else 2)


def user_error_message(exc: BaseException) -> Optional[str]:
    """What to tell the user about exc when it is their mistake or the environment's fault, else None."""
    if isinstance(exc, UserError):
        return _without_worker_traceback(str(exc), type(exc).__name__)
    fault = exc if isinstance(exc, OSError) and exc.errno is not None else disk_fault(exc)
    return None if fault is None else os_error_message(fault)


def os_error_message(exc: OSError) -> str:
    """'PATH: what happened; what to do' for an operating-system error."""
    where = " -> ".join(str(path) for path in (exc.filename, exc.filename2) if path is not None)
    text = f"{where}: {exc.strerror}" if where else (exc.strerror or str(exc))
    fix = _OS_FIXES.get(exc.errno)
    return f"{text}; {fix}" if fix else text


def _without_worker_traceback(message: str, class_name: str) -> str:
    """A DataLoader worker's error reaches the main process with the worker's traceback in its
    message: keep what the error itself said (after the traceback's last `...ClassName: `)."""
    if not _WORKER_TRACEBACK.match(message):
        return message
    return message.rsplit(f"{class_name}: ", 1)[-1].strip()
