"""Errors that the CLI turns into one line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

from pathlib import Path


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): a file name with a newline or a terminal
    escape must neither break the one-line message nor reach the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class FlareError(Exception):
    """A user-facing problem: ``str(err)`` is one line naming the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else printable(str(path))
        self.problem = printable(" ".join(str(problem).split()))  # always one line
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class InputError(FlareError):
    """The input image cannot be used."""


class BundleError(FlareError):
    """The model bundle is missing, corrupt, or not understood by this runtime."""


class OutputError(FlareError):
    """The output cannot be written."""
