"""ONNX Runtime prints a telemetry warning on import when it cannot write its device id (a service account whose
home is not writable); the runtime's import of it keeps that line out of the output, and leaves a user's own
ORT_DISABLE_TELEMETRY alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CODE = ("import os; from flare.runtime.inference.device import ort; ort.get_available_providers(); "
        "print(os.environ.get('ORT_DISABLE_TELEMETRY'))")


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")}
    return subprocess.run([sys.executable, "-c", CODE], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, check=True)


def test_unwritable_home_gives_no_telemetry_warning(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = _run({"HOME": str(blocker / "home")})  # a home under a file: nothing can be created there
    assert "telemetry" not in out.stderr.lower(), out.stderr
    assert out.stdout.strip() == "1"


def test_writable_home_and_a_users_setting_are_left_alone(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    assert _run({"HOME": str(tmp_path)}).stdout.strip() == "None"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _run({"HOME": str(blocker / "home"), "ORT_DISABLE_TELEMETRY": "0"}).stdout.strip() == "0"
