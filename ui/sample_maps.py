"""Every heatmap of one analyzed sample, decoded once and indexed for instant label/depth switches.

Rows come from the store (``Store.sample_maps``) or from the API's ``POST /v1/analyze`` answer; both
carry ``connection, algorithm, layer, depth, label, height, width, heatmap, scale``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from camscope.heatmap import dequantize

MapKey = tuple[str, str, str, int]  # (connection, algorithm, layer, label)


@dataclass(frozen=True)
class LayerStep:
    """One position of the depth slider: a layer and its depth from a connection."""

    layer: str
    depth: int


@dataclass
class SampleMaps:
    """Decoded heatmaps of one sample, keyed by (connection, algorithm, layer, label)."""

    maps: dict[MapKey, np.ndarray]
    depths: dict[tuple[str, str], int]  # (connection, layer) -> depth
    _steps: dict[str, list[LayerStep]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping]) -> SampleMaps:
        """Build from row dicts (store rows, or API maps with base64 ``heatmap``)."""
        maps: dict[MapKey, np.ndarray] = {}
        depths: dict[tuple[str, str], int] = {}
        for row in rows:
            data = row["heatmap"]
            if isinstance(data, str):
                data = base64.b64decode(data)
            shape = (int(row["height"]), int(row["width"]))
            key = (str(row["connection"]), str(row["algorithm"]), str(row["layer"]), int(row["label"]))
            maps[key] = dequantize(bytes(data), float(row["scale"]), shape)
            depths[(key[0], key[2])] = int(row["depth"])
        return cls(maps, depths)

    def __bool__(self) -> bool:
        return bool(self.maps)

    @property
    def connections(self) -> list[str]:
        """Connections with maps, in first-seen order."""
        return list(dict.fromkeys(conn for conn, _ in self.depths))

    @property
    def algorithms(self) -> list[str]:
        """Algorithm keys with maps."""
        return list(dict.fromkeys(key[1] for key in self.maps))

    @property
    def labels(self) -> list[int]:
        """Explained label indices, sorted."""
        return sorted({key[3] for key in self.maps})

    def steps(self, connection: str) -> list[LayerStep]:
        """The layers that depend on ``connection``, from the input (shallow) to the output (deep)."""
        if connection not in self._steps:
            found = [LayerStep(layer, depth) for (conn, layer), depth in self.depths.items() if conn == connection]
            self._steps[connection] = sorted(found, key=lambda step: (step.depth, step.layer))
        return self._steps[connection]

    def heat(self, connection: str, algorithm: str, layer: str, label: int) -> np.ndarray | None:
        """The raw map, or None when that combination was not computed (e.g. a label outside top-k)."""
        return self.maps.get((connection, algorithm, layer, int(label)))
