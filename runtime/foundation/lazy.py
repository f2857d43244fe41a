"""The one lazy-import helper of flare (Polygraphy's ``mod.lazy_import`` style).

:func:`lazy_import` returns a module proxy that imports on first attribute access, records how long the import took
(:data:`IMPORT_SECONDS`, for the report's ``load`` timings) and turns a missing or broken package into a one-line
:class:`DependencyError` that names the pip extra to install. Every optional or heavy package of the runtime
(onnxruntime, OpenVINO, CuPy, pydicom, highdicom, isal, tritonclient, pytriton) is reached through it.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from flare.runtime.foundation.errors import FlareError

__all__ = ["IMPORT_SECONDS", "DependencyError", "LazyModule", "lazy_import"]

#: seconds spent importing each lazily imported module (first use only)
IMPORT_SECONDS: dict[str, float] = {}


class DependencyError(FlareError):
    """An optional package the asked-for work needs is missing or broken."""


class LazyModule:
    """A module imported on first attribute access (``ort = lazy_import("onnxruntime", extra="cpu")`` at module
    level costs nothing until ``ort.InferenceSession`` is touched)."""

    def __init__(self, name: str, extra: str | None = None, hint: str | None = None,
                 before: Callable[[], None] | None = None) -> None:
        self._name, self._extra, self._hint, self._before = name, extra, hint, before
        self._module: ModuleType | None = None

    def load(self) -> ModuleType:
        """The imported module, or a one-line :class:`DependencyError` naming what to install."""
        if self._module is None:
            if self._before is not None and self._name not in sys.modules:
                self._before()
            self._module = _import(self._name, self._extra, self._hint)
        return self._module

    def available(self) -> bool:
        """True when the module imports (the error, if any, is not raised)."""
        try:
            self.load()
        except DependencyError:
            return False
        return True

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_") and not attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r} ({'loaded' if self._module is not None else 'not loaded'})>"


#: one lazy import at a time: a second thread must not see a module another thread is still initialising
_LOCK = threading.RLock()


def _import(name: str, extra: str | None, hint: str | None) -> ModuleType:
    with _LOCK:
        return _import_locked(name, extra, hint)


def _import_locked(name: str, extra: str | None, hint: str | None) -> ModuleType:
    # no sys.modules shortcut: a module found there may still be initialising in another thread (seen with
    # isal.igzip from the batch read-ahead thread); import_module waits for it and is cheap once it is done
    already = name in sys.modules
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from a missing shared library
        how = hint or (f"pip install 'flare-seg[{extra}]'" if extra else f"pip install {name}")
        first = (str(exc).splitlines() or [""])[0][:160]
        raise DependencyError(None, f"{name} is not usable ({type(exc).__name__}: {first}); {how}") from None
    if not already:
        IMPORT_SECONDS[name] = round(time.perf_counter() - t0, 4)
    return module


def lazy_import(name: str, extra: str | None = None, *, hint: str | None = None,
                before: Callable[[], None] | None = None) -> LazyModule:
    """A :class:`LazyModule` for ``name``; ``extra`` is the flare-seg extra that provides it (named in the error),
    ``hint`` replaces the whole install advice, ``before`` runs once just before the first import (environment
    a package reads at import time)."""
    return LazyModule(name, extra, hint, before)
