"""The console scripts: check that a command's optional dependencies (its pip *extra*) are installed, then run it.

A runtime-only install (``pip install 'flare-seg[cpu]'``) still gets every console script; without this check
``flare-train`` and friends would die with a long ``ModuleNotFoundError`` traceback, or (``flare-bench``) run for
minutes and then fail. Each wrapper looks the packages up with :func:`importlib.util.find_spec` (nothing is
imported), prints ONE line naming the extra to install and exits 2 before any work; ``--version`` always answers,
and ``--help`` shows the command's help followed by a line naming the extra to install.
This module imports nothing heavy: it must work on the smallest install.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import import_module
from importlib.util import find_spec
from itertools import pairwise
from typing import NoReturn

from flare.runtime.foundation.version import DIST, version

__all__ = ["COMMANDS", "HELP_FLAGS", "SIGNAL_EXIT_CODES", "Command", "end_now", "launch", "missing_modules", "need", "run_main"]

HELP_FLAGS = frozenset({"--help"})


@dataclass(frozen=True)
class Command:
    target: str  # module whose main() runs the command
    needs: tuple[tuple[str, str], ...]  # (import name, extra)
    #: more needs when an argument is given (e.g. flare-bench --reference needs torch; ``--engine=openvino`` also
    #: matches ``--engine openvino``)
    when: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    #: needs dropped when an argument is given (e.g. flare-export --no-verify needs no onnxruntime)
    unless: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def requirements(self, argv: Sequence[str]) -> list[tuple[str, str]]:
        reqs = list(self.needs)
        for flag, more in self.when.items():
            if _given(flag, argv):
                reqs += more
        for flag, dropped in self.unless.items():
            if flag in argv:
                reqs = [r for r in reqs if r[0] not in dropped]
        return reqs


def _given(flag: str, argv: Sequence[str]) -> bool:
    """Whether ``flag`` is in ``argv``; ``--option=value`` also as the two arguments ``--option value``."""
    name, _, value = flag.partition("=")
    return flag in argv or bool(value) and any(a == name and b == value for a, b in pairwise(argv))


_ORT = ("onnxruntime", "cpu")
_TRAIN = (("torch", "train"), ("monai", "train"))
_EXPORT = (("torch", "export"), ("monai", "export"), ("onnx", "export"), ("yaml", "export"))
_CLIENT = ("tritonclient", "serve")
_OPENVINO: dict[str, tuple[tuple[str, str], ...]] = {"--engine=openvino": (("openvino", "openvino"),)}

COMMANDS: dict[str, Command] = {
    "flare-run": Command("flare.runtime.app.cli", (_ORT,), when={"--server": (_CLIENT,), **_OPENVINO},
                         unless={"--server": ("onnxruntime",)}),
    "flare-export": Command("flare.export.cli", (*_EXPORT, _ORT), unless={"--no-verify": ("onnxruntime",)}),
    "flare-demo": Command("flare.benchmarks.demo", (*_TRAIN, *_EXPORT, _ORT)),
    "flare-train": Command("flare.train.cli", _TRAIN),
    "flare-bench": Command("flare.benchmarks.cli", (("matplotlib", "bench"), _ORT),
                           when={"--reference": _TRAIN, "--server": (_CLIENT,), **_OPENVINO}),
    "flare-serve": Command("flare.runtime.serving.server", (_ORT, ("pytriton", "serve"), _CLIENT), when=_OPENVINO),
}


def missing_modules(names: Sequence[str]) -> list[str]:
    """The import names in ``names`` that cannot be found (nothing is imported)."""
    gone = []
    for name in names:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            gone.append(name)
    return gone


def need(reqs: Sequence[tuple[str, str]]) -> str | None:
    """``"needs the extra …: pip install …"`` (one line) when some of ``reqs`` cannot be imported, else ``None``."""
    gone = missing_modules(list(dict.fromkeys(name for name, _ in reqs)))
    if not gone:
        return None
    extras = list(dict.fromkeys(extra for name, extra in reqs if name in gone))
    spec = ",".join(extras)
    also = " (or 'gpu' instead of 'cpu' on an NVIDIA GPU)" if "cpu" in extras else ""
    word = "extra" if len(extras) == 1 else "extras"
    return (f"needs the {word} {', '.join(repr(e) for e in extras)}{also}, not installed (no module "
            f"{', '.join(gone)}): pip install '{DIST}[{spec}]' (from a clone: pip install -e '.[{spec}]')")


def launch(name: str, argv: Sequence[str] | None = None) -> None:
    """Run console script ``name``: ``--version``, else the extras check (exit 2), else the command's main()."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"{name} {version()}")
        raise SystemExit(0)
    cmd = COMMANDS[name]
    message = need(cmd.requirements(args))
    if message is None:
        run_main(name, cmd.target)
        return
    if HELP_FLAGS.intersection(args):  # the help needs only typer: show it, then what to install to run the command
        show_help(cmd.target, args)
        print(f"{name}: note: to run it, this command {message}", file=sys.stderr)
        raise SystemExit(0)
    print(f"{name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


#: exit codes of a command ended by a signal: 128 + SIGHUP, SIGINT, SIGTERM (flare.runtime.app.process)
SIGNAL_EXIT_CODES = frozenset({129, 130, 143})


def run_main(name: str, target: str) -> None:
    """Run ``target``'s ``main()``; a run that a signal ended leaves through :func:`end_now`.

    By the time a command exits 130/143/129 its own ``finally`` blocks have removed partial output and printed the
    one line. What is left is the interpreter's shutdown, which CPython up to 3.13 does while other threads may still
    be inside native code (the read-ahead of the next case, a session being built, a kernel's thread pool); a thread
    that comes back from native code then is stopped with ``pthread_exit``, and where that unwinds through a C++
    destructor the process aborts (SIGABRT; exit 134 instead of 130 was seen twice in about 200 random Ctrl-Cs of
    ``flare-run``, the likely cause). Nothing a stopped run still needs happens in that shutdown, so it is skipped. Ctrl-C before the
    command's own handling (while its modules import) gets the same one line and 130, not a traceback.

    A command that finished (any other exit) shuts down as usual, with Ctrl-C ignored from then on: its work is done
    and written, and a Ctrl-C in the last milliseconds would otherwise print a ``KeyboardInterrupt`` traceback from
    the thread shutdown, or kill the process by SIGINT once Python has given the signal back (seen once in 150 random
    Ctrl-Cs: no line, a killed status for a run whose outputs were complete)."""
    try:
        import_module(target).main()
    except KeyboardInterrupt:
        end_now(130, f"{name}: interrupted")
    except SystemExit as done:
        if done.code in SIGNAL_EXIT_CODES:
            end_now(int(done.code))  # type: ignore[arg-type]  # an int, checked above
        _ignore_ctrl_c()
        raise
    _ignore_ctrl_c()


def _ignore_ctrl_c() -> None:
    import signal

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def end_now(code: int, line: str | None = None) -> NoReturn:
    """Print ``line`` (if any) on stderr, flush stdout, stderr and the logging handlers, and end the process with
    ``code`` at once (``os._exit``: no interpreter shutdown, no atexit handlers)."""
    import logging
    import os

    if line is not None:
        with contextlib.suppress(Exception):
            print(line, file=sys.stderr)
    logging.shutdown()  # flushes and closes every handler (a training log file, say)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def show_help(target: str, args: Sequence[str]) -> None:
    """Print the command's ``--help`` from its typer ``app`` (not ``main()``, which may set up torch first); every
    command module imports its extra's packages inside the functions that use them, so this works without them."""
    try:
        import_module(target).app(args=list(args), standalone_mode=True)
    except SystemExit as done:
        if done.code not in (0, None):
            raise


# the console scripts (pyproject.toml [project.scripts]): zero-argument callables, one per command
flare_run = partial(launch, "flare-run")
flare_export = partial(launch, "flare-export")
flare_demo = partial(launch, "flare-demo")
flare_train = partial(launch, "flare-train")
flare_bench = partial(launch, "flare-bench")
flare_serve = partial(launch, "flare-serve")
