"""Error analysis and population views over model outputs: pure numpy (torch tensors accepted).

Per sample: cross-entropy loss, top-k predictions with probabilities, correctness.
Per slice: the confusion matrix, the most confused label pairs, the samples most confused
between two labels. Population: a 2-D projection of per-sample embeddings.

Examples:
    >>> logits = np.array([[2.0, 0.0], [0.0, 1.0]]); gt = np.array([0, 0])
    >>> correct(logits, gt)
    array([ True, False])
    >>> confusion_matrix(gt, predictions(logits), 2)
    array([[1, 1],
           [0, 0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _numpy(values: np.ndarray | torch.Tensor | Sequence, dtype: type | None = None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _logits_2d(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    array = _numpy(logits, np.float64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"logits must be [N, C] with C >= 1, got shape {array.shape}")
    return array


def _targets(targets: np.ndarray | torch.Tensor | Sequence[int], n: int, classes: int) -> np.ndarray:
    array = _numpy(targets).astype(np.int64).reshape(-1)
    if len(array) != n:
        raise ValueError(f"got {len(array)} targets for {n} samples")
    if n and (array.min() < 0 or array.max() >= classes):
        raise ValueError(f"targets must be label indices in 0..{classes - 1}")
    return array


def softmax(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise softmax of logits [N, C] (numerically stable), float64."""
    z = _logits_2d(logits)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    """Per-sample cross-entropy loss [N] (natural log) of logits [N, C] against label indices [N]."""
    z = _logits_2d(logits)
    y = _targets(targets, len(z), z.shape[1])
    shifted = z - z.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(z)), y]


def predictions(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Predicted label index [N] (argmax; ties go to the lower index)."""
    return _logits_2d(logits).argmax(axis=1)


def correct(logits: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    """Whether each sample's prediction equals its target: bool [N]."""
    z = _logits_2d(logits)
    return predictions(z) == _targets(targets, len(z), z.shape[1])


def top_k(probabilities: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable labels per sample: ``(indices [N, k], probabilities [N, k])``, most probable first.

    ``k`` is capped at the number of labels; ties keep the lower index first.
    """
    p = _logits_2d(probabilities)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, p.shape[1])
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(p, order, axis=1)


@dataclass(frozen=True)
class SampleError:
    """Error analysis of one sample: loss, prediction, confidence, correctness and the top-k (label, probability)."""

    loss: float
    prediction: int
    confidence: float
    correct: bool
    top_k: list[tuple[int, float]]


def sample_errors(logits: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor | Sequence[int],
                  k: int = 3) -> list[SampleError]:
    """Per-sample error analysis of a batch of logits [N, C] against label indices [N]."""
    probs = softmax(logits)
    losses = cross_entropy(logits, targets)
    hits = correct(logits, targets)
    indices, values = top_k(probs, k)
    return [
        SampleError(float(losses[i]), int(indices[i, 0]), float(values[i, 0]), bool(hits[i]),
                    [(int(c), float(p)) for c, p in zip(indices[i], values[i])])
        for i in range(len(probs))
    ]


def confusion_matrix(targets: np.ndarray | Sequence[int], predicted: np.ndarray | Sequence[int],
                     classes: int) -> np.ndarray:
    """Counts [classes, classes]: row = true label, column = predicted label."""
    y = _numpy(targets).reshape(-1)
    y, p = _targets(y, len(y), classes), _targets(predicted, len(y), classes)
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (y, p), 1)
    return matrix


def most_confused_pairs(matrix: np.ndarray, top: int = 5) -> list[tuple[int, int, int]]:
    """The largest off-diagonal cells of a confusion matrix: ``[(true, predicted, count), ...]``, count > 0,
    largest first (ties by true then predicted label)."""
    m = _numpy(matrix)
    pairs = [(int(t), int(p), int(m[t, p])) for t in range(m.shape[0]) for p in range(m.shape[1])
             if t != p and m[t, p] > 0]
    return sorted(pairs, key=lambda c: (-c[2], c[0], c[1]))[:top]


def most_confused_samples(sample_ids: Sequence[str], targets: np.ndarray | Sequence[int],
                          probabilities: np.ndarray | torch.Tensor, true_label: int, predicted_label: int,
                          limit: int = 10) -> list[tuple[str, float]]:
    """Samples of ``true_label`` that the model predicts as ``predicted_label``, most confidently wrong first.

    Returns ``[(sample_id, probability of predicted_label), ...]`` (at most ``limit``).
    """
    p = _logits_2d(probabilities)
    y = _targets(targets, len(p), p.shape[1])
    if len(sample_ids) != len(p):
        raise ValueError(f"got {len(sample_ids)} sample ids for {len(p)} samples")
    chosen = np.flatnonzero((y == true_label) & (p.argmax(axis=1) == predicted_label))
    chosen = chosen[np.argsort(-p[chosen, predicted_label], kind="stable")][:limit]
    return [(str(sample_ids[i]), float(p[i, predicted_label])) for i in chosen]


def project_2d(embeddings: np.ndarray | torch.Tensor, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Project embeddings [N, D] to 2-D points [N, 2] (float32) for the population view.

    ``method`` is "pca" (deterministic; the same points as scikit-learn's ``PCA``, signs included) or
    "tsne" (scikit-learn t-SNE; falls back to PCA below 5 samples). Works for any N >= 0: missing
    components (N or D below 2) are zeros.
    """
    x = _numpy(embeddings, np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
    if method not in ("pca", "tsne"):
        raise ValueError(f"unknown projection method {method!r}; use 'pca' or 'tsne'")
    out = np.zeros((len(x), 2), dtype=np.float32)
    x = x - x.mean(axis=0, keepdims=True) if len(x) else x
    components = min(2, len(x) - 1, x.shape[1])
    if components < 1 or not np.any(x):
        return out
    if method == "tsne" and len(x) >= 5:
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed)
        return tsne.fit_transform(x).astype(np.float32)
    out[:, :components] = _principal_components(x, components)
    return out


def _principal_components(centered: np.ndarray, components: int) -> np.ndarray:
    """Coordinates of centered rows on their first principal axes, with scikit-learn's sign rule (each
    axis points where its largest loading is positive). numpy's SVD, not ``sklearn.decomposition.PCA``:
    importing scikit-learn takes 1.4 s of CPU, a quarter of what a 5,000-sample batch job on 2 cores
    spends after its last shard (``benchmarks/results/batch.md``)."""
    u, s, vt = np.linalg.svd(centered, full_matrices=False)
    signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    signs[signs == 0] = 1
    return (u[:, :components] * s[:components]) * signs[:components]
