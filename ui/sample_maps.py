"""Every heatmap of one analyzed sample, decoded once and indexed for instant label/depth switches.

Rows come from the store (``Store.sample_maps``) or from the API's ``POST /v1/analyze`` answer; both
carry ``connection, algorithm, layer, depth, label, height, width, heatmap, scale``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from camscope.depth_steps import DepthStep, LayerAtDepth, default_position, depth_steps
from camscope.heatmap import dequantize

MapKey = tuple[str, str, str, int]  # (connection, algorithm, layer, label)


@dataclass
class SampleMaps:
    """Decoded heatmaps of one sample, keyed by (connection, algorithm, layer, label)."""

    maps: dict[MapKey, np.ndarray]
    depths: dict[tuple[str, str], int]  # (connection, layer) -> depth
    _steps: dict[str, list[DepthStep]] = field(default_factory=dict, repr=False)

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

    def steps(self, connection: str) -> list[DepthStep]:
        """The slider's steps for ``connection``, input side first: one per depth, layers with
        identical maps merged (see :mod:`camscope.depth_steps`)."""
        if connection not in self._steps:
            layers = [LayerAtDepth(layer, depth, *self._extent_and_fingerprint(connection, layer))
                      for (conn, layer), depth in self.depths.items() if conn == connection]
            self._steps[connection] = depth_steps(layers)
        return self._steps[connection]

    def default_position(self, connection: str) -> int:
        """1-based slider position of the default step: the deepest with spatial extent."""
        return default_position(self.steps(connection)) + 1

    def _extent_and_fingerprint(self, connection: str, layer: str) -> tuple[int, str]:
        digest, extent = hashlib.sha1(), 0
        for key in sorted(key for key in self.maps if key[0] == connection and key[2] == layer):
            heat = self.maps[key]
            extent = heat.size
            digest.update(f"{key[1]}{key[3]}{heat.shape}".encode())
            digest.update(heat.tobytes())
        return extent, digest.hexdigest()

    def heat(self, connection: str, algorithm: str, layer: str, label: int) -> np.ndarray | None:
        """The raw map, or None when that combination was not computed (e.g. a label outside top-k)."""
        return self.maps.get((connection, algorithm, layer, int(label)))
