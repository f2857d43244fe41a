"""The GPU machine's Python packages: what its image holds (``device-image.txt``), what the GPU check carries
(``device-wheels.txt``), whether everything ``flare.runtime`` needs at run time is one or the other, and fetching
the carried wheels for CPython 3.12 on manylinux x86_64.

``python -m flare.benchmarks.device_image check`` lists what the device would lack (exit 1), ``fetch DIR``
downloads the wheels into ``DIR/whl`` and packs onnxruntime-gpu into 58 MB parts in ``DIR/ort`` (exit 1 when a
downloaded wheel needs more than ``device-wheels.txt`` lists). The check is what ``tests/benchmarks/
test_device_image.py`` runs in CI: a dependency added to ``pyproject.toml`` that the device lacks fails there, not
after minutes of device time.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMAGE_FILE = HERE / "device-image.txt"
WHEELS_FILE = HERE / "device-wheels.txt"
PACK_TOOL = "pack-wheel-chunks.sh"  # in ../shared/tools beside the repository
#: marker environment of the device's interpreter (/opt/torch/.venv/bin/python3: CPython 3.12.3, Linux x86_64)
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
                  "platform_machine": "x86_64", "os_name": "posix", "implementation_version": "3.12.3"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


@dataclass(frozen=True)
class Carried:
    """One carried distribution: exact version, how it travels, the extras flare asks for, its requirements."""

    name: str
    version: str
    how: str  # "wheel" or "parts"
    extras: tuple[str, ...]
    requires: tuple[str, ...]


def _lines(path: Path) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()]


def read_image(path: Path = IMAGE_FILE) -> dict[str, str | None]:
    """Distribution name -> version (None where the list gives none) of the device image."""
    out: dict[str, str | None] = {}
    for ln in _lines(path):
        name, _, version = ln.partition("==")
        out[canonical(name)] = version or None
    return out


def read_wheels(path: Path = WHEELS_FILE) -> dict[str, Carried]:
    """Distribution name -> :class:`Carried` of ``device-wheels.txt``."""
    out: dict[str, Carried] = {}
    for ln in _lines(path):
        spec, how, extras, *requires = ln.split()
        name, _, version = spec.partition("==")
        if how not in ("wheel", "parts") or not version:
            raise ValueError(f"{path}: bad line {ln!r} (want: name==version wheel|parts extras|- requires...|-)")
        out[canonical(name)] = Carried(canonical(name), version, how,
                                       tuple(e for e in extras.split(",") if e != "-"),
                                       tuple(canonical(r) for r in requires if r != "-"))
    return out


def device_requirements(requires: list[str] | None, extras: tuple[str, ...] = ()) -> list[Any]:
    """The ``Requires-Dist`` entries that apply on the device with ``extras`` asked for (packaging Requirements)."""
    from packaging.requirements import Requirement

    out = []
    for text in requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**DEVICE_MARKERS, "extra": e}) for e in ("",) + extras):
            out.append(req)
    return out


def _installed_requires(name: str) -> list[str] | None:
    try:
        return metadata.requires(name)
    except metadata.PackageNotFoundError:
        return None


def uncovered(project: str = "flare-seg", extras: tuple[str, ...] = ("gpu",),
              image: dict[str, str | None] | None = None, carried: dict[str, Carried] | None = None) -> list[str]:
    """What ``project`` (its base requirements plus ``extras``, transitively) needs on the device that is neither in
    the image nor carried, or carried/preinstalled in a version its requirement excludes: one line per problem,
    with the chain that needs it. Requirements of a carried distribution are its listed ones plus, when it is
    installed here, those of its installed metadata; the image's own packages are taken as complete."""
    image = read_image() if image is None else image
    carried = read_wheels() if carried is None else carried
    problems: list[str] = []
    seen: set[str] = set()
    todo: list[tuple[Any, str]] = [(r, project) for r in device_requirements(_installed_requires(project), extras)]
    while todo:
        req, chain = todo.pop()
        name = canonical(req.name)
        version = image.get(name) if name in image else (carried[name].version if name in carried else None)
        if name not in image and name not in carried:
            problems.append(f"{name} (needed by {chain}) is neither in the device image nor carried")
            continue
        if version is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{name}=={version} does not satisfy {req} (needed by {chain})")
        if name in seen or name in image:
            continue
        seen.add(name)
        c = carried[name]
        reqs = [r for r in device_requirements(_installed_requires(name), c.extras + tuple(req.extras))]
        from packaging.requirements import Requirement

        reqs += [Requirement(r) for r in c.requires]
        todo += [(r, f"{chain} -> {name}") for r in reqs]
    return sorted(set(problems))


def wheel_requires(wheel: Path, extras: tuple[str, ...]) -> set[str]:
    """Names a downloaded wheel requires on the device with ``extras`` (from its METADATA)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    reqs = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
    return {canonical(r.name) for r in device_requirements(reqs, extras)}


def pip_download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps`` of ``spec`` for the device (CPython 3.12, manylinux x86_64) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest), spec]
    for p in PLATFORMS:
        cmd[-1:-1] = ["--platform", p]
    subprocess.run(cmd, check=True)
    name = canonical(spec.split("==")[0])
    got = [w for w in dest.glob("*.whl") if canonical(w.name.split("-")[0]) == name]
    new = [w for w in got if w not in before] or got
    if not new:
        raise FileNotFoundError(f"pip download {spec}: no wheel in {dest}")
    return new[0]


def fetch(target: Path, tools: Path | None = None) -> list[str]:
    """Download every carried wheel into ``target/whl`` and pack the ``parts`` ones into ``target/ort``; returns
    problems (a wheel requiring more than listed)."""
    tools = tools or HERE.parents[1] / "shared" / "tools"
    problems = []
    for c in read_wheels().values():
        spec = f"{c.name}=={c.version}"
        if c.how == "parts":
            with tempfile.TemporaryDirectory() as tmp:
                whl = pip_download(spec, Path(tmp))
                extra = wheel_requires(whl, c.extras) - set(c.requires)
            subprocess.run(["sh", str(tools / PACK_TOOL), spec, str(target / "ort")], check=True)
        else:
            whl = pip_download(spec, target / "whl")
            extra = wheel_requires(whl, c.extras) - set(c.requires)
        if extra:
            problems.append(f"{spec} requires {', '.join(sorted(extra))}, not listed in {WHEELS_FILE.name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["check"]:
        problems = uncovered()
    elif args[:1] == ["fetch"] and len(args) == 2:
        problems = fetch(Path(args[1]))
    else:
        print("usage: python -m flare.benchmarks.device_image check | fetch DIR", file=sys.stderr)
        return 2
    for p in problems:
        print(f"device_image: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
