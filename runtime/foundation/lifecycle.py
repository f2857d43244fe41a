"""Test hook of the process life cycle: :func:`pause_point` lets a test stop a run at a named point (a pipeline stage,
an atomic write) to send it a signal there. The signal handling itself is the app's (:mod:`flare.runtime.app.process`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["pause_point"]


def pause_point(name: str) -> None:
    """Test hook: when ``FLARE_TEST_PAUSE_AT`` equals ``name``, write ``FLARE_TEST_PAUSE_MARKER`` (a file path) and
    wait (at most 60 s) so that a test can send a signal at exactly this point. Does nothing otherwise."""
    if os.environ.get("FLARE_TEST_PAUSE_AT") != name:
        return
    marker = os.environ.get("FLARE_TEST_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(name)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        time.sleep(0.01)
