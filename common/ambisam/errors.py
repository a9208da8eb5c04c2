"""The one exception type for bad user input.

Every check on user input (a missing file, an unreadable image, a label that is not binary, a box outside the
image, ...) raises :class:`InputError` with a message that names the offending file and the problem, before
anything is written. An output that cannot be written (a full disk, a folder without write permission) raises
:class:`OutputError`, naming the file, after removing what was partly written.
"""

from __future__ import annotations

__all__ = ["InputError", "OutputError", "find_input_error", "find_user_error", "install_excepthook"]


class InputError(ValueError):
    """Bad user input: the message names the file and the problem.

    Args:
        path: the offending file (or ``None`` when the input is not a file).
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class OutputError(OSError):
    """An output file could not be written (a full disk, no permission): the message names the file.

    Args:
        path: the file that could not be written.
        problem: what went wrong (the operating system's reason).
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # OSError's own pickling would pass the message as errno
        return type(self), (self.path, self.problem)


def find_input_error(exc: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``exc``, if any.

    MONAI's ``Compose``/``Dataset`` re-raise a transform's exception as ``RuntimeError("applying transform ...")``
    (once per level of nesting); the user's problem is the ``InputError`` at the bottom of that chain.

    Args:
        exc: any exception.

    Returns:
        The first ``InputError`` along ``__cause__`` / ``__context__``, or ``None``.
    """
    return _find(exc, (InputError,))


def find_user_error(exc: BaseException | None) -> InputError | OutputError | None:
    """The :class:`InputError` or :class:`OutputError` behind ``exc``, if any (as :func:`find_input_error`)."""
    return _find(exc, (InputError, OutputError))


def _find(exc: BaseException | None, types: tuple[type, ...]):
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook() -> None:
    """Make an uncaught bad-input error end the process with its one message instead of a traceback.

    ``python -m monai.bundle run`` wraps every exception of a config expression in ``RuntimeError("Failed to
    evaluate ...")``; bundles call this first in ``initialize`` so that a user's bad input still ends in one
    line, ``ambisam: error: <file>: <problem>`` (exit status 2). Any other exception keeps Python's traceback.
    Library use (``ConfigWorkflow`` in a process, MONAI Label) is unaffected: only uncaught exceptions reach
    the hook.
    """
    import sys

    previous = sys.excepthook
    if getattr(previous, "_ambisam", False):
        return

    def hook(exc_type, exc, tb):
        found = find_user_error(exc)
        if found is None:
            return previous(exc_type, exc, tb)
        sys.stdout.flush()
        print(f"ambisam: error: {found}", file=sys.stderr)
        sys.stderr.flush()
        import os

        # the process ends here with nothing more printed: 2 for bad input, 1 for an output it could not write
        os._exit(2 if isinstance(found, InputError) else 1)

    hook._ambisam = True  # type: ignore[attr-defined]
    sys.excepthook = hook
