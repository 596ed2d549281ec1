"""Error analysis and 2-D projection, checked against hand-computed answers."""

import math

import numpy as np
import pytest
import torch

from camscope.analysis import (
    confusion_matrix,
    correct,
    cross_entropy,
    most_confused_pairs,
    most_confused_samples,
    predictions,
    project_2d,
    sample_errors,
    softmax,
    top_k,
)

LOGITS = np.array([[2.0, 0.0], [0.0, 1.0]])
TARGETS = np.array([0, 0])


def test_cross_entropy_matches_hand_computed_values_and_torch():
    expected = [math.log(1 + math.exp(-2)), math.log(1 + math.e)]
    np.testing.assert_allclose(cross_entropy(LOGITS, TARGETS), expected, rtol=1e-12)
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 30  # large: must stay stable
    targets = torch.arange(7) % 5
    reference = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none").numpy()
    np.testing.assert_allclose(cross_entropy(logits, targets), reference, rtol=1e-10)


def test_predictions_correctness_and_softmax():
    assert predictions(LOGITS).tolist() == [0, 1]
    assert correct(LOGITS, TARGETS).tolist() == [True, False]
    np.testing.assert_allclose(softmax([[0.0, math.log(3.0)]]), [[0.25, 0.75]])


def test_top_k_orders_by_probability_and_caps_k():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    indices, values = top_k(probs, 2)
    assert indices.tolist() == [[1, 2], [0, 1]]  # tie between 1 and 2 keeps the lower index first
    np.testing.assert_allclose(values, [[0.6, 0.3], [0.5, 0.25]])
    assert top_k(probs, 10)[0].shape == (2, 3)
    with pytest.raises(ValueError, match="k must be"):
        top_k(probs, 0)


def test_sample_errors_summarise_each_sample():
    first, second = sample_errors(LOGITS, TARGETS, k=2)
    assert (first.prediction, first.correct) == (0, True)
    assert (second.prediction, second.correct) == (1, False)
    assert second.loss == pytest.approx(math.log(1 + math.e))
    assert second.confidence == pytest.approx(math.e / (1 + math.e))
    assert [label for label, _ in second.top_k] == [1, 0]


def test_confusion_matrix_and_most_confused_pairs():
    gt = [0, 0, 1, 2, 2, 2]
    pred = [0, 1, 1, 2, 0, 0]
    matrix = confusion_matrix(gt, pred, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 1]]
    assert most_confused_pairs(matrix) == [(2, 0, 2), (0, 1, 1)]
    assert most_confused_pairs(matrix, top=1) == [(2, 0, 2)]
    with pytest.raises(ValueError, match="label indices"):
        confusion_matrix([0, 3], [0, 1], 3)


def test_most_confused_samples_ranks_confident_mistakes_first():
    ids = ["a", "b", "c", "d"]
    gt = [2, 2, 2, 1]
    probs = np.array([[0.7, 0.1, 0.2],   # 2 predicted as 0 with 0.7
                      [0.9, 0.05, 0.05],  # 2 predicted as 0 with 0.9: most confused
                      [0.1, 0.1, 0.8],   # correct
                      [0.8, 0.1, 0.1]])  # a 1, not a 2
    assert most_confused_samples(ids, gt, probs, true_label=2, predicted_label=0) == [("b", 0.9), ("a", 0.7)]
    assert most_confused_samples(ids, gt, probs, 2, 0, limit=1) == [("b", 0.9)]
    assert most_confused_samples(ids, gt, probs, 0, 2) == []


@pytest.mark.parametrize("n", [0, 1, 2, 3, 40])
def test_project_2d_shapes_for_tiny_and_normal_inputs(n):
    points = project_2d(np.random.default_rng(0).normal(size=(n, 6)))
    assert points.shape == (n, 2) and points.dtype == np.float32
    assert np.isfinite(points).all()


def test_project_2d_separates_clusters_and_is_deterministic():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 0.1, (10, 8)), rng.normal(5, 0.1, (10, 8))])
    points = project_2d(torch.from_numpy(x))
    gap = abs(points[:10, 0].mean() - points[10:, 0].mean())
    assert gap > 10 * points[:10, 0].std()
    np.testing.assert_array_equal(points, project_2d(x))
    assert not project_2d(np.ones((4, 3))).any()  # identical embeddings: all at the origin
    assert project_2d(x[:, :1]).shape == (20, 2)   # one feature: second coordinate is zero


@pytest.mark.parametrize("shape", [(3, 2), (50, 8), (200, 64), (30, 1)])
def test_project_2d_pca_is_scikit_learns_pca(shape):
    from sklearn.decomposition import PCA

    x = np.random.default_rng(shape[0]).normal(size=shape) @ np.diag(np.linspace(3, 0.5, shape[1]))
    components = min(2, shape[0] - 1, shape[1])
    expected = np.zeros((shape[0], 2))
    expected[:, :components] = PCA(n_components=components, svd_solver="full").fit_transform(x)
    np.testing.assert_allclose(project_2d(x), expected, rtol=1e-4, atol=1e-5)


def test_project_2d_tsne_and_bad_input():
    x = np.random.default_rng(2).normal(size=(12, 5))
    assert project_2d(x, method="tsne").shape == (12, 2)
    assert project_2d(x[:3], method="tsne").shape == (3, 2)
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(x, method="umap-ish")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        project_2d(np.zeros(5))
