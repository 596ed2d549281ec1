"""The population's 2-D projections, computed once per slice by the batch job and stored in the
samples table: PCA (scikit-learn, also the contract's default ``x, y``), UMAP (umap-learn) and t-SNE
(scikit-learn), each seeded so a re-run writes the same coordinates.

Examples:
    >>> coords = project_all(np.random.rand(500, 64).astype(np.float32))
    >>> sorted(coords), coords["umap"].shape
    (['pca', 'tsne', 'umap'], (500, 2))
"""

from __future__ import annotations

import os
import warnings
from typing import Iterable

import numpy as np

from camscope.analysis import project_2d

METHODS = ("pca", "umap", "tsne")
SEED = 0
#: Below this many samples UMAP and t-SNE have no neighbourhoods to keep: they fall back to PCA.
MIN_SAMPLES = 8
#: Chooses the projections to compute (comma-separated); the others are stored as NaN.
ENV = "CAMSCOPE_PROJECTIONS"


def chosen_methods(methods: Iterable[str] | None = None) -> tuple[str, ...]:
    """The methods to compute: ``methods``, else ``$CAMSCOPE_PROJECTIONS``, else all of :data:`METHODS`."""
    if methods is None:
        text = os.environ.get(ENV, "")
        methods = [m.strip() for m in text.split(",") if m.strip()] or METHODS
    chosen = tuple(dict.fromkeys(methods))
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown projection {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return chosen


def project(embeddings: np.ndarray, method: str) -> np.ndarray:
    """``[N, 2]`` float32 coordinates of ``embeddings`` ``[N, D]`` by ``method``."""
    x = np.asarray(embeddings, dtype=np.float32)
    if method == "pca" or len(x) < MIN_SAMPLES:
        return project_2d(x, "pca", seed=SEED)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=SEED,
                    max_iter=500).fit_transform(x).astype(np.float32)
    if method == "umap":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # umap warns that a seed disables its parallelism: wanted here
            import umap

            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), random_state=SEED, init="random"
                                if len(x) < 64 else "spectral")
            return reducer.fit_transform(x).astype(np.float32)
    raise ValueError(f"unknown projection {method!r}; choose from {', '.join(METHODS)}")


def project_all(embeddings: np.ndarray, methods: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Every chosen projection of ``embeddings``; methods not chosen are NaN."""
    chosen = chosen_methods(methods)
    nan = np.full((len(embeddings), 2), np.nan, dtype=np.float32)
    return {method: project(embeddings, method) if method in chosen else nan for method in METHODS}
