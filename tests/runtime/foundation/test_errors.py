"""FlareError: one printable line, whatever the file name holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flare.runtime.foundation.errors import InputError


def test_control_characters_are_escaped_and_the_line_stays_one() -> None:
    err = InputError("bad\nOK.nii.gz\x1b]0;pwned\x07", "not a\nNIfTI file")
    assert str(err) == "bad\\nOK.nii.gz\\x1b]0;pwned\\x07: not a NIfTI file"
    assert str(InputError("ünïcode ct.nii.gz", "x")) == "ünïcode ct.nii.gz: x"


def test_flare_run_names_such_a_file_on_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad\nOK\x1b[31m.nii.gz"
    bad.write_bytes(b"not a nifti")
    proc = subprocess.run([sys.executable, "-m", "flare.runtime.app.cli", str(bad), "-o", str(tmp_path / "o.nii.gz"),
                           "--bundle", str(tiny_bundle)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "\x1b" not in proc.stderr and "not a NIfTI" in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [ln for ln in proc.stderr.splitlines()
                                                                    if ln.startswith("flare-run: error: ")]
