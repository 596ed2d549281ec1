"""Small hand-made projects for the store, batch-job and cluster tests (importable by Ray workers as
``projects:TINY`` with ``tests/`` on PYTHONPATH).

Sample ids are numbers, except ``bad*`` (the loader raises), ``nan*`` (a NaN in the input) and
``shape*`` (an input of the wrong shape): each must fail alone, reported by its id.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from camscope.project import Connection, DataSlice, ModelRun, Project


class TwoViews(nn.Module):
    """Two 8x8 inputs, one conv branch each, a fused conv: depths differ per connection."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        fused = torch.relu(self.head(torch.cat([self.a(left), self.b(right)], 1)))
        return self.fc(fused.mean((-2, -1)))


def load(sample_id: str, delay: float = 0.0) -> dict[str, np.ndarray]:
    """Random 8x8 views seeded by the id; the special ids fail as the module docstring says."""
    if sample_id.startswith("bad"):
        raise OSError(f"cannot read sample {sample_id}")
    time.sleep(delay)
    seed = int("".join(ch for ch in sample_id if ch.isdigit()) or 0)
    rng = np.random.default_rng(seed)
    views = {"left": rng.random((1, 8, 8), dtype=np.float32), "right": rng.random((1, 8, 8), dtype=np.float32)}
    if sample_id.startswith("nan"):
        views["left"][0, 3, 3] = np.nan
    if sample_id.startswith("shape"):
        views["right"] = rng.random((1, 9, 8), dtype=np.float32)
    return views


def _gt(classes: int):
    def ground_truth(sample_id: str) -> int:
        digits = "".join(ch for ch in sample_id if ch.isdigit())
        return int(digits or 0) % classes
    return ground_truth


def tiny_project(classes: int = 3, samples: int = 10, delay: float = 0.0, bad: int = 0, odd: bool = False,
                 quick: int = 0) -> Project:
    """A two-input project of ``samples`` random samples (+ ``bad`` failing ones, + one NaN and one
    wrong-shape sample with ``odd``); each takes ``delay`` seconds to load, except the first ``quick``."""
    ids = [str(i) for i in range(samples)] + [f"bad{i}" for i in range(bad)] + (["nan1", "shape1"] if odd else [])
    return Project(
        "tiny",
        [f"c{i}" for i in range(classes)],
        [Connection("left", (1, 8, 8)), Connection("right", (1, 8, 8))],
        [DataSlice("val", ids, lambda sid: load(sid, 0.0 if sid in ids[:quick] else delay), _gt(classes)),
         DataSlice("train", [str(i) for i in range(100, 104)], load, _gt(classes))],
        [ModelRun("m", lambda: TwoViews(classes).eval()), ModelRun("n", lambda: TwoViews(classes).eval())],
    )


TINY = tiny_project(bad=1)
#: A slice whose shard grid the exactly-once test walks with several --limit / --batch-size values.
GRID = tiny_project(samples=100)
#: Failures of every kind next to good samples.
ODD = tiny_project(samples=6, bad=1, odd=True)
#: 24 samples of which all but the first shard's (4) take 2 s each to load: a job killed once its first
#: shard is committed still has the others to do (then it is resumed).
RESUME = tiny_project(samples=24, delay=2.0, quick=4)
#: 48 samples that take 0.25 s each to load (the cluster test kills an actor while they run).
SLOW = tiny_project(samples=48, delay=0.25)
