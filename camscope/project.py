"""The project API: what a user declares so camscope can explain their models.

A :class:`Project` names its inputs (connections), data slices, model runs, label names and
visualizers. ``load_project("package.module:attribute")`` imports one and checks it; every
problem with a definition is a :class:`ProjectError` with a one-line message.

Examples:
    >>> project = load_project("camscope.demo:project")
    >>> batch = project.load_batch("validation", ["4000", "4001"])   # {"left": [2, 1, 64, 64], ...}
    >>> logits = project.model("cnn")(**batch)                          # [2, 10]
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Sample = dict[str, np.ndarray]
Visualizer = Callable[[Sample, dict], np.ndarray]


class ProjectError(ValueError):
    """A project definition or a request against it is invalid (the message is one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class Connection:
    """One model input: ``name`` is the model's forward parameter, ``shape`` is (C, H, W) of one image
    sample or (C, L) of one 1-D sample (a signal, audio frames, a sequence).

    ``render`` turns one sample's float array into an (H, W, 3) uint8 image.
    """

    name: str
    shape: tuple[int, ...]
    render: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if len(shape) not in (2, 3) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ProjectError(f"connection {self.name!r}: shape must be (C, H, W) or (C, L) positive ints, "
                               f"got {self.shape!r}")
        self.shape = shape


@dataclass
class DataSlice:
    """A named set of samples: ``load(id)`` gives {connection: float32 (C, H, W)}."""

    name: str
    sample_ids: list[str]
    load: Callable[[str], Sample]
    ground_truth: Callable[[str], int]
    metadata: Callable[[str], dict] | None = None
    _id_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sample_ids = [str(i) for i in self.sample_ids]
        self._id_set = frozenset(self.sample_ids)
        if not self.sample_ids:
            raise ProjectError(f"slice {self.name!r} has no samples")
        if len(self._id_set) != len(self.sample_ids):
            raise ProjectError(f"slice {self.name!r} has duplicate sample ids")
        for attr in ("load", "ground_truth"):
            if not callable(getattr(self, attr)):
                raise ProjectError(f"slice {self.name!r}: {attr} must be callable")

    def __contains__(self, sample_id: object) -> bool:
        return str(sample_id) in self._id_set


@dataclass
class ModelRun:
    """A named model: ``build()`` returns an eval-mode ``torch.nn.Module`` (training or loading weights as needed)."""

    name: str
    build: Callable[[], torch.nn.Module]
    description: str = ""


def _by_name(kind: str, items: Iterable[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """Key connections / slices / runs by their ``.name``, rejecting duplicates and mismatched keys."""
    if isinstance(items, Mapping):
        for key, item in items.items():
            if key != item.name:
                raise ProjectError(f"{kind} registered as {key!r} is named {item.name!r}")
        items = list(items.values())
    out: dict[str, Any] = {}
    for item in items:
        if item.name in out:
            raise ProjectError(f"duplicate {kind} name {item.name!r}")
        out[item.name] = item
    if not out:
        raise ProjectError(f"a project needs at least one {kind}")
    return out


def _unknown(kind: str, name: object, known: Iterable[str]) -> ProjectError:
    return ProjectError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


class Project:
    """A dataset and its models, as camscope sees them.

    Args:
        name: display name.
        label_names: one name per model output (the model returns logits [B, len(label_names)]).
        connections: the model inputs (list, or dict keyed by name).
        slices: the data slices (list, or dict keyed by name).
        runs: the model runs (list, or dict keyed by name).
        visualizers: name -> ``fn(sample, metadata) -> (H, W, 3) uint8``; call through :meth:`visualize`.
    """

    def __init__(
        self,
        name: str,
        label_names: list[str],
        connections: Iterable[Connection] | Mapping[str, Connection],
        slices: Iterable[DataSlice] | Mapping[str, DataSlice],
        runs: Iterable[ModelRun] | Mapping[str, ModelRun],
        visualizers: Mapping[str, Visualizer] | None = None,
    ) -> None:
        self.name = name
        self.label_names = [str(n) for n in label_names]
        if not self.label_names or len(set(self.label_names)) != len(self.label_names):
            raise ProjectError(f"project {name!r}: label_names must be non-empty and unique")
        self.connections: dict[str, Connection] = _by_name("connection", connections)
        self.slices: dict[str, DataSlice] = _by_name("slice", slices)
        self.runs: dict[str, ModelRun] = _by_name("run", runs)
        self.visualizers: dict[str, Visualizer] = dict(visualizers or {})
        self._models: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Pickled for Ray workers: built models and the lock stay in the process that made them.
        return {k: v for k, v in self.__dict__.items() if k not in ("_models", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._models = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"Project({self.name!r}, labels={len(self.label_names)}, connections={list(self.connections)}, "
                f"slices={list(self.slices)}, runs={list(self.runs)})")

    # -- lookups ---------------------------------------------------------------------------
    def slice(self, name: str) -> DataSlice:
        """The slice called ``name`` (ProjectError if unknown)."""
        if name not in self.slices:
            raise _unknown("slice", name, self.slices)
        return self.slices[name]

    def run(self, name: str) -> ModelRun:
        """The model run called ``name`` (ProjectError if unknown)."""
        if name not in self.runs:
            raise _unknown("run", name, self.runs)
        return self.runs[name]

    def connection(self, name: str) -> Connection:
        """The connection called ``name`` (ProjectError if unknown)."""
        if name not in self.connections:
            raise _unknown("connection", name, self.connections)
        return self.connections[name]

    def _checked_id(self, data: DataSlice, sample_id: object) -> str:
        sid = str(sample_id)
        if sid not in data:
            raise ProjectError(f"unknown sample id {sid!r} in slice {data.name!r}")
        return sid

    # -- data ------------------------------------------------------------------------------
    def sample(self, slice: str, sample_id: object) -> Sample:
        """One sample as {connection: float32 (C, H, W)}, checked against the connections."""
        data = self.slice(slice)
        sid = self._checked_id(data, sample_id)
        return self._checked_sample(data, sid, data.load(sid))

    def _checked_sample(self, data: DataSlice, sid: str, raw: object) -> Sample:
        where = f"slice {data.name!r} sample {sid!r}"
        if not isinstance(raw, Mapping):
            raise ProjectError(f"{where}: loader must return a dict of connection -> array, got {type(raw).__name__}")
        if set(raw) != set(self.connections):
            raise ProjectError(f"{where}: loader returned keys {sorted(raw)}, expected connections {sorted(self.connections)}")
        out: Sample = {}
        for name, conn in self.connections.items():
            array = np.asarray(raw[name])
            if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
                raise ProjectError(f"{where}: connection {name!r} has non-numeric dtype {array.dtype}")
            if array.shape != conn.shape:
                raise ProjectError(f"{where}: connection {name!r} has shape {array.shape}, expected {conn.shape}")
            out[name] = array.astype(np.float32, copy=False)
        return out

    def load_batch(self, slice: str, ids: Iterable[object]) -> dict[str, torch.Tensor]:
        """Stack samples into {connection: float32 tensor [B, C, H, W]} (the model's keyword inputs)."""
        ids = [str(i) for i in ids]
        if not ids:
            raise ProjectError("load_batch needs at least one sample id")
        samples = [self.sample(slice, sid) for sid in ids]
        return {name: torch.from_numpy(np.stack([s[name] for s in samples])) for name in self.connections}

    def ground_truth(self, slice: str, sample_id: object) -> int:
        """The true label index of a sample (checked to be within the label names)."""
        data = self.slice(slice)
        sid = self._checked_id(data, sample_id)
        label = data.ground_truth(sid)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < len(self.label_names):
            raise ProjectError(f"slice {slice!r} sample {sid!r}: ground truth {label!r} is not a label index "
                               f"in 0..{len(self.label_names) - 1}")
        return int(label)

    def metadata(self, slice: str, sample_id: object) -> dict:
        """Per-sample metadata (an empty dict when the slice declares none)."""
        data = self.slice(slice)
        sid = self._checked_id(data, sample_id)
        return dict(data.metadata(sid)) if data.metadata else {}

    def visualize(self, name: str, slice: str, sample_id: object) -> np.ndarray:
        """Apply visualizer ``name`` to a sample: an (H, W, 3) uint8 image."""
        if name not in self.visualizers:
            raise _unknown("visualizer", name, self.visualizers)
        image = np.asarray(self.visualizers[name](self.sample(slice, sample_id), self.metadata(slice, sample_id)))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ProjectError(f"visualizer {name!r} returned {image.dtype} {image.shape}, expected uint8 (H, W, 3)")
        return image

    def render(self, connection: str, sample: Mapping[str, np.ndarray]) -> np.ndarray:
        """Render one connection of a sample as an (H, W, 3) uint8 image (grey/RGB default when no ``render``)."""
        conn = self.connection(connection)
        array = np.asarray(sample[connection], dtype=np.float32)
        if conn.render is not None:
            return conn.render(array)
        return default_render(array)

    # -- models ----------------------------------------------------------------------------
    def model(self, run: str) -> torch.nn.Module:
        """The eval-mode model of ``run``, built once per process and checked against the project."""
        spec = self.run(run)
        with self._lock:
            if run not in self._models:
                model = spec.build()
                if not isinstance(model, torch.nn.Module):
                    raise ProjectError(f"run {run!r}: build() returned {type(model).__name__}, not a torch.nn.Module")
                model.eval()
                self._check_forward_parameters(run, model)
                self._check_output(run, model)
                self._models[run] = model
            return self._models[run]

    def _check_forward_parameters(self, run: str, model: torch.nn.Module) -> None:
        params = inspect.signature(model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        missing = [c for c in self.connections if c not in named and not takes_any]
        if missing:
            raise ProjectError(f"run {run!r}: connections {missing} are not parameters of forward{tuple(named)}")
        required = [n for n in named if params[n].default is inspect.Parameter.empty and n not in self.connections]
        if required:
            raise ProjectError(f"run {run!r}: forward parameters {required} have no connection of that name")

    def _check_output(self, run: str, model: torch.nn.Module) -> None:
        data = next(iter(self.slices.values()))
        batch = self.load_batch(data.name, data.sample_ids[:1])
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in batch.items()})
        expected = (1, len(self.label_names))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ProjectError(f"run {run!r}: model output is {got}, expected [B, {len(self.label_names)}] "
                               f"(one logit per label name)")

    # -- checks ----------------------------------------------------------------------------
    def check(self, models: bool = False) -> Project:
        """Load the first sample of every slice (and build every model if ``models``); raise ProjectError on a problem."""
        for data in self.slices.values():
            self.sample(data.name, data.sample_ids[0])
            self.ground_truth(data.name, data.sample_ids[0])
        for name, fn in self.visualizers.items():
            if not callable(fn):
                raise ProjectError(f"visualizer {name!r} is not callable")
        if models:
            for run in self.runs:
                self.model(run)
        return self


def default_render(array: np.ndarray) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8: grey for 1 channel, the first three channels otherwise.
    A 1-D sample (C, L) is drawn as its channels' curves on a (64, L) canvas (see :func:`signal_render`)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        return signal_render(array)
    image = np.repeat(array[:1], 3, axis=0) if array.shape[0] < 3 else array[:3]
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def signal_render(array: np.ndarray, height: int = 64) -> np.ndarray:
    """(C, L) float -> (height, L, 3) uint8: each channel's curve (min-max scaled) in white on black."""
    array = np.asarray(array, dtype=np.float32)
    image = np.zeros((height, array.shape[-1], 3), dtype=np.uint8)
    for channel in array:
        low, high = float(channel.min()), float(channel.max())
        rows = np.rint((high - channel) / (high - low or 1.0) * (height - 1)).astype(int)
        for x in range(len(rows)):  # a vertical run to the next point keeps the curve connected
            y0, y1 = sorted((rows[x], rows[min(x + 1, len(rows) - 1)]))
            image[y0:y1 + 1, x] = 255
    return image


def load_project(spec: str, models: bool = False) -> Project:
    """Import ``"package.module:attribute"`` and check it is a valid :class:`Project`.

    Args:
        spec: where the project lives, e.g. ``"camscope.demo:project"``.
        models: also build every model run (may train) and check it against the project.

    Returns:
        The checked project. Raises ProjectError (one line) on any problem.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ProjectError(f"project must be 'module:attribute', got {spec!r}")
    module_name, attr = spec.split(":")
    if not module_name or not attr or not all(part.isidentifier() for part in module_name.split(".") + attr.split(".")):
        raise ProjectError(f"project must be 'module:attribute', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProjectError(f"cannot import project module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ProjectError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Project):
        raise ProjectError(f"{spec!r} is a {type(obj).__name__}, not a camscope Project")
    return obj.check(models=models)
