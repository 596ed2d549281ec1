"""CamEngine: every CAM map of a batch, at every layer, for every label, from one forward pass and
one vector-Jacobian product per label (scheduled by :mod:`camscope.gradients`: one backward per
label, or labels folded into the batch, whichever is faster on the device) that differentiates only
activations, never weights."""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from camscope import gradients
from camscope.algorithms import ALGORITHMS, CamAlgorithm
from camscope.graph import LayerInfo, _first_tensor, _output_tensor, discover_layers, frozen_parameters
from camscope.layouts import Layout, Reshape
from camscope.strategy_cache import cached_strategy, save_strategy, strategy_key

Inputs = torch.Tensor | Mapping[str, torch.Tensor]

#: Upper bound on gradient elements held at once (labels x batch x activations) on CPU; labels are
#: chunked to fit.
DEFAULT_GRADIENT_BUDGET = 2**27
#: On a GPU the default budget is this share of the device's free memory, in gradient elements: one
#: label of ViT-B/16's 137 layers at 8x112x112 is 75M elements, and 2**27 forced one label per
#: backward, 4.3x slower than folding all 10 on an H100 (``benchmarks/results/engine-gpu.md``).
GPU_BUDGET_SHARE = 0.25
#: Reduced-precision dtypes ``CamEngine(dtype=...)`` runs the model in under autocast.
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
#: Documented accuracy of ``dtype=torch.bfloat16``, as the relative L2 error ``||m - m_fp32|| / ||m_fp32||``
#: of a layer's GradCAM / LayerCAM maps: at block outputs (post-activation layers; measured 0.01-0.10 on
#: ResNet-18) and at any layer (pre-activation convolutions and batch norms, where GradCAM's channel sum
#: cancels, measured up to 0.29).
BF16_TOLERANCE = 0.15
BF16_TOLERANCE_ANY_LAYER = 0.4


@dataclass
class Explanation:
    """What :meth:`CamEngine.explain` returns.

    Attributes:
        logits: ``[B, classes]``, detached.
        probabilities: softmax of the logits, ``[B, classes]``.
        labels: the K explained class indices, in the order of the maps' K axis.
        maps: ``maps[algorithm][layer]`` = float32 ``[B, K, h, w]`` (``[B, K, L]`` for a 1-D layer),
            raw (>= 0, not normalised, at the layer's own resolution).
        embedding: ``[B, C]`` global-average-pooled activation of the deepest explained layer.
    """

    logits: torch.Tensor
    probabilities: torch.Tensor
    labels: list[int]
    maps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    embedding: torch.Tensor | None = None


class _Captured(dict):
    """Layer name -> output as produced, with each output's version counter at capture time."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[str, int] = {}

    def overwritten(self) -> set[str]:
        """Layers whose captured output a later in-place op changed (its version counter moved)."""
        return {name for name, tensor in self.items() if tensor._version != self.versions[name]}


@contextlib.contextmanager
def _capture(model: nn.Module, names: Sequence[str], clone: frozenset[str] | set[str] = frozenset()
             ) -> Iterator[_Captured]:
    """Hold each named layer's output as produced. Only the layers in ``clone`` pay a copy: the
    network continues on a clone there, so that a later in-place op (``ReLU(inplace=True)``) cannot
    overwrite the captured activation; :meth:`_Captured.overwritten` tells which layers need it."""
    captured = _Captured()
    modules = dict(model.named_modules())
    handles = []

    def make_hook(name: str):
        def hook(_module, _args, output):
            out = _first_tensor(output)
            captured[name] = out
            captured.versions[name] = out._version
            if name not in clone:
                return None
            copy = out.clone()
            return copy if isinstance(output, torch.Tensor) else (copy, *output[1:])

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _as_affine(module: nn.modules.batchnorm._BatchNorm, args: tuple, _output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    scale = module.running_var.add(module.eps).rsqrt_()
    if module.weight is not None:
        scale.mul_(module.weight)
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift.add_(module.bias)
    view = (1, -1, *([1] * (x.dim() - 2)))
    return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))


@contextlib.contextmanager
def _affine_batch_norms(model: nn.Module) -> Iterator[None]:
    """Eval-mode batch norms computed as their per-channel affine map ``x * scale + shift``.

    The same function to float rounding, but its backward is one multiply, where
    ``native_batch_norm_backward`` costs several passes: about 15% of a ResNet's backward on CPU,
    paid once per label. The hook runs first (``prepend``), so capture hooks see the affine output.
    """
    handles = [
        module.register_forward_hook(_as_affine, prepend=True)
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training
        and module.running_mean is not None and module.running_var is not None
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class CamEngine:
    """GradCAM, LayerCAM and Focus LayerCAM at every layer of a model, for every label and input.

    Args:
        model: a ``torch.nn.Module`` in eval mode returning logits ``[B, classes]``.
        example: optional input like :meth:`explain`'s; when given, layers and depths are
            discovered at construction, otherwise on the first ``explain``.
        layers: optional module names (as in ``model.named_modules()``) to restrict to; default:
            every module that runs once per forward and whose output has positions: ``[B, C, H, W]``,
            channels-last ``[B, H, W, C]``, transformer tokens ``[B, N, C]`` (prefix tokens dropped,
            grid inferred) or 1-D ``[B, C, L]``. Such an output with no layout (a token count that fits
            no grid) is left out with a warning and listed in ``skipped_layers`` (layer -> why); named
            in ``layers``, it is a ``ValueError``.
        gradient_budget: most gradient elements held at once; labels are processed in chunks to fit.
            Default: ``DEFAULT_GRADIENT_BUDGET`` (2**27) on CPU, on a GPU ``GPU_BUDGET_SHARE`` of its
            free memory when the first batch arrives (and never less than the CPU default).
        reshape: escape hatch for unusual layouts: ``reshape(layer_name, output)`` returns the
            output as ``[B, C, h, w]`` or ``[B, C, L]`` (a selection/permutation of it: it is applied
            to the gradients too), or None to let camscope infer that layer's layout.
        strategy: how the K labels' gradients are taken (:mod:`camscope.gradients`): ``"auto"``
            (default: a one-time probe per device picks the faster of ``"sequential"``, one backward
            per label, and ``"folded"``, labels folded into the batch of every backward op), or one
            of ``"sequential"``, ``"folded"``, ``"batched"`` (``is_grads_batched``). All give the
            same maps to float rounding.
        strategy_cache: a directory where ``"auto"`` keeps the probe's choice for this machine, model
            and batch shape (:mod:`camscope.strategy_cache`), so that later engines skip the probe
            (0.7 s per engine for the demo CNN on one CPU thread); default: probe in every engine.
        dtype: opt-in mixed precision: ``torch.bfloat16`` or ``torch.float16`` runs the forward (and
            so the backward) under ``torch.autocast``; maps are computed in the activations' dtype and
            returned as float32. Off by default: maps then differ from the float32 maps (relative L2
            error within ``BF16_TOLERANCE`` at block outputs, ``BF16_TOLERANCE_ANY_LAYER`` anywhere;
            speed and error measured in ``benchmarks/results/engine.md``).
        compile: opt-in ``torch.compile`` of the model for long jobs: the explained layers add a
            zero probe to their output inside the compiled graph, and gradients are taken at the
            probes. The first ``explain`` compiles (31 s for ResNet-18 on 2 CPU cores); a new input
            size recompiles. Measured it does not pay: 1.07x the default on ResNet-18 on CPU, 1.3-5.3x
            on an H100, where vmap cannot enter the compiled backward and the labels go one at a time
            (``benchmarks/results/engine-gpu.md``); its
            maps match the float32 maps to 1e-3 of each map's maximum on a small CNN and to a relative
            L2 error of 1.2e-3 on ResNet-18 (``benchmarks/results/engine.md``).

    Examples:
        >>> engine = CamEngine(torchvision.models.resnet18().eval())
        >>> ex = engine.explain(torch.rand(8, 3, 224, 224), labels=[3, 7])
        >>> ex.maps["gradcam"]["layer4"].shape   # [B, K, h, w]
        torch.Size([8, 2, 7, 7])
        >>> engine.last_layer("x").name
        'layer4'
        >>> vit = CamEngine(torchvision.models.vit_b_16(image_size=64).eval())   # tokens: no reshape code
        >>> vit.explain(torch.rand(2, 3, 64, 64), labels=[1]).maps["gradcam"]["encoder.layers.encoder_layer_3"].shape
        torch.Size([2, 1, 4, 4])
        >>> def tokens_to_map(name, out):   # a layout camscope cannot infer: [B, C, h*w] -> [B, C, h, w]
        ...     return out.unflatten(-1, (7, 7)) if name == "odd_block" else None
        >>> CamEngine(model, reshape=tokens_to_map)
    """

    def __init__(
        self,
        model: nn.Module,
        example: Inputs | None = None,
        layers: Sequence[str] | None = None,
        gradient_budget: int | None = None,
        reshape: Reshape | None = None,
        strategy: str = "auto",
        dtype: torch.dtype | None = None,
        compile: bool = False,
        strategy_cache: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if strategy not in gradients.STRATEGIES:
            raise ValueError(f"strategy must be one of {list(gradients.STRATEGIES)}, got {strategy!r}")
        if dtype not in (None, torch.float32, *AUTOCAST_DTYPES):
            raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
        self.model = model
        self.gradient_budget = gradient_budget
        self._gpu_budget: int | None = None  # the GPU default, read once from the device's free memory
        self.strategy = strategy
        self.dtype = dtype if dtype in AUTOCAST_DTYPES else None
        self.compile = bool(compile)
        self._strategies: dict[tuple, str] = {}  # (device type, dtype, compiled) -> probed strategy
        self.strategy_cache = strategy_cache
        self._clone_layers: set[str] = set()  # layers whose output a later in-place op overwrites
        self._probed_model: _ProbedModel | None = None
        if reshape is not None and not callable(reshape):
            raise ValueError(f"reshape must be a function (layer name, output) -> tensor, got {type(reshape).__name__}")
        self.reshape = reshape
        self._layouts: dict[tuple, dict[str, Layout]] = {}
        self._requested_layers = list(layers) if layers is not None else None
        self._parameters = list(inspect.signature(model.forward).parameters.values())
        self._layers: list[LayerInfo] | None = None
        self.skipped_layers: dict[str, str] = {}  # default discovery: layer -> why it has no layout
        self._input_shapes: dict[str, tuple[int, ...]] = {}
        self.num_classes: int | None = None
        if self._requested_layers is not None:
            known = {name for name, _ in model.named_modules() if name}
            unknown = [name for name in self._requested_layers if name not in known]
            if unknown:
                raise ValueError(f"unknown layer(s) {unknown}: not in model.named_modules()")
        if example is not None:
            self._discover(self._inputs(example))

    # ----------------------------------------------------------------------------- public API
    @property
    def connections(self) -> list[str]:
        """Names of the model's inputs (its forward parameters that take tensors)."""
        if self._input_shapes:
            return list(self._input_shapes)
        return [p.name for p in self._parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @property
    def layers(self) -> list[LayerInfo]:
        """Explained layers in execution order (input to output); known after discovery."""
        if self._layers is None:
            raise RuntimeError("layers are known after the first explain() or when an example is given")
        return self._layers

    def layer(self, name: str) -> LayerInfo:
        """The :class:`LayerInfo` named ``name``."""
        for info in self.layers:
            if info.name == name:
                return info
        raise ValueError(f"unknown layer {name!r}; known: {[info.name for info in self.layers]}")

    def last_layer(self, connection: str | None = None) -> LayerInfo:
        """The deepest layer (for ``connection``, default the first): the viewer's default layer."""
        connection = connection or self.connections[0]
        candidates = [info for info in self.layers if connection in info.depth]
        if not candidates:
            raise ValueError(f"no layer depends on connection {connection!r}")
        return max(candidates, key=lambda info: (info.has_extent, info.depth[connection], info.order))

    def explain(
        self,
        x: Inputs,
        labels: Sequence[int] | None = None,
        algorithms: Sequence[str] = tuple(ALGORITHMS),
    ) -> Explanation:
        """Compute every requested CAM map of a batch at every layer.

        Args:
            x: a tensor ``[B, C, H, W]`` (the model's first forward parameter) or a dict
                connection name -> tensor, passed to the model as keywords.
            labels: class indices to explain; ``None`` = every class.
            algorithms: any of ``"gradcam"``, ``"layercam"``, ``"focus_layercam"``.

        Returns:
            :class:`Explanation` with ``maps[algorithm][layer]`` of shape ``[B, K, h, w]`` (``[B, K, L]``
            for a 1-D layer).

        Raises:
            ValueError: wrong input shape/dtype, unknown connection, label out of range, unknown
                algorithm, or a model without spatial layers.
        """
        inputs = self._inputs(x)
        if self._layers is None:
            self._discover(inputs)
        self._check_shapes(inputs)
        layouts = self._layouts_for(inputs)
        chosen = self._algorithms(algorithms)
        label_list = self._labels(labels)
        names = [info.name for info in self.layers]

        with frozen_parameters(self.model), torch.enable_grad(), _buffers_kept(self.compile):
            with self._autocast(inputs):
                logits, activations, wrt = self._forward(inputs, names)
            probabilities = logits.detach().float().softmax(dim=-1)
            maps = self._maps(logits, probabilities, activations, wrt, names, label_list, chosen, layouts)
        embedding = layouts[-1].spatial(activations[-1].detach()).float().mean(dim=(-2, -1)) if activations else None
        return Explanation(
            logits=logits.detach().float(),
            probabilities=probabilities,
            labels=label_list,
            maps=maps,
            embedding=embedding,
        )

    # ----------------------------------------------------------------------------- internals
    @property
    def chosen_strategies(self) -> dict[tuple, str]:
        """What the ``"auto"`` probe chose: (device type, dtype, compiled, labels per chunk) -> gradient strategy."""
        return dict(self._strategies)

    def _forward(self, inputs: dict[str, torch.Tensor], names: list[str]) -> tuple:
        """One forward capturing every explained layer: (logits, activations, tensors to differentiate)."""
        try:
            if self.compile:
                if self._probed_model is None:
                    self._probed_model = _ProbedModel(self.model, names)
                return self._probed_model(inputs)
            for _attempt in range(2):
                with _affine_batch_norms(self.model), _capture(self.model, names, self._clone_layers) as acts:
                    leaves = {name: t.detach().requires_grad_(True) for name, t in inputs.items()}
                    logits = _output_tensor(self.model(**leaves))
                overwritten = acts.overwritten() - self._clone_layers
                if not overwritten:
                    break
                # found once per engine: copy these layers' outputs from now on, and run again
                self._clone_layers |= overwritten
        except Exception as error:  # noqa: BLE001 - surfaced with the shapes that caused it
            shapes = {name: tuple(t.shape) for name, t in inputs.items()}
            raise ValueError(f"the model failed on inputs of shape {shapes}: {error}") from error
        activations = [acts[name] for name in names]
        return logits, activations, activations

    def _autocast(self, inputs: dict[str, torch.Tensor]):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=next(iter(inputs.values())).device.type, dtype=self.dtype)

    def _strategy_for(self, logits: torch.Tensor, wrt: list[torch.Tensor], labels: list[int]) -> str:
        """The gradient strategy: the user's, or the one probed on this device for chunks of
        ``len(labels)`` labels (probed once per device, dtype and chunk size)."""
        if self.strategy != "auto":
            return self.strategy
        if len(labels) < 2:
            return "sequential"  # one label is one backward whichever way
        key = (logits.device.type, str(logits.dtype).removeprefix("torch."), self.compile, len(labels))
        if key not in self._strategies:
            self._strategies[key] = self._probed(logits, wrt, labels)
        return self._strategies[key]

    def _probed(self, logits: torch.Tensor, wrt: list[torch.Tensor], labels: list[int]) -> str:
        """The probe's choice, read from ``strategy_cache`` when an engine of this machine made it before."""
        if self.strategy_cache is None:
            return gradients.fastest(logits, wrt, labels)
        key = strategy_key(self.model, logits, wrt, len(labels), self.compile)
        chosen = cached_strategy(self.strategy_cache, key)
        if chosen is None:
            chosen = gradients.fastest(logits, wrt, labels)
            save_strategy(self.strategy_cache, key, chosen)
        return chosen

    def _maps(self, logits, probabilities, activations, wrt, names, labels, chosen, layouts) -> dict:
        contrast = any(algorithm.target == "log_softmax" for algorithm in chosen.values())
        per_label = logits.shape[0] * sum(t[0].numel() for t in wrt)
        budget = self._budget(logits) - per_label * int(contrast)
        # probe with one chunk of labels as the folded strategy would take them
        strategy = self._strategy_for(logits, wrt, labels[: gradients.labels_per_pass("folded", len(labels),
                                                                                      per_label, budget)])
        chunk = gradients.labels_per_pass(strategy, len(labels), per_label, budget)
        # d log p_c / dA = d y_c / dA - d(sum_j p_j y_j) / dA: the second term is one backward for all labels
        mean_grads = None
        if contrast:
            seed = probabilities.to(logits.dtype).unsqueeze(0)
            mean_grads = [layout.spatial_batched(g) for layout, g in
                          zip(layouts, gradients.backward(strategy, logits, wrt, seed))]
        pieces: dict[str, dict[str, list[torch.Tensor]]] = {key: {n: [] for n in names} for key in chosen}
        # Every layout is read as [B, C, h, w] (1-D as [B, C, 1, L]); gradients follow the same layout.
        activations_detached = [layout.spatial(a.detach()) for layout, a in zip(layouts, activations)]
        same = _aliases(wrt, layouts)
        for start in range(0, len(labels), chunk):
            seeds = gradients.one_hot_seeds(logits, labels[start : start + chunk])
            grads = gradients.backward(strategy, logits, wrt, seeds)
            for index, (name, layout, activation) in enumerate(zip(names, layouts, activations_detached)):
                if same[index] != index:  # the very tensor of an earlier layer: its maps, copied
                    for key in chosen:
                        pieces[key][name].append(pieces[key][names[same[index]]][-1].clone())
                    continue
                grad = layout.spatial_batched(grads[index])
                by_target = {"logit": grad}
                if contrast:
                    by_target["log_softmax"] = grad - mean_grads[index]
                # Focus LayerCAM shares LayerCAM's rule: compute each (rule, target) once per layer.
                shared: dict[tuple, torch.Tensor] = {}
                for key, algorithm in chosen.items():
                    rule = (type(algorithm).layer_map, algorithm.target)
                    if rule not in shared:
                        shared[rule] = algorithm.layer_map(activation, by_target[algorithm.target])
                    pieces[key][name].append(shared[rule])
            del grads
        reference = self._reference_layer()
        result = {}
        for key, algorithm in chosen.items():
            # maps are computed in the activations' dtype; only the small [B, K, h, w] result is cast
            maps = {name: _joined(parts).float() for name, parts in pieces[key].items()}
            refined = algorithm.refine(maps, reference, self.layers)
            one_d = {name for name, layout in zip(names, layouts) if layout.one_d}
            result[key] = {name: m.squeeze(-2) if name in one_d else m for name, m in refined.items()}
        return result

    def _budget(self, logits: torch.Tensor) -> int:
        """Gradient elements one backward may hold: the user's, or the default of this device."""
        if self.gradient_budget is not None:
            return self.gradient_budget
        if logits.device.type != "cuda":
            return DEFAULT_GRADIENT_BUDGET
        if self._gpu_budget is None:
            free_bytes, _total = torch.cuda.mem_get_info(logits.device)
            share = int(free_bytes * GPU_BUDGET_SHARE) // logits.element_size()
            self._gpu_budget = max(DEFAULT_GRADIENT_BUDGET, share)
        return self._gpu_budget

    def _reference_layer(self) -> str:
        """The deepest layer with spatial extent: what Focus LayerCAM gates the other layers by."""
        return max(self.layers, key=lambda info: (info.has_extent, max(info.depth.values()), info.order)).name

    def _discover(self, inputs: dict[str, torch.Tensor]) -> None:
        probe = {name: tensor[:1] for name, tensor in inputs.items()}
        _warn_if_training(self.model)
        found, self.num_classes, rejected = discover_layers(self.model, probe, self.reshape)
        if self._requested_layers is not None:
            by_name = {info.name: info for info in found}
            for name in self._requested_layers:
                if name in rejected:
                    raise ValueError(rejected[name])
            bad = [name for name in self._requested_layers if name not in by_name]
            if bad:
                raise ValueError(
                    f"layer(s) {bad} have no 4-D output ([B, C, H, W] or [B, H, W, C]), token [B, N, C] or 1-D "
                    f"[B, C, L] output that runs once per forward and depends on an input"
                )
            found = [info for info in found if info.name in set(self._requested_layers)]
        if not found:
            why = f" ({'; '.join(rejected.values())})" if rejected else ""
            raise ValueError(f"the model has no layer with a spatial output ([B, C, H, W], [B, H, W, C], tokens "
                             f"[B, N, C] or 1-D [B, C, L]) to explain{why}")
        if self._requested_layers is None and rejected:
            # Left out, not refused: a model may hold [B, N, C] outputs that are no grid (a text branch).
            self.skipped_layers = dict(rejected)
            warnings.warn(f"camscope leaves out {len(rejected)} layer(s) with no layout (name them in layers= to "
                          f"make this an error, or pass reshape=): {'; '.join(rejected.values())}", stacklevel=3)
        self._layers = found
        self._input_shapes = {name: tuple(t.shape[1:]) for name, t in inputs.items()}
        self._layouts = {self._shape_key(inputs): {info.name: info.layout for info in found}}

    @staticmethod
    def _shape_key(inputs: dict[str, torch.Tensor]) -> tuple:
        return tuple((name, tuple(t.shape[1:])) for name, t in inputs.items())

    def _layouts_for(self, inputs: dict[str, torch.Tensor]) -> list[Layout]:
        """Each layer's layout for inputs of this size: a token grid changes with the input's size."""
        key = self._shape_key(inputs)
        if key not in self._layouts:
            probe = {name: tensor[:1] for name, tensor in inputs.items()}
            found = {info.name: info.layout for info in discover_layers(self.model, probe, self.reshape).layers}
            missing = [info.name for info in self.layers if info.name not in found]
            if missing:
                shapes = {name: tuple(t.shape) for name, t in inputs.items()}
                raise ValueError(f"layer(s) {missing} have no layout for inputs of shape {shapes}")
            self._layouts[key] = found
        return [self._layouts[key][info.name] for info in self.layers]

    def _inputs(self, x: Inputs) -> dict[str, torch.Tensor]:
        positional = [p for p in self._parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if isinstance(x, torch.Tensor):
            if not positional:
                raise ValueError("the model's forward takes no positional input for a plain tensor")
            x = {positional[0].name: x}
        if not isinstance(x, Mapping) or not x:
            raise ValueError(f"x must be a tensor or a non-empty dict of tensors, got {type(x).__name__}")
        known = {p.name for p in self._parameters}
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in self._parameters)
        unknown = [name for name in x if name not in known]
        if unknown and not accepts_any:
            raise ValueError(f"unknown connection(s) {unknown}; the model's inputs are {sorted(known)}")
        device = _device_of(self.model)
        dtype = _dtype_of(self.model)
        batch = None
        inputs = {}
        for name, tensor in x.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"connection {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise ValueError(f"connection {name!r} must be a floating-point tensor, got {tensor.dtype}")
            if tensor.dim() < 2 or tensor.shape[0] == 0:
                raise ValueError(f"connection {name!r} must be a non-empty batch [B, ...], got {tuple(tensor.shape)}")
            if batch is not None and tensor.shape[0] != batch:
                raise ValueError(f"connections disagree on the batch size: {batch} vs {tensor.shape[0]} ({name!r})")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"connection {name!r} contains NaN or infinite values")
            batch = tensor.shape[0]
            inputs[name] = tensor.to(device=device, dtype=dtype)
        missing = [
            p.name for p in positional if p.default is p.empty and p.name not in inputs
        ]
        if missing:
            raise ValueError(f"missing connection(s) {missing}")
        return inputs

    def _check_shapes(self, inputs: dict[str, torch.Tensor]) -> None:
        for name, tensor in inputs.items():
            expected = self._input_shapes.get(name)
            if expected is None:
                raise ValueError(f"unknown connection {name!r}; known: {list(self._input_shapes)}")
            if tensor.dim() != len(expected) + 1 or tensor.shape[1] != expected[0]:
                raise ValueError(
                    f"connection {name!r} expects [B, {', '.join(map(str, expected))}], got {tuple(tensor.shape)}"
                )

    def _labels(self, labels: Sequence[int] | None) -> list[int]:
        if labels is None:
            return list(range(self.num_classes))
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) and not torch.is_tensor(labels):
            raise ValueError(f"labels must be a list of class indices or None, got {labels!r}")
        result = []
        for label in list(labels):
            value = int(label)
            if value != label or not 0 <= value < self.num_classes:
                raise ValueError(f"label {label!r} is out of range: the model has {self.num_classes} classes")
            result.append(value)
        if not result:
            raise ValueError("labels is empty: pass None for every class")
        return result

    @staticmethod
    def _algorithms(algorithms: Sequence[str]) -> dict[str, CamAlgorithm]:
        if isinstance(algorithms, str):
            algorithms = [algorithms]
        unknown = [key for key in algorithms if key not in ALGORITHMS]
        if unknown or not algorithms:
            raise ValueError(f"unknown algorithm(s) {list(unknown)}; choose from {list(ALGORITHMS)}")
        return {key: ALGORITHMS[key] for key in dict.fromkeys(algorithms)}


def _aliases(wrt: Sequence[torch.Tensor], layouts: Sequence[Layout]) -> list[int]:
    """Per layer, the first layer differentiated at the very same tensor read the same way (itself if
    none): an eval-mode dropout, or a container, returns its input or last child's output as is (a
    ViT block: 4 of its 11 layers), and their maps need computing once."""
    first: dict[tuple, int] = {}
    same = []
    for index, (tensor, layout) in enumerate(zip(wrt, layouts)):
        key = (id(tensor), layout.kind, layout.shape, layout.prefix)
        same.append(index if layout.kind == "custom" else first.setdefault(key, index))
    return same


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _ProbedModel:
    """``torch.compile`` of a model whose explained layers add a zero *probe* to their output.

    A compiled graph returns the captured activations as outputs of one autograd node, so no
    gradient can be taken at them; a probe is an input of the graph, and the gradient at
    ``output + probe`` is the gradient at the output. The hooks stay registered for the engine's
    life (registering them anew would recompile) and act only while a probed forward runs.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.mode: str | None = None  # None (inactive), "record" (eager, shapes) or "probe"
        self.outputs: dict[str, torch.Tensor] = {}
        self.probes: dict[str, torch.Tensor] = {}
        self.shapes: dict[tuple, dict[str, tuple[torch.Size, torch.dtype]]] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.names]
        self.compiled = torch.compile(model)

    def _hook(self, name: str):
        def hook(_module, _args, output):
            if self.mode is None:
                return None
            out = _first_tensor(output)
            self.outputs[name] = out
            if self.mode == "record":
                return None
            probed = out + self.probes[name]
            return probed if isinstance(output, torch.Tensor) else (probed, *output[1:])

        return hook

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple:
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        try:
            if key not in self.shapes:
                self.mode, self.outputs = "record", {}
                with torch.no_grad():
                    self.model(**inputs)
                self.shapes[key] = {name: (t.shape, t.dtype) for name, t in self.outputs.items()}
            device = next(iter(inputs.values())).device
            self.probes = {name: torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
                           for name, (shape, dtype) in self.shapes[key].items()}
            self.mode, self.outputs = "probe", {}
            logits = _output_tensor(self.compiled(**inputs))
        finally:
            self.mode = None
        activations = [self.outputs.pop(name) for name in self.names]
        return logits, activations, [self.probes.pop(name) for name in self.names]


def _buffers_kept(compiled: bool) -> contextlib.AbstractContextManager:
    """For a compiled model: compile and run backward with no donated buffers. The engine takes
    several backward passes with ``retain_graph=True``, which a backward compiled with donated
    buffers refuses (seen on CUDA, torch 2.11)."""
    if not compiled:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config  # not an attribute of torch until imported

    if not hasattr(functorch_config, "donated_buffer"):
        return contextlib.nullcontext()
    return functorch_config.patch(donated_buffer=False)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _dtype_of(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


def _warn_if_training(model: nn.Module) -> None:
    # Dropout and batch-norm statistics in training mode make maps random and shift the model.
    if model.training:
        warnings.warn("CamEngine expects a model in eval mode; call model.eval()", stacklevel=4)
