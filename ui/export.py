"""Export what the page shows: the viewer's maps as PNG and ``.npy``, the sample list as CSV."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CSV_COLUMNS = ["sample_id", "gt", "prediction", "confidence", "loss"]


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(text)).strip("_") or "x"


def export_files(stem: str, pictures: Sequence[tuple[str, np.ndarray]], maps: Sequence[tuple[str, np.ndarray]],
                 samples: pd.DataFrame, listed: Sequence[str]) -> list[str]:
    """Write each picture as ``<stem>-<name>.png``, each raw map as ``<stem>-<name>.npy`` (float32, as the
    engine computed it, dequantized) and the listed samples' rows as ``sample-list.csv``; the paths.

    Args:
        stem: names the exported view (run, sample, algorithm, layer, label).
        pictures: (name, RGB uint8 array) pairs.
        maps: (name, raw 2-D map) pairs.
        samples: the slice's population (sample_id, gt, prediction, confidence, loss).
        listed: the sample list's ids, in order.
    """
    folder = Path(tempfile.mkdtemp(prefix="camscope-export-"))
    paths = []
    for name, picture in pictures:
        path = folder / f"{safe_name(stem)}-{safe_name(name)}.png"
        Image.fromarray(np.asarray(picture, dtype=np.uint8)).save(path)
        paths.append(path)
    for name, heat in maps:
        path = folder / f"{safe_name(stem)}-{safe_name(name)}.npy"
        np.save(path, np.asarray(heat, dtype=np.float32), allow_pickle=False)
        paths.append(path)
    rows = samples.set_index(samples["sample_id"].astype(str)).reindex([str(i) for i in listed])
    table = pd.DataFrame({"sample_id": [str(i) for i in listed]})
    for column in CSV_COLUMNS[1:]:
        table[column] = rows[column].to_numpy() if column in rows else np.nan
    path = folder / "sample-list.csv"
    table.to_csv(path, index=False)
    paths.append(path)
    return [str(p) for p in paths]
