"""Errors that the CLI turns into one line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

from pathlib import Path


class FlareError(Exception):
    """A user-facing problem: ``str(err)`` is one line naming the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class InputError(FlareError):
    """The input image cannot be used."""


class BundleError(FlareError):
    """The model bundle is missing, corrupt, or not understood by this runtime."""


class OutputError(FlareError):
    """The output cannot be written."""
