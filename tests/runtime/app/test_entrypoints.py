"""Install honesty: every console script of an extra that is not installed prints one line naming the extra and
exits 2 before any work; --version always answers; the installed scripts go through flare.runtime.app.entrypoints.

The missing extras are simulated in a subprocess by a meta-path finder that refuses to find the extra's packages
(what ``find_spec`` sees in a venv without them); ``pip install -e '.[cpu]'`` in a real runtime-only venv was also
checked by hand (README, "Install")."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
for mod in list(sys.modules):
    if mod.split('.')[0] in BLOCKED:
        del sys.modules[mod]
sys.argv = {argv!r}
from flare.runtime.app import entrypoints
getattr(entrypoints, {func!r})()
"""

RUNTIME_ONLY = ["torch", "monai", "onnx", "yaml", "matplotlib", "pydicom", "highdicom"]


def run_script(name: str, args: list[str], blocked: list[str]) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=blocked, argv=[name, *args], func=name.replace("-", "_"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(("name", "args", "blocked", "extra"), [
    ("flare-train", ["run", "data/"], RUNTIME_ONLY, "train"),
    ("flare-export", ["ckpt", "-o", "bundle"], RUNTIME_ONLY, "export"),
    ("flare-demo", [], RUNTIME_ONLY, "train,export"),
    ("flare-bench", ["--cases", "synthetic"], RUNTIME_ONLY, "bench"),
    ("flare-bench", ["--reference"], ["torch", "monai"], "train"),
    ("flare-run", ["ct.nii.gz"], ["onnxruntime"], "cpu"),
    ("flare-run", ["ct.nii.gz", "--engine", "openvino"], ["openvino"], "openvino"),
    ("flare-run", ["ct.nii.gz", "--engine=openvino"], ["openvino"], "openvino"),
    ("flare-bench", ["--engine", "onnxruntime", "--engine", "openvino"], ["openvino"], "openvino"),
    ("flare-serve", ["--engine", "openvino"], ["openvino"], "openvino"),
    ("flare-export", ["ckpt", "-o", "bundle"], ["onnxruntime"], "cpu"),
])
def test_missing_extra_is_one_line(name: str, args: list[str], blocked: list[str], extra: str, tmp_path) -> None:
    proc = run_script(name, args, blocked)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"{name}: error: needs the extra")
    assert f"[{extra}]" in lines[0], lines[0]
    assert proc.stdout == ""


def test_no_verify_export_needs_no_onnxruntime() -> None:
    from flare.runtime.app.entrypoints import COMMANDS

    reqs = COMMANDS["flare-export"].requirements(["ckpt", "-o", "b", "--no-verify"])
    assert "onnxruntime" not in [name for name, _ in reqs]


@pytest.mark.parametrize("name", ["flare-run", "flare-export", "flare-demo", "flare-train", "flare-bench"])
def test_version_needs_nothing(name: str) -> None:
    proc = run_script(name, ["--version"], RUNTIME_ONLY + ["onnxruntime"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"{name} ") and proc.stdout.strip().split()[1][0].isdigit()


def test_installed_scripts_use_the_wrappers() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("flare-")}
    assert scripts == {n: f"flare.runtime.app.entrypoints:{n.replace('-', '_')}"
                       for n in ("flare-run", "flare-export", "flare-demo", "flare-train", "flare-bench", "flare-serve")}


def test_wrapper_runs_the_command_when_installed() -> None:
    proc = run_script("flare-train", ["--help"], [])
    assert proc.returncode == 0, proc.stderr
    assert "phantoms" in proc.stdout


def test_entrypoints_module_is_light() -> None:
    code = ("import sys; import flare.runtime.app.entrypoints as e; e.need([('torch', 'train')]);"
            "bad = [m for m in ('torch', 'monai', 'onnxruntime', 'numpy', 'typer') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("name", "args", "extra"), [
    ("flare-export", ["--help"], "export"),
    ("flare-train", ["--help"], "train"),
    ("flare-train", ["run", "--help"], "train"),
    ("flare-demo", ["--help"], "train,export"),
    ("flare-bench", ["--help"], "bench"),
    ("flare-serve", ["--help"], "serve"),
])
def test_help_without_the_extra(name: str, args: list[str], extra: str) -> None:
    """--help shows the command's own help even when its extra is missing, then one line naming the extra."""
    proc = run_script(name, args, RUNTIME_ONLY + ["pytriton", "tritonclient", "tensorboard"])
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "--help" in proc.stdout, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: note: to run it, this command needs the extra"), lines
    assert f"[{extra}" in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ how a stopped run ends
COMMAND = """
import atexit, pathlib, sys, time
atexit.register(lambda: pathlib.Path({marker!r}).write_text("shutdown ran"))
def main():
    print("work so far", end="")  # buffered: must still reach stdout
    {ending}
"""


def run_command(tmp_path, ending: str) -> tuple[subprocess.CompletedProcess, bool]:
    """A command module whose main() ends with ``ending``, run through the console-script funnel in a fresh
    interpreter; returns the process and whether the interpreter's shutdown (an atexit handler) ran."""
    marker = tmp_path / "atexit"
    (tmp_path / "fake_command.py").write_text(COMMAND.format(marker=str(marker), ending=ending))
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from flare.runtime.app import entrypoints; "
            "entrypoints.run_main('flare-x', 'fake_command')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return proc, marker.exists()


@pytest.mark.parametrize("code", [130, 143, 129])
def test_a_signal_exit_skips_the_interpreter_shutdown(tmp_path, code: int) -> None:
    """A command that a signal ended (its own clean-up done, its one line printed) leaves with os._exit: the exit code
    stays, printed output is flushed, and no shutdown runs in which a thread still inside native code could abort the
    process (exit 134)."""
    proc, shutdown_ran = run_command(tmp_path, f"sys.stderr.write('flare-x: interrupted\\n'); raise SystemExit({code})")
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "work so far" and proc.stderr == "flare-x: interrupted\n"
    assert not shutdown_ran


def test_ctrl_c_outside_the_command_is_one_line(tmp_path) -> None:
    """Ctrl-C that reaches the funnel (while a command's modules import, before its own handling): one line, 130."""
    proc, shutdown_ran = run_command(tmp_path, "raise KeyboardInterrupt")
    assert proc.returncode == 130
    assert proc.stderr == "flare-x: interrupted\n" and "Traceback" not in proc.stderr
    assert not shutdown_ran


@pytest.mark.parametrize(("ending", "code"), [("raise SystemExit(2)", 2), ("return", 0), ("raise SystemExit(3)", 3)])
def test_other_exits_shut_down_normally(tmp_path, ending: str, code: int) -> None:
    proc, shutdown_ran = run_command(tmp_path, ending)
    assert proc.returncode == code and proc.stdout == "work so far"
    assert shutdown_ran


def test_ctrl_c_after_the_command_finished_is_ignored(tmp_path) -> None:
    """The command is done (exit 0); a Ctrl-C arrives while the interpreter waits for a thread at shutdown: the exit
    stays 0, with no KeyboardInterrupt traceback."""
    ending = ("import os, signal, threading\n"
              "    def late():\n"
              "        time.sleep(0.3); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.3)\n"
              "    threading.Thread(target=late).start()\n"
              "    return")
    proc, shutdown_ran = run_command(tmp_path, ending)
    assert proc.returncode == 0 and shutdown_ran
    assert "KeyboardInterrupt" not in proc.stderr and proc.stderr == "", proc.stderr
