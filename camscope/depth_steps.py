"""Depth steps: the positions of a viewer's depth slider for one connection.

One step per distinct depth (1 = next to the input). Layers at one depth whose maps are identical (a
container returning its last child's output) are one step named after all of them; where layers at
one depth differ (a ResNet's downsample branch beside its main convolution), the step shows the one
on the main path and lists the others. The default step is the deepest one with spatial extent
(never a 1x1 pool), as :meth:`camscope.CamEngine.last_layer` chooses.

Pure Python: the UI, the server and tests share it.

Examples:
    >>> steps = depth_steps([LayerAtDepth("layer4.1", 12, 49, "a"), LayerAtDepth("layer4", 12, 49, "a"),
    ...                      LayerAtDepth("avgpool", 13, 1, "b")])
    >>> [step.title for step in steps], default_position(steps)
    (['layer4 = layer4.1', 'avgpool'], 1)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerAtDepth:
    """A layer as the slider sees it.

    Attributes:
        name: the module's name (as in ``model.named_modules()``).
        depth: its depth from the chosen connection.
        extent: number of map positions (h * w, or L for 1-D maps); 1 means a global pool.
        fingerprint: equal for layers whose maps are identical (e.g. a hash of the maps); ``None``
            falls back to the module tree: a container and its descendant at one depth are one.
    """

    name: str
    depth: int
    extent: int
    fingerprint: Hashable | None = None


@dataclass(frozen=True)
class DepthStep:
    """One slider position.

    Attributes:
        depth: the depth of every layer in the step.
        layer: the layer shown (the outermost of the identical ones, on the main path).
        same: other layers with maps identical to ``layer`` (innermost last).
        others: layers at this depth with different maps (off the main path), listed in the info line.
        extent: map positions of ``layer``.
    """

    depth: int
    layer: str
    same: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
    extent: int = 2

    @property
    def names(self) -> tuple[str, ...]:
        """The shown layer and those with identical maps."""
        return (self.layer, *self.same)

    @property
    def title(self) -> str:
        """The step's label: every name of the shown map, e.g. ``"layer4 = layer4.1"``."""
        return " = ".join(self.names)


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _contains(outer: str, inner: str) -> bool:
    return inner.startswith(outer + ".")


def _identical(a: LayerAtDepth, b: LayerAtDepth) -> bool:
    if a.extent != b.extent:
        return False
    if a.fingerprint is not None and b.fingerprint is not None:
        return a.fingerprint == b.fingerprint
    return _contains(a.name, b.name) or _contains(b.name, a.name)


def _groups(layers: Sequence[LayerAtDepth]) -> list[list[LayerAtDepth]]:
    """Layers of one depth, split into groups of identical maps (first-seen order)."""
    groups: list[list[LayerAtDepth]] = []
    for layer in layers:
        group = next((g for g in groups if _identical(g[0], layer)), None)
        if group is None:
            groups.append([layer])
        else:
            group.append(layer)
    return groups


def _reach(layer: LayerAtDepth, everything: Sequence[LayerAtDepth]) -> int:
    """How deep the module enclosing ``layer`` goes: a side branch (downsample) ends early."""
    parent = _parent(layer.name)
    inside = [other.depth for other in everything if not parent or _contains(parent, other.name)]
    return max(inside, default=layer.depth)


def _innermost(group: Sequence[LayerAtDepth]) -> LayerAtDepth:
    return max(group, key=lambda layer: layer.name.count("."))


def depth_steps(layers: Sequence[LayerAtDepth]) -> list[DepthStep]:
    """The slider's steps, input side first: one per distinct depth.

    Args:
        layers: the layers that depend on the connection, in execution order (ties keep it).

    Returns:
        One :class:`DepthStep` per depth, sorted by depth.
    """
    steps = []
    for depth in sorted({layer.depth for layer in layers}):
        groups = _groups([layer for layer in layers if layer.depth == depth])
        # main path: the group whose enclosing module reaches deepest; then the later-finishing one
        order = {id(group): index for index, group in enumerate(groups)}
        main = max(groups, key=lambda g: (_reach(_innermost(g), layers), order[id(g)]))
        named = sorted(main, key=lambda layer: (layer.name.count("."), layer.name))  # outermost first
        others = tuple(layer.name for group in groups if group is not main for layer in group)
        steps.append(DepthStep(depth, named[0].name, tuple(layer.name for layer in named[1:]), others,
                               named[0].extent))
    return steps


def default_position(steps: Sequence[DepthStep]) -> int:
    """The 0-based index of the deepest step with spatial extent (the last step when none has)."""
    for index in range(len(steps) - 1, -1, -1):
        if steps[index].extent > 1:
            return index
    return len(steps) - 1


def step_of(steps: Sequence[DepthStep], layer: str) -> int | None:
    """The 0-based index of the step showing or listing ``layer`` (None when absent)."""
    for index, step in enumerate(steps):
        if layer in step.names or layer in step.others:
            return index
    return None
