"""The population scatter: every sample of a slice as an interactive Plotly (WebGL) figure.

Pure: a pandas frame in, a ``plotly.graph_objects.Figure`` out. Hover shows id, ground truth,
prediction and loss (the page adds a thumbnail, see ``ui/population.js``); a click opens the sample;
box or lasso select adds samples to the sample list. Each point carries its sample id as
``customdata`` so the page's script can tell the server which point was clicked or selected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

CORRECT, WRONG = "#2e9e5b", "#d1495b"
#: Colourings every population has; metadata fields of the project come after them.
BASE_COLOURS = ("correctness", "ground truth", "prediction", "loss")
#: Projection name -> the samples table's columns (``default`` is the contract's x, y).
PROJECTIONS = {"PCA": ("pca_x", "pca_y"), "UMAP": ("umap_x", "umap_y"), "t-SNE": ("tsne_x", "tsne_y"),
               "default": ("x", "y")}
MAX_CATEGORIES = 20  # a metadata field with more distinct values is coloured as a number or not offered
POINT_SIZE = 6


def projections(samples: pd.DataFrame) -> list[str]:
    """The projections the samples table holds (PCA / UMAP / t-SNE, else the default x, y)."""
    found = [name for name, (x, y) in PROJECTIONS.items()
             if name != "default" and {x, y} <= set(samples.columns) and samples[x].notna().any()]
    if found:
        return found
    x, y = PROJECTIONS["default"]
    return ["default"] if {x, y} <= set(samples.columns) and samples[x].notna().any() else []


def colour_fields(samples: pd.DataFrame, metadata: pd.DataFrame | None) -> list[str]:
    """Colourings on offer: the base ones, then each scalar metadata field."""
    fields = [*BASE_COLOURS]
    for column in metadata.columns if metadata is not None else []:
        values = metadata[column]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric or values.astype(str).nunique() <= MAX_CATEGORIES:
            fields.append(f"meta: {column}")
    return fields


def _label(names: Sequence[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def figure(samples: pd.DataFrame, projection: str, colour: str, label_names: Sequence[str],
           metadata: pd.DataFrame | None = None, current: str | None = None,
           listed: Sequence[str] = (), meta: dict | None = None) -> go.Figure:
    """The scatter of ``samples`` on ``projection``, coloured by ``colour``; ``current`` ringed orange,
    ``listed`` ringed black; ``meta`` is handed to the page's script (slice, thumbnail URL)."""
    x_col, y_col = PROJECTIONS.get(projection, PROJECTIONS["default"])
    frame = samples.reset_index(drop=True)
    gt, prediction = frame["gt"].to_numpy(int), frame["prediction"].to_numpy(int)
    hover = [f"<b>{sid}</b><br>gt {_label(label_names, g)} · pred {_label(label_names, p)}<br>loss {loss:.3f}"
             for sid, g, p, loss in zip(frame["sample_id"], gt, prediction, frame["loss"].to_numpy(float))]
    values, kind = _colour_values(frame, colour, label_names, metadata)
    fig = go.Figure()
    if kind == "numeric":
        fig.add_trace(_points(frame, x_col, y_col, hover, colour,
                              marker={"color": values, "colorscale": "Viridis", "showscale": True,
                                      "colorbar": {"title": {"text": colour.removeprefix("meta: ")}, "thickness": 12}}))
    else:
        palette = {"correct": CORRECT, "wrong": WRONG}
        for index, category in enumerate(_categories(values, frame, colour)):
            rows = values == category
            colour_of = palette.get(category, (qualitative.D3 + qualitative.Pastel)[index % 20])
            fig.add_trace(_points(frame[rows], x_col, y_col, np.asarray(hover, dtype=object)[rows], str(category),
                                  marker={"color": colour_of}))
    for ids, ring, size in ((listed, "black", 13), ([current] if current else [], "#ff7f0e", 18)):
        rows = frame["sample_id"].isin(list(ids)).to_numpy()
        if rows.any():
            fig.add_trace(go.Scattergl(x=frame.loc[rows, x_col], y=frame.loc[rows, y_col], mode="markers",
                                       hoverinfo="skip", showlegend=False, name="ring",
                                       marker={"size": size, "color": "rgba(0,0,0,0)",
                                               "line": {"color": ring, "width": 2}}))
    fig.update_layout(
        margin={"l": 8, "r": 8, "t": 30, "b": 8}, height=400, dragmode="lasso", hovermode="closest",
        title={"text": f"{len(frame)} samples · {projection} · colour: {colour}", "font": {"size": 13}},
        legend={"title": {"text": colour}, "itemsizing": "constant"}, plot_bgcolor="white",
        xaxis={"showticklabels": False, "showgrid": False, "zeroline": False},
        yaxis={"showticklabels": False, "showgrid": False, "zeroline": False},
        uirevision=projection,  # keep the user's zoom across recolouring
        meta=meta or {},
    )
    return fig


def _points(frame: pd.DataFrame, x_col: str, y_col: str, hover, name: str, marker: dict) -> go.Scattergl:
    return go.Scattergl(x=frame[x_col], y=frame[y_col], mode="markers", name=name,
                        customdata=frame["sample_id"].to_numpy(str)[:, None], hovertext=list(hover),
                        hoverinfo="text", marker={"size": POINT_SIZE, **marker})


def _colour_values(frame: pd.DataFrame, colour: str, label_names: Sequence[str],
                   metadata: pd.DataFrame | None) -> tuple[np.ndarray, str]:
    """Per-sample values of a colouring and whether they are ``numeric`` or ``categorical``."""
    if colour == "correctness":
        return np.where(frame["gt"].to_numpy(int) == frame["prediction"].to_numpy(int), "correct", "wrong"), "cat"
    if colour in ("ground truth", "prediction"):
        column = frame["gt" if colour == "ground truth" else "prediction"].to_numpy(int)
        return np.array([_label(label_names, i) for i in column], dtype=object), "cat"
    if colour == "loss":
        return frame["loss"].to_numpy(float), "numeric"
    field = colour.removeprefix("meta: ")
    if metadata is None or field not in metadata.columns:
        raise ValueError(f"no metadata field {field!r} to colour by")
    values = metadata.set_index(metadata.index.astype(str)).reindex(frame["sample_id"].astype(str))[field]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values) \
            and values.nunique() > MAX_CATEGORIES:
        return values.to_numpy(float), "numeric"
    return values.astype(str).to_numpy(object), "cat"


def _categories(values: np.ndarray, frame: pd.DataFrame, colour: str) -> list:
    """Legend order: correct before wrong, labels by index, other values sorted."""
    if colour in ("ground truth", "prediction"):
        column = frame["gt" if colour == "ground truth" else "prediction"].to_numpy(int)
        return list(dict.fromkeys(values[np.argsort(column, kind="stable")]))
    return sorted(pd.unique(values), key=lambda v: (v != "correct", str(v)))
