"""How the engine takes the gradients of K labels at every explained layer, and which way is fastest.

Every strategy returns the same numbers (d y_c / dA for each label ``c``, to float rounding); they
differ only in how the K vector-Jacobian products are scheduled:

- ``"sequential"``: one ``torch.autograd.grad`` per label (``retain_graph=True``), what a user writes
  by hand. The maps of a label are computed while its gradients are at hand, so only one label's
  gradients exist at once; on CPU it is the fastest for ResNet-sized layers.
- ``"batched"``: one ``torch.autograd.grad(..., is_grads_batched=True)`` per chunk of labels. Its
  legacy vmap has no batching rule for the convolution backward on CPU, loops over the labels and
  concatenates the results: about 1.2x ``sequential`` on CPU. Kept for measurement.
- ``"folded"``: ``torch.func.vmap`` over ``torch.autograd.grad``: the labels are folded into the
  batch dimension of every backward op (one convolution backward on ``[K*B, ...]``), which fills a
  GPU far better than K small backward passes; on CPU it wins for small layers and batches and loses
  (about 1.15-1.2x) on ResNet-18 at 8x160x160 (``benchmarks/results/engine.md``). PyTorch has no
  batching rule for the CPU flash-attention backward: there vmap loops over the labels for that op
  alone (its warning is silenced; the probe times the cost). Folding all 10 labels of ViT-B/16 at
  8x112x112 measured 1.12-1.31x the sequential floor on CPU (``benchmarks/results/engine-vit.md``).
- ``"auto"`` (the engine's default): a one-time probe per engine, device and label count that times
  ``sequential`` and ``folded`` on the first batch, with all its labels, and keeps the faster.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Sequence

import torch

#: Strategies a user may name; ``"auto"`` probes.
STRATEGIES = ("auto", "sequential", "batched", "folded")
#: What the ``"auto"`` probe compares (``batched`` is never faster than ``folded``: it loops on CPU and GPU).
PROBED = ("sequential", "folded")
#: A probe run at least this long (wall seconds, CPU) is timed once, by its warm-up: one-time costs are
#: a small part of it, and repeating it would make the probe cost several ``explain`` calls (a ViT).
TIME_ONCE_ABOVE_S = 1.0
#: PyTorch's warning when an op has no vmap batching rule and ``folded`` loops over the labels for that
#: op alone (the CPU flash-attention backward): not an error, and the probe times the cost.
_VMAP_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


def one_hot_seeds(logits: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """``[K, B, classes]`` seeds: row ``k`` selects label ``labels[k]`` for every sample."""
    seeds = torch.zeros((len(labels), *logits.shape), dtype=logits.dtype, device=logits.device)
    seeds[torch.arange(len(labels)), :, torch.tensor(labels)] = 1.0
    return seeds


def backward(strategy: str, logits: torch.Tensor, wrt: Sequence[torch.Tensor],
             seeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``d(sum(seeds[k] * logits)) / d wrt[i]`` as one ``[K, *wrt[i].shape]`` tensor per ``wrt[i]``."""
    wrt = list(wrt)
    if strategy == "sequential":
        rows = [torch.autograd.grad(logits, wrt, grad_outputs=seed, retain_graph=True) for seed in seeds]
        if len(rows) == 1:
            return tuple(grad.unsqueeze(0) for grad in rows[0])
        return tuple(torch.stack(per_layer) for per_layer in zip(*rows))
    if strategy == "batched":
        return torch.autograd.grad(logits, wrt, grad_outputs=seeds, is_grads_batched=True, retain_graph=True)
    if strategy == "folded":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_VMAP_FALLBACK_WARNING)
            return torch.func.vmap(
                lambda seed: torch.autograd.grad(logits, wrt, grad_outputs=seed, retain_graph=True))(seeds)
    raise ValueError(f"unknown gradient strategy {strategy!r}; choose from {list(STRATEGIES)}")


def labels_per_pass(strategy: str, labels: int, per_label: int, budget: int) -> int:
    """How many labels one backward call takes: one for ``sequential``, else as many as ``budget`` allows."""
    if strategy == "sequential":
        return 1
    return max(1, min(labels, budget // max(per_label, 1)))


def fastest(logits: torch.Tensor, wrt: Sequence[torch.Tensor], labels: Sequence[int],
            candidates: Sequence[str] = PROBED) -> str:
    """The candidate whose backward for ``labels`` (one chunk, as ``explain`` will run it) is fastest
    here: the best of two interleaved timings after one warm-up each, or on CPU, when every warm-up
    took ``TIME_ONCE_ABOVE_S`` or more, the warm-ups themselves. A candidate that fails (an op with no
    batching rule, a compiled backward that vmap cannot enter) drops out.

    The probe runs every label of the chunk, not a few: folding two labels into the batch can win
    where folding ten loses (ResNet-18 on CPU), so a short probe picks wrong.
    """
    seeds = one_hot_seeds(logits, list(labels))
    runs: dict[str, Callable[[], object]] = {
        name: (lambda name=name: backward(name, logits, wrt, seeds)) for name in candidates
    }
    usable, warm_up = {}, {}
    for name, run in runs.items():
        try:
            warm_up[name] = _seconds(run, logits.device)
        except Exception:  # noqa: BLE001 - any failure only means this strategy is not usable here
            continue
        usable[name] = run
    if not usable:
        return "sequential"
    if logits.device.type != "cuda" and min(warm_up.values()) >= TIME_ONCE_ABOVE_S:
        return min(warm_up, key=warm_up.get)
    timings = {name: float("inf") for name in usable}
    for _ in range(2):
        for name, run in usable.items():
            timings[name] = min(timings[name], _seconds(run, logits.device))
    return min(timings, key=timings.get)


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall seconds ``run`` takes (GPU: after synchronizing). Not CPU time: threads that spin while
    they wait for each other count as busy, which favours fewer, larger ops for no real gain."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start
