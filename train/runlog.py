"""A per-run log: timestamped lines appended to a file and (unless quiet) printed through rich; rank 0 only."""

from __future__ import annotations

import time
from pathlib import Path


class RunLog:
    def __init__(self, path: str | Path | None = None, *, quiet: bool = False, enabled: bool = True) -> None:
        self.path = Path(path) if path else None
        self.quiet = quiet
        self.enabled = enabled
        self.t0 = time.perf_counter()
        if self.path and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {message}"
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        if not self.quiet:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(line, markup=False)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
