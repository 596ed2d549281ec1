"""Bring your own model and data: the smallest complete camscope project.

    PYTHONPATH=. camscope run --project examples.my_project:project --out my-store --limit 16
    PYTHONPATH=. camscope serve --project examples.my_project:project --store my-store
    camscope ui --store my-store

Replace the random images with your loader and the random-weight ResNet with your checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from camscope.project import Connection, DataSlice, ModelRun, Project

CLASSES = ["cat", "dog", "bird"]
IMAGES = np.random.default_rng(0).random((24, 3, 96, 96), dtype=np.float32)  # your data here
LABELS = np.arange(24) % len(CLASSES)


def load(sample_id: str) -> dict[str, np.ndarray]:
    """One sample as {connection name: float32 (C, H, W)}."""
    return {"x": IMAGES[int(sample_id)]}


def ground_truth(sample_id: str) -> int:
    return int(LABELS[int(sample_id)])


def build_resnet() -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    # model.load_state_dict(torch.load("resnet18.pt", weights_only=True))  # never unpickle code
    return model.eval()


project = Project(
    name="my-project",
    label_names=CLASSES,
    connections=[Connection("x", (3, 96, 96))],  # "x": the model's forward(self, x) parameter
    slices=[
        DataSlice("train", [str(i) for i in range(16)], load, ground_truth),
        DataSlice("test", [str(i) for i in range(16, 24)], load, ground_truth),
    ],
    runs=[ModelRun("resnet18", build_resnet)],
)
