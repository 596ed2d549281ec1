"""Layer discovery and per-connection depth, read off the autograd graph of one forward pass.

A *layer* is any module (leaf or container) whose output is a 4-D tensor ``[B, C, H, W]`` and that
runs exactly once per forward. Its *depth* for a connection (a model input) is the number of
computing leaf modules on the longest path from that input to the layer's output, the layer itself
included: the first layer after an input has depth 1.

The graph is traced from autograd rather than ``torch.fx`` so that any model that runs also
traces: functional ops between modules (``out += identity``, ``torch.cat``) are edges, and only
calls of computing leaf modules count as steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

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
        shape: output shape ``(C, H, W)`` without the batch dimension.
        order: position in forward execution order (0 = first to finish).
    """

    name: str
    depth: dict[str, int]
    shape: tuple[int, int, int]
    order: int = field(default=0, compare=False)


@dataclass
class _Trace:
    calls: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    finish_order: list[str] = field(default_factory=list)
    layer_nodes: dict[str, object] = field(default_factory=dict)
    counted_nodes: set = field(default_factory=set)


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

        def hook(_module, _args, output):
            trace.calls[name] = trace.calls.get(name, 0) + 1
            out = _first_tensor(output)
            if out is None:
                return
            node = out.grad_fn
            if counts and node is not None and input_nodes.get(name) is not node:
                trace.counted_nodes.add(node)  # (a no-op returns its input's node)
            if out.dim() == 4 and name not in trace.shapes:
                trace.shapes[name] = tuple(out.shape[1:])
                trace.finish_order.append(name)
                trace.layer_nodes[name] = node

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


def discover_layers(
    model: nn.Module, inputs: dict[str, torch.Tensor]
) -> tuple[list[LayerInfo], int]:
    """Run one forward pass and return every candidate layer (in execution order) and the class count.

    Args:
        model: the eval-mode model.
        inputs: connection name -> input tensor (a small batch is enough).

    Returns:
        (layers, num_classes): layers whose output is 4-D and that ran exactly once, with their
        depth per connection; num_classes is the size of the model output's last dimension.
    """
    trace = _Trace()
    leaves = {name: tensor.detach().clone().requires_grad_(True) for name, tensor in inputs.items()}
    with frozen_parameters(model), torch.enable_grad(), _tracing_hooks(model, trace):
        output = _output_tensor(model(**leaves))
    if output.dim() != 2:
        raise ValueError(f"the model must return logits of shape [B, classes], got {tuple(output.shape)}")
    if output.grad_fn is None:
        raise ValueError("the model output does not depend on its inputs")
    names = [name for name in trace.finish_order if trace.calls.get(name) == 1]
    sources = _accumulate_nodes(output, leaves)
    depths = _longest_paths({n: trace.layer_nodes[n] for n in names}, sources, trace.counted_nodes)
    layers = [
        LayerInfo(name=name, depth=depths[name], shape=trace.shapes[name], order=order)
        for order, name in enumerate(names)
        if depths[name]
    ]
    return layers, int(output.shape[-1])
