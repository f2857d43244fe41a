"""flare-run as a subprocess through the real console module, and the check every refused run must pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RUN = [sys.executable, "-m", "flare.runtime.app.cli"]


def flare_run(*args: str | Path, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run flare-run with ``args`` (no default bundle unless ``env`` names one)."""
    full_env = {**os.environ, "FLARE_BUNDLE": "/nonexistent-default-bundle", **(env or {})}
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=300,
                          check=False, **kwargs)


def assert_clean_failure(proc: subprocess.CompletedProcess, names: str, *words: str) -> None:
    """Exit 2, exactly one stderr line naming ``names`` and containing every word, no traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert names in lines[0], lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
