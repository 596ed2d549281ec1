"""Nearest neighbours in embedding space ("Fetch similar"): scikit-learn over the store's embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.neighbors import NearestNeighbors


def similar_ids(sample_ids: Sequence[str], embeddings: np.ndarray | Sequence, query: str, k: int = 5) -> list[str]:
    """The ``k`` samples whose embeddings are nearest (Euclidean) to ``query``'s, nearest first.

    Args:
        sample_ids: one id per embedding row.
        embeddings: ``[N, D]`` array (or a sequence of N vectors).
        query: the id of the sample to match; ValueError if it is not among ``sample_ids``.
        k: how many neighbours, the query itself excluded.
    """
    ids = [str(i) for i in sample_ids]
    if str(query) not in ids:
        raise ValueError(f"unknown sample id {query!r}: it has no embedding")
    vectors = np.asarray([np.asarray(v, dtype=np.float32) for v in embeddings])
    count = min(int(k) + 1, len(ids))
    model = NearestNeighbors(n_neighbors=count).fit(vectors)
    _, rows = model.kneighbors(vectors[ids.index(str(query))][None])
    return [ids[row] for row in rows[0] if ids[row] != str(query)][: int(k)]
