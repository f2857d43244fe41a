"""The model card of a bundle: what its models were trained on and what they are for (``bundle.json`` field ``card``).

Schema (``$defs.card`` of ``bundle.schema.json``; every field optional, unknown fields refused)::

    "card": {
      "dataset": "flare-phantoms",            # name of the training data set
      "cases": 34,                            # number of training cases
      "data": "synthetic",                    # synthetic | real | mixed | unknown
      "recipe": "tiny",                       # training config (flare-train --config) or "auto3dseg segresnet"
      "trained_at": "2026-12-04",             # date (ISO 8601) of the training
      "validation": "held-out ensemble, 6 cases vs labelsFull",
      "validation_dice": {"liver": 0.91, ...},  # per-class validation Dice, label names of the registry
      "intended_use": "...",
      "licence": "Apache-2.0 (weights)",
      "notes": "..."
    }

Bundles written before the card existed (and cards with missing fields) load with ``"unknown"`` for what they do
not say: the format version stays 1. ``flare-train`` writes ``card.json`` into its checkpoint folder,
``flare-export`` copies it into the bundle (or derives what it can from the checkpoints, or takes ``--card FILE``,
read by :func:`flare.runtime.bundle.manifest.read_card_file`),
``flare-demo`` (which runs both) gets the phantoms' held-out Dice that way. A bundle whose ``data`` is ``synthetic`` makes ``flare-run`` warn on every run
(:meth:`ModelCard.warning`).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CARD_FILE", "DATA_KINDS", "UNKNOWN", "ModelCard", "card_from_raw"]

UNKNOWN = "unknown"
DATA_KINDS = ("synthetic", "real", "mixed", UNKNOWN)
#: the card ``flare-train`` writes into its checkpoint folder (and ``flare-export`` reads from there)
CARD_FILE = "card.json"
DEFAULT_INTENDED_USE = ("research and engineering only: not a medical device, not for diagnosis or treatment "
                        "decisions")


@dataclass(frozen=True)
class ModelCard:
    dataset: str = UNKNOWN
    cases: int | None = None
    data: str = UNKNOWN
    recipe: str = UNKNOWN
    trained_at: str = UNKNOWN
    validation: str = UNKNOWN
    validation_dice: dict[str, float] = field(default_factory=dict)
    intended_use: str = DEFAULT_INTENDED_USE
    licence: str = UNKNOWN
    notes: str = ""

    @property
    def synthetic(self) -> bool:
        return self.data == "synthetic"

    def warning(self) -> str | None:
        """The one line ``flare-run`` prints (and records) with a bundle trained on synthetic data, else None."""
        if not self.synthetic:
            return None
        return (f"this bundle's models were trained on synthetic data ({self.dataset}, recipe {self.recipe}): "
                "a demonstration model, its segmentations of real CTs are not meaningful")

    def series_note(self) -> str:
        """A short tag for places with little room (the DICOM-SEG series description): empty unless synthetic."""
        return "SYNTHETIC-DATA MODEL, NOT FOR CLINICAL USE" if self.synthetic else ""

    def summary(self) -> dict[str, Any]:
        """What the run report and ``summary.json`` record about the models (``warning``: see :meth:`warning`)."""
        return {"dataset": self.dataset, "data": self.data, "cases": self.cases, "recipe": self.recipe,
                "trained_at": self.trained_at, "intended_use": self.intended_use, "warning": self.warning()}

    def to_json(self) -> dict[str, Any]:
        """The ``card`` object of bundle.json (``cases`` left out when unknown)."""
        doc = asdict(self)
        if doc["cases"] is None:
            del doc["cases"]
        if not doc["notes"]:
            del doc["notes"]
        return doc

    def merged(self, other: dict[str, Any]) -> ModelCard:
        """This card with the fields given in ``other`` (a partial card object) replacing its own."""
        return card_from_raw({**self.to_json(), **other})

    @staticmethod
    def today() -> str:
        return _dt.date.today().isoformat()


def card_from_raw(raw: Any) -> ModelCard:
    """A :class:`ModelCard` from a (schema-checked) ``card`` object; None or missing fields are ``unknown``."""
    if not isinstance(raw, dict):
        return ModelCard()
    known = {k: v for k, v in raw.items() if k in ModelCard.__dataclass_fields__}
    if "validation_dice" in known:
        known["validation_dice"] = {str(k): float(v) for k, v in known["validation_dice"].items()}
    return ModelCard(**known)
