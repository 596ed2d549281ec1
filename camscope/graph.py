"""Layer discovery and per-connection depth, read off the autograd graph of one forward pass.

A *layer* is any module (leaf or container) that runs exactly once per forward and whose output has
positions and channels: ``[B, C, H, W]``, channels-last ``[B, H, W, C]``, transformer tokens
``[B, N, C]`` or 1-D ``[B, C, L]`` (see :mod:`camscope.layouts`). Its *depth* for a connection (a model input) is the number of
computing leaf modules on the longest path from that input to the layer's output, the layer itself
included: the first layer after an input has depth 1.

The graph is traced from autograd rather than ``torch.fx`` so that any model that runs also
traces: functional ops between modules (``out += identity``, ``torch.cat``) are edges, and only
calls of computing leaf modules count as steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch
from torch import nn

from camscope.layouts import Layout, Reshape, channel_axis_hint, custom_layout, infer_layout, patch_grid

# Leaf modules that pass data through unchanged (in eval mode) or only reshape it.
NON_COMPUTING_LEAVES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.Flatten,
    nn.Unflatten,
)


@dataclass(frozen=True)
class LayerInfo:
    """A layer whose heatmaps camscope computes.

    Attributes:
        name: the module's name as in ``model.named_modules()``.
        depth: connection name -> number of layers from that input to this layer's output
            (itself included); connections the layer does not depend on have no entry.
        shape: the output's shape as explained, without the batch: ``(C, H, W)`` (token and
            channels-last layers too, ``H x W`` being their grid) or ``(C, L)`` for a 1-D layer.
        order: position in forward execution order (0 = first to finish).
        layout: how the raw output is read as ``shape`` (:class:`camscope.layouts.Layout`).
        reaches_output: whether the output's positions (not only prefix tokens) influence the logits:
            a ViT's last blocks pass only the class token on, so their maps are zero everywhere.
    """

    name: str
    depth: dict[str, int]
    shape: tuple[int, ...]
    order: int = field(default=0, compare=False)
    layout: Layout | None = field(default=None, compare=False, repr=False)
    reaches_output: bool = field(default=True, compare=False)

    @property
    def has_extent(self) -> bool:
        """More than one position, and positions that reach the output: a map that can show a location."""
        size = 1
        for extent in self.shape[1:]:
            size *= extent
        return size > 1 and self.reaches_output


@dataclass
class _Trace:
    batch: int = 1
    calls: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    finish_order: list[str] = field(default_factory=list)
    layer_nodes: dict[str, object] = field(default_factory=dict)
    counted_nodes: set = field(default_factory=set)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    hints: dict[str, str | None] = field(default_factory=dict)
    patch_grids: list[tuple[int, int]] = field(default_factory=list)
    hint: str | None = None  # channel axis revealed by the last leaf that ran


def _is_computing_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None and not isinstance(module, NON_COMPUTING_LEAVES)


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@contextlib.contextmanager
def _tracing_hooks(model: nn.Module, trace: _Trace) -> Iterator[None]:
    handles = []
    input_nodes: dict[str, object] = {}

    def make_pre_hook(name: str):
        def pre_hook(_module, args):
            inp = _first_tensor(args)
            # Read before the call: an in-place op rebinds its input's grad_fn.
            input_nodes[name] = inp.grad_fn if inp is not None else None

        return pre_hook

    def make_hook(name: str, module: nn.Module):
        counts = _is_computing_leaf(module)
        hint = channel_axis_hint(module) if next(module.children(), None) is None else None

        def hook(_module, _args, output):
            trace.calls[name] = trace.calls.get(name, 0) + 1
            out = _first_tensor(output)
            if out is None:
                return None
            trace.hint = hint or trace.hint
            grid = patch_grid(module, out)
            if grid is not None:
                trace.patch_grids.append(grid)
            node = out.grad_fn
            if counts and node is not None and input_nodes.get(name) is not node:
                trace.counted_nodes.add(node)  # (a no-op returns its input's node)
            if out.dim() in (3, 4) and out.shape[0] == trace.batch and name not in trace.shapes:
                trace.shapes[name] = tuple(out.shape[1:])
                trace.finish_order.append(name)
                trace.layer_nodes[name] = node
                trace.hints[name] = trace.hint
                trace.outputs[name] = out
                # Keep the output as produced (as the engine does): the network goes on with a clone.
                clone = out.clone()
                return clone if isinstance(output, torch.Tensor) else (clone, *output[1:])
            return None

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(make_pre_hook(name)))
                handles.append(module.register_forward_hook(make_hook(name, module)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _longest_paths(roots: dict[str, object], sources: dict[object, str], counted: set) -> dict:
    """Longest count of ``counted`` nodes from each source to each root, iteratively (no recursion)."""
    memo: dict[object, dict[str, int]] = {}
    for root in roots.values():
        if root is None or root in memo:
            continue
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            children = [child for child, _ in getattr(node, "next_functions", ()) if child is not None]
            if not expanded:
                stack.append((node, True))
                stack.extend((child, False) for child in children if child not in memo)
                continue
            best: dict[str, int] = {}
            if node in sources:
                best[sources[node]] = 0
            for child in children:
                for conn, length in memo[child].items():
                    if length > best.get(conn, -1):
                        best[conn] = length
            if node in counted:
                best = {conn: length + 1 for conn, length in best.items()}
            memo[node] = best
    return {name: dict(memo.get(node, {})) if node is not None else {} for name, node in roots.items()}


def _accumulate_nodes(output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[object, str]:
    """Map each input's AccumulateGrad node in ``output``'s graph to the connection name."""
    by_id = {id(tensor): name for name, tensor in inputs.items()}
    found: dict[object, str] = {}
    seen: set = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in by_id:
            found[node] = by_id[id(variable)]
        stack.extend(child for child, _ in node.next_functions)
    return found


def _output_tensor(output) -> torch.Tensor:
    out = _first_tensor(output)
    if out is None and isinstance(output, dict) and output:
        out = next(iter(output.values()))
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return a tensor of logits, got {type(output).__name__}")
    return out


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily stop parameters from requiring grad, so no weight gradient is ever computed."""
    previous = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in previous:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in previous:
            param.requires_grad_(flag)


class Discovery(NamedTuple):
    """What :func:`discover_layers` found."""

    layers: list[LayerInfo]
    num_classes: int
    rejected: dict[str, str]  # module name -> why its output has no layout (one line)


def discover_layers(
    model: nn.Module, inputs: dict[str, torch.Tensor], reshape: Reshape | None = None
) -> Discovery:
    """Run one forward pass and return every candidate layer (in execution order) and the class count.

    Args:
        model: the eval-mode model.
        inputs: connection name -> input tensor (a small batch is enough).
        reshape: optional ``reshape(name, output)`` giving a layer's output as ``[B, C, h, w]`` or
            ``[B, C, L]`` (None: infer the layout; see :mod:`camscope.layouts`).

    Returns:
        :class:`Discovery`: the layers that ran exactly once, depend on an input and have a layout,
        with their depth per connection; the size of the model output's last dimension; and the
        3-D/4-D outputs left out for having no layout, with the reason.

    Raises:
        ValueError: the model fails on ``inputs`` or does not return logits ``[B, classes]``, or
            ``reshape`` returns something that is not a batch of maps.
    """
    trace = _Trace(batch=next(iter(inputs.values())).shape[0])
    leaves = {name: tensor.detach().clone().requires_grad_(True) for name, tensor in inputs.items()}
    with frozen_parameters(model), torch.enable_grad(), _tracing_hooks(model, trace):
        try:
            output = _output_tensor(model(**leaves))
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - a bad input surfaces as ValueError with its shapes
            shapes = {name: tuple(t.shape) for name, t in inputs.items()}
            raise ValueError(f"the model failed on inputs of shape {shapes}: {error}") from error
    if output.dim() != 2:
        raise ValueError(f"the model must return logits of shape [B, classes], got {tuple(output.shape)}")
    if output.grad_fn is None:
        raise ValueError("the model output does not depend on its inputs")
    names = [name for name in trace.finish_order if trace.calls.get(name) == 1]
    sources = _accumulate_nodes(output, leaves)
    depths = _longest_paths({n: trace.layer_nodes[n] for n in names}, sources, trace.counted_nodes)
    image_sizes = sorted({tuple(t.shape[-2:]) for t in inputs.values() if t.dim() == 4})
    layouts: dict[str, Layout] = {}
    rejected: dict[str, str] = {}
    for name in (n for n in names if depths[n]):
        layout = custom_layout(name, reshape, trace.outputs[name]) if reshape is not None else None
        if layout is None:
            layout = infer_layout(name, trace.shapes[name], trace.hints[name], image_sizes, trace.patch_grids)
        if isinstance(layout, Layout):
            layouts[name] = layout
        else:
            rejected[name] = layout
    reaches = _positions_reaching(output, {name: trace.outputs[name] for name in layouts}, layouts)
    layers = [
        LayerInfo(name=name, depth=depths[name], shape=layouts[name].shape, order=order, layout=layouts[name],
                  reaches_output=reaches[name])
        for order, name in enumerate(names)
        if name in layouts
    ]
    return Discovery(layers, int(output.shape[-1]), rejected)


def _positions_reaching(output: torch.Tensor, outputs: dict[str, torch.Tensor], layouts: dict[str, Layout]) -> dict:
    """Per layer: whether any of its positions has a nonzero gradient for a random mix of the logits."""
    if not outputs:
        return {}
    seeds = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(output)
    grads = torch.autograd.grad(output, list(outputs.values()), grad_outputs=seeds, allow_unused=True)
    return {
        name: grad is not None and bool(layouts[name].spatial(grad).ne(0).any())
        for name, grad in zip(outputs, grads)
    }
