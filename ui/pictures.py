"""Pictures the UI shows: overlays, raw heatmaps, the population scatter, top-k bars, confusion matrix.

Every function returns an RGB uint8 array (Gradio serves it as an <img>), so the page never
depends on client-side plotting for its main views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw, ImageFont

from camscope.heatmap import colorize, normalize, overlay, to_rgb, upsample

VIEW_SIZE = 320  # pixels on the long side of the viewer's images
CORRECT, WRONG, OTHER = "#2e9e5b", "#d1495b", "#8a8f98"


def enlarge(image: np.ndarray, size: int = VIEW_SIZE) -> np.ndarray:
    """Scale an image up (never down) so its long side is about ``size`` pixels (smooth)."""
    rgb = to_rgb(image)
    factor = size / max(rgb.shape[:2])
    if factor <= 1:
        return rgb
    height, width = (round(d * factor) for d in rgb.shape[:2])
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def overlay_picture(image: np.ndarray | None, heat: np.ndarray, alpha: float, size: int = VIEW_SIZE) -> np.ndarray:
    """The input (enlarged) with ``heat`` blended over it; a black canvas when there is no input."""
    base = enlarge(image, size) if image is not None else np.zeros((size, size, 3), np.uint8)
    return np.asarray(overlay(base, heat, alpha))


def heat_picture(heat: np.ndarray, size: tuple[int, int] = (VIEW_SIZE, VIEW_SIZE)) -> np.ndarray:
    """The raw heatmap alone, coloured by its own maximum, at ``size`` (height, width)."""
    return colorize(normalize(upsample(heat, size)))


def blank_picture(size: int = VIEW_SIZE) -> np.ndarray:
    """A neutral grey square shown when there is nothing to draw."""
    return np.full((size, size, 3), 235, np.uint8)


SHEET_TILE, SHEET_GAP, SHEET_CAPTION = 128, 8, 34


def tile_sheet(tiles: Sequence[tuple[np.ndarray, str]], columns: int) -> np.ndarray:
    """Pictures in rows of ``columns`` tiles, each with its (multi-line) caption underneath."""
    cell_w, cell_h = SHEET_TILE + SHEET_GAP, SHEET_TILE + SHEET_CAPTION + SHEET_GAP
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (min(len(tiles), columns) * cell_w + SHEET_GAP, rows * cell_h + SHEET_GAP), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=12)
    for index, (picture, caption) in enumerate(tiles):
        row, column = divmod(index, columns)
        x, y = SHEET_GAP + column * cell_w, SHEET_GAP + row * cell_h
        sheet.paste(Image.fromarray(to_rgb(picture)).resize((SHEET_TILE, SHEET_TILE), Image.BILINEAR), (x, y))
        draw.multiline_text((x + SHEET_TILE / 2, y + SHEET_TILE + 3), caption, fill=(50, 50, 50), font=font,
                            anchor="ma", align="center", spacing=2)
    return np.asarray(sheet)


def sheet_index(x: float, y: float, columns: int, count: int) -> int | None:
    """Which tile of a :func:`tile_sheet` the pixel (x, y) falls on (None between or after tiles)."""
    column = int((x - SHEET_GAP / 2) // (SHEET_TILE + SHEET_GAP))
    row = int((y - SHEET_GAP / 2) // (SHEET_TILE + SHEET_CAPTION + SHEET_GAP))
    index = row * columns + column
    return index if 0 <= column < columns and 0 <= index < count else None


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    # Figure + Agg canvas, not pyplot: no global state, safe in Gradio's worker threads
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _to_array(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


COLOUR_BY = ("correctness", "ground truth", "prediction", "loss")


def population_picture(
    samples: pd.DataFrame,
    colour_by: str,
    label_names: Sequence[str],
    marked: Sequence[str] = (),
    current: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter of the slice's 2-D projection; returns (picture, pixel (x, y) of every sample).

    The pixel positions let a click on the picture pick the nearest sample.
    """
    fig, ax = _figure(5.2, 4.4)
    x, y = samples["x"].to_numpy(float), samples["y"].to_numpy(float)
    if colour_by == "loss":
        points = ax.scatter(x, y, c=samples["loss"], cmap="viridis", s=16, linewidths=0)
        fig.colorbar(points, ax=ax, fraction=0.046, pad=0.02, label="loss")
    elif colour_by == "correctness":
        right = (samples["gt"] == samples["prediction"]).to_numpy()
        ax.scatter(x[right], y[right], c=CORRECT, s=16, linewidths=0, label="correct")
        ax.scatter(x[~right], y[~right], c=WRONG, s=22, linewidths=0, label="wrong")
        ax.legend(loc="best", fontsize=8, frameon=False)
    else:
        column = "gt" if colour_by == "ground truth" else "prediction"
        cmap = colormaps["tab10" if len(label_names) <= 10 else "tab20"]
        for label in sorted(samples[column].unique()):
            rows = (samples[column] == label).to_numpy()
            name = label_names[label] if 0 <= label < len(label_names) else str(label)
            ax.scatter(x[rows], y[rows], color=cmap(int(label) % cmap.N), s=16, linewidths=0, label=name)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, title=colour_by)
    ids = samples["sample_id"].astype(str)
    _ring(ax, x, y, ids.isin(list(marked)).to_numpy(), "black", 60)
    if current is not None:
        _ring(ax, x, y, (ids == current).to_numpy(), "#ff7f0e", 160)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"{len(samples)} samples · colour: {colour_by}", fontsize=10)
    fig.tight_layout()
    picture = _to_array(fig)
    pixels = ax.transData.transform(np.column_stack([x, y]))
    pixels[:, 1] = picture.shape[0] - pixels[:, 1]  # matplotlib's y grows upwards, the image's downwards
    return picture, pixels


def _ring(ax: Axes, x: np.ndarray, y: np.ndarray, rows: np.ndarray, colour: str, size: float) -> None:
    if rows.any():
        ax.scatter(x[rows], y[rows], s=size, facecolors="none", edgecolors=colour, linewidths=1.8)


def topk_picture(probabilities: np.ndarray, label_names: Sequence[str], gt: int | None, k: int = 5) -> np.ndarray:
    """Horizontal bars of the ``k`` most probable labels; the ground truth's bar is green, others red/grey."""
    order = np.argsort(probabilities)[::-1][:k][::-1]
    fig, ax = _figure(3.6, 0.45 * len(order) + 0.8)
    predicted = order[-1]
    colours = [CORRECT if label == gt else (WRONG if label == predicted else OTHER) for label in order]
    ax.barh([label_names[i] for i in order], probabilities[order], color=colours)
    for row, label in enumerate(order):
        ax.text(min(probabilities[label] + 0.02, 0.8), row, f"{probabilities[label]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_title(f"top-{len(order)} probabilities", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _to_array(fig)


def confusion_picture(matrix: np.ndarray, label_names: Sequence[str], cell: tuple[int, int] | None) -> np.ndarray:
    """The slice's confusion matrix (rows: ground truth, columns: prediction), ``cell`` outlined."""
    size = 1.2 + 0.32 * len(label_names)
    fig, ax = _figure(size + 0.6, size)
    ax.imshow(np.log1p(matrix), cmap="Blues")
    ticks = range(len(label_names))
    ax.set_xticks(ticks, label_names, rotation=90, fontsize=7)
    ax.set_yticks(ticks, label_names, fontsize=7)
    ax.set_xlabel("prediction", fontsize=8), ax.set_ylabel("ground truth", fontsize=8)
    if len(label_names) <= 12:
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                ax.text(col, row, str(count), ha="center", va="center", fontsize=6,
                        color="white" if count > matrix.max() / 2 else "black")
    if cell is not None:
        gt, prediction = cell
        ax.add_patch(Rectangle((prediction - 0.5, gt - 0.5), 1, 1, fill=False, edgecolor="#ff7f0e", linewidth=2.5))
    ax.set_title("confusion matrix (this sample outlined)", fontsize=9)
    fig.tight_layout()
    return _to_array(fig)
