"""Export what the page shows: the viewer's maps as PNG and ``.npy``, the sample list as CSV."""

from __future__ import annotations

import atexit
import contextlib
import functools
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CSV_COLUMNS = ["sample_id", "gt", "prediction", "confidence", "loss"]
#: An export folder older than this is removed by the next export (Gradio copies what a handler returns
#: into its own cache before it answers, so the browser never needs the folder itself for long).
KEEP_EXPORTS_S = 600.0


@functools.cache
def export_root() -> Path:
    """This process's folder of exports, made on first use and removed when the process exits."""
    root = Path(tempfile.mkdtemp(prefix="camscope-export-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _new_folder() -> Path:
    """A fresh folder under :func:`export_root`; folders older than :data:`KEEP_EXPORTS_S` go first."""
    root = export_root()
    now = time.time()
    for old in root.iterdir():
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > KEEP_EXPORTS_S:
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root))


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
    folder = _new_folder()
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
