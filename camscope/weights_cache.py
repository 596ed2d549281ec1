"""Trained weights cached on disk, keyed by a hash of everything that determines them.

One process trains; the others wait on a file lock and load the result (safetensors: weights only,
never a pickle).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from camscope.demo_data import cache_dir


def weights_path(name: str, key: dict) -> Path:
    """``<cache>/demo-<name>-<hash of key, the torch version>.safetensors``."""
    text = json.dumps({**key, "torch": torch.__version__[:4]}, sort_keys=True, default=str)
    return cache_dir() / f"demo-{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.safetensors"


def cached_model(path: Path, make: Callable[[], nn.Module], fit: Callable[[nn.Module], None]) -> nn.Module:
    """``make()`` with the weights at ``path``, or ``fit`` it (in place, first use) and save them; eval mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = make()
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        started = time.perf_counter()
        with torch.enable_grad():  # a first use may come from inside a caller's torch.no_grad()
            fit(model)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(model.state_dict(), str(tmp), metadata={"train_seconds": f"{time.perf_counter() - started:.1f}"})
        os.replace(tmp, path)
    return model.eval()
