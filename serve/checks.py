"""Request checks of the ingress: each resolves a request field against the run, or raises BadRequest."""

from __future__ import annotations

import numpy as np
import pandas as pd

from camscope.algorithms import ALGORITHMS
from serve.errors import BadRequest

SAMPLE_COLUMNS = ["sample_id", "gt", "prediction", "confidence", "loss", "x", "y"]


def sample_records(frame: pd.DataFrame) -> list[dict]:
    """Sample rows as JSON-ready dicts (NaN positions become null)."""
    out = frame[SAMPLE_COLUMNS].astype({"sample_id": str}).copy()
    out["correct"] = out["gt"] == out["prediction"]
    records = out.to_dict(orient="records")
    for record in records:
        for key, value in record.items():
            if isinstance(value, float) and not np.isfinite(value):
                record[key] = None
            elif isinstance(value, np.generic):
                record[key] = value.item()
    return records


def check_algorithms(requested: list[str] | None) -> list[str]:
    """The requested algorithms (default: all three), deduplicated in order."""
    if requested is None:
        return list(ALGORITHMS)
    unknown = [name for name in requested if name not in ALGORITHMS]
    if unknown:
        raise BadRequest(f"unknown algorithm(s) {unknown}; choose from {list(ALGORITHMS)}")
    return list(dict.fromkeys(requested))


def check_layers(requested: list[str] | None, connection: str | None, described: dict) -> list[str]:
    """The requested layers of the run (default: all, or those depending on ``connection``)."""
    depths = {layer["name"]: layer["depth"] for layer in described["layers"]}
    if connection is not None and connection not in described["connections"]:
        raise BadRequest(f"unknown connection {connection!r}; known: {described['connections']}")
    if requested is None:
        return [name for name, depth in depths.items() if connection is None or connection in depth]
    unknown = [name for name in requested if name not in depths]
    if unknown:
        raise BadRequest(f"unknown layer(s) {unknown} for run {described['run']!r}; known: {list(depths)}")
    unrelated = [name for name in requested if connection is not None and connection not in depths[name]]
    if unrelated:
        raise BadRequest(f"layer(s) {unrelated} do not depend on connection {connection!r}")
    return list(dict.fromkeys(requested))


def check_labels(requested: list[int] | str | None, classes: int) -> list[int] | None:
    """The requested class indices, ascending; ``"all"`` is every class; None leaves the labels policy."""
    if requested is None:
        return None
    if requested == "all":
        return list(range(classes))
    bad = [label for label in requested if not 0 <= label < classes]
    if bad:
        raise BadRequest(f"label(s) {bad} out of range: the model has {classes} classes (0..{classes - 1})")
    return sorted(set(requested))
