"""The base class of every error a user can fix: its message names the file, field or flag and the
fix, so a command prints it as one line `error: ...` with no traceback (`cli.run_main`)."""


class UserError(Exception):
    """A mistake in what the user gave (a path, an option, a file) or a fault of the environment
    that the run cannot go on with. Subclasses also derive from the builtin error they refine."""
