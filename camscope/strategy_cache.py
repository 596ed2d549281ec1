"""The gradient strategy the engine's ``"auto"`` probe chose, kept in a directory of this machine so
that later engines (a job's other actors, the next job on the node) skip the probe.

One small JSON file per key; the key is a hash of everything the choice depends on: torch's version,
the device (CPU model and core count, or the GPU's name), torch's threads, the model (its class and
every parameter's name, shape and dtype), the shapes of the explained activations (batch included),
the dtype, compiling and the labels per backward. A file that cannot be read or holds no known
strategy is ignored (the engine probes again and rewrites it).

Examples:
    >>> key = strategy_key(model, logits, wrt, labels=10, compiled=False)
    >>> cached_strategy("/tmp/strategies", key) is None   # first engine: probe, then
    True
    >>> save_strategy("/tmp/strategies", key, "folded")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from camscope.gradients import STRATEGIES


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor or machine name elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} x{os.cpu_count()}"


def strategy_key(model: nn.Module, logits: torch.Tensor, wrt: Sequence[torch.Tensor], labels: int,
                 compiled: bool) -> str:
    """A hash of everything the probe's choice depends on (see the module docstring)."""
    parts = {
        "torch": torch.__version__,
        "device": device_name(logits.device),
        "threads": torch.get_num_threads(),
        "model": type(model).__qualname__,
        "parameters": [(name, list(p.shape), str(p.dtype)) for name, p in model.named_parameters()],
        "activations": [list(t.shape) for t in wrt],
        "dtype": str(logits.dtype),
        "compiled": compiled,
        "labels": labels,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cached_strategy(directory: str | os.PathLike, key: str) -> str | None:
    """The strategy stored under ``key``, or None (absent, unreadable or not a known strategy)."""
    with contextlib.suppress(OSError, ValueError):
        entry = json.loads((Path(directory) / f"{key}.json").read_text())
        strategy = entry.get("strategy") if isinstance(entry, dict) else None
        if strategy in STRATEGIES and strategy != "auto":
            return strategy
    return None


def save_strategy(directory: str | os.PathLike, key: str, strategy: str) -> None:
    """Store ``strategy`` under ``key`` (written whole, then renamed: a reader never sees half a file).
    A directory that cannot be written only means the next engine probes again."""
    with contextlib.suppress(OSError):
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
            json.dump({"strategy": strategy}, handle)
        os.replace(handle.name, folder / f"{key}.json")
