"""Process life cycle of the command-line tools (an app concern): termination signals and a stderr that may be gone.

* :func:`install_signal_handlers`: SIGTERM and SIGHUP (and SIGINT, as ``KeyboardInterrupt``) raise
  :class:`Terminated` in the main thread, so every ``try/finally`` and :func:`flare.runtime.foundation.atomic.atomic_path`
  cleans up (no temp file, no partial output) before the CLI exits with ``128 + signal number`` and one line.
  Further termination signals are ignored while cleaning up.
* :func:`exit_on_signals`: around a command's work, turns those exceptions into one line and the exit code.
* :func:`guard_stderr`: a closed stderr (``2>&-``, or a pipe whose reader has gone) must not turn a finished run
  into a failure: writes to it are dropped instead of raising ``BrokenPipeError``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["EXIT_INTERRUPTED", "StderrHandler", "Terminated", "exit_on_signals", "guard_stderr",
           "install_signal_handlers"]

EXIT_INTERRUPTED = 130  # Ctrl-C

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):  # like KeyboardInterrupt: not an Exception, so nothing swallows it
    """A termination signal arrived; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"terminated by {signal.Signals(self.signum).name}")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    for sig in _SIGNALS + (signal.SIGINT,):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP raise :class:`Terminated` (main thread only; a no-op elsewhere)."""
    with contextlib.suppress(ValueError):  # not the main thread
        for sig in _SIGNALS:
            signal.signal(sig, _on_signal)


@contextlib.contextmanager
def exit_on_signals(prog: str) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP (with :func:`install_signal_handlers`) end the command ``prog`` with one line on
    stderr and exit 130 / 128 + signal, after the ``finally`` blocks inside have cleaned up."""
    import typer

    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"{prog}: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Terminated as sig:
        typer.echo(f"{prog}: {sig}", err=True)
        raise typer.Exit(sig.exit_code) from None


class _SafeStream(io.TextIOBase):
    """A text stream that forwards to ``target`` until writing fails (EPIPE, EBADF), then drops output."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._broken = target is None

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                self._target.write(text)
            except (OSError, ValueError):
                self._broken = True
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._target.flush()
            except (OSError, ValueError):
                self._broken = True

    def isatty(self) -> bool:
        return not self._broken and bool(getattr(self._target, "isatty", lambda: False)())

    def fileno(self) -> int:
        if self._broken:
            raise OSError("stderr is closed")
        return int(self._target.fileno())

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._target, "errors", None) or "backslashreplace"


class StderrHandler(logging.StreamHandler):
    """A logging handler that writes to whatever ``sys.stderr`` is when a record is emitted (the guarded stream,
    or a test runner's capture), never to a stream captured once and closed since."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def guard_stderr() -> None:
    """Replace ``sys.stderr`` by a stream that survives a closed or broken stderr."""
    if not isinstance(sys.stderr, _SafeStream):
        sys.stderr = _SafeStream(sys.stderr)
