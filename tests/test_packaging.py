"""The built wheel is complete and works: every package and its data are in it, and once installed (without the
source tree or the editable install in sight) every subpackage imports and the installed ``flare-run`` segments a
real CT with the same labels as the source tree. Also: pyproject's package list is the tree's packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, data_path

FOLDERS = {"runtime": "flare.runtime", "train": "flare.train", "export": "flare.export",
           "benchmarks": "flare.benchmarks"}
#: package data that must travel with the code (pyproject [tool.setuptools.package-data])
DATA = ("flare/runtime/bundle/bundle.schema.json", "flare/train/config.schema.json", "flare/train/configs/flare23.json", "flare/train/configs/tiny.json")


def tree_packages() -> set[str]:
    """Every folder with an ``__init__.py`` under the four source folders, as an import name."""
    found = set()
    for folder, pkg in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([pkg, *rel.parts]))
    return found


def test_pyproject_lists_exactly_the_tree_packages() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == tree_packages()
    assert {k: REPO / v for k, v in config["package-dir"].items()} == {v: REPO / k for k, v in FOLDERS.items()}


def _setuptools_ok() -> bool:
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 77  # pyproject's SPDX `license = "..."` string
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _setuptools_ok():
        pytest.fail("building the wheel without isolation needs setuptools >= 77 here (the dev extra installs it)")
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: an in-tree build would reuse a stale build/ folder of the checkout
    for name in (*FOLDERS, "pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600, check=False,
                          cwd=out)
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("flare_seg-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_every_package_and_its_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in sorted(tree_packages()) if p.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel: {missing}"
    assert not [d for d in DATA if d not in names], names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the Apache-2.0 LICENSE is not in the wheel"
    sources = {f"{FOLDERS[f].replace('.', '/')}/{p.relative_to(REPO / f).as_posix()}"
               for f in FOLDERS for p in (REPO / f).rglob("*.py")}
    assert not sorted(sources - names), "modules missing from the wheel"


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (``--no-deps``); its third-party packages come from this interpreter's
    site-packages folders through a ``.pth`` file (their own ``.pth`` files, the editable install's finder among
    them, are not processed: flare can only come from the wheel)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    dirs = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "third-party.pth").write_text("\n".join(dirs) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return venv


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.mark.slow
def test_installed_wheel_imports_every_subpackage(installed: Path) -> None:
    packages = sorted(tree_packages())
    code = ("import importlib, flare.runtime, pathlib, sys\n"
            f"root = pathlib.Path({str(installed)!r}).resolve()\n"
            "assert root in pathlib.Path(flare.runtime.__file__).resolve().parents, flare.runtime.__file__\n"
            f"for name in {packages!r}:\n"
            "    importlib.import_module(name)\n"
            "print('ok')\n")
    proc = subprocess.run([str(installed / "bin" / "python"), "-I", "-c", code], capture_output=True, text=True,
                          timeout=300, check=False, env=_env(), cwd=installed)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.slow
def test_installed_flare_run_segments_a_real_ct(installed: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from flare.runtime import Segmenter

    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    out = tmp_path / "seg.nii.gz"
    proc = subprocess.run([str(installed / "bin" / "flare-run"), str(ct), "-o", str(out), "--bundle",
                           str(tiny_bundle), "--device", "cpu", "--quiet"], capture_output=True, text=True,
                          timeout=600, check=False, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = np.asarray(nib.load(out).dataobj)
    expected = Segmenter(tiny_bundle, device="cpu").segment(ct).labels  # the source tree's runtime
    assert written.dtype == np.uint8 and np.array_equal(written, expected)
    version = subprocess.run([str(installed / "bin" / "flare-run"), "--version"], capture_output=True, text=True,
                             timeout=120, check=False, env=_env(), cwd=tmp_path)
    assert version.stdout.strip() == "flare-run 0.1.0", version.stdout + version.stderr
