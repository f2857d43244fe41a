"""The installed version of flare (the ``flare-seg`` distribution), for ``--version`` and written files
(DICOM-SEG's software version)."""

from __future__ import annotations

__all__ = ["DIST", "version"]

DIST = "flare-seg"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DIST)
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
        return "unknown"
