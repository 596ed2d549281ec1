"""Pictures the UI shows: overlays, raw heatmaps, 1-D signals with their heatmap band, signed
differences between runs, top-k bars, confusion matrix.

Every function returns an RGB uint8 array (Gradio serves it as an <img>, a PNG: the browser tests
read its pixels back). The population is an interactive Plotly figure (``ui/population.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def overlay_picture(image: np.ndarray | None, heat: np.ndarray, alpha: float, size: int = VIEW_SIZE,
                    signal: np.ndarray | None = None) -> np.ndarray:
    """The input (enlarged) with ``heat`` blended over it; a black canvas when there is no input.
    A 1-D map is drawn as :func:`signal_picture` (``signal`` the sample's values, if known)."""
    if is_signal(heat):
        return signal_picture(signal, heat, max(alpha, SIGNAL_MIN_ALPHA), signal_size(size))
    base = enlarge(image, size) if image is not None else np.zeros((size, size, 3), np.uint8)
    return np.asarray(overlay(base, heat, alpha))


def heat_picture(heat: np.ndarray, size: tuple[int, int] = (VIEW_SIZE, VIEW_SIZE)) -> np.ndarray:
    """The raw heatmap alone, coloured by its own maximum, at ``size`` (height, width)."""
    return colorize(normalize(upsample(heat, size)))


SIGNAL_SIZE = (200, 480)  # (height, width) of a 1-D sample's picture
STRIP_HEIGHT = 48  # a 1-D raw heatmap is drawn as a strip this high
SIGNAL_COLOURS = ((20, 20, 20), (40, 70, 160), (150, 40, 120), (30, 120, 60))
SIGNAL_MIN_ALPHA = 0.35  # the band under a signal never fades out completely
SIGNAL_MARGIN = 8  # pixels above and below the drawn signal


def signal_size(size: int = VIEW_SIZE) -> tuple[int, int]:
    """(height, width) of a 1-D sample's overlay in a viewer of ``size`` pixels."""
    return max(size * 5 // 8, 48), round(size * 1.5)


def is_signal(heat: np.ndarray) -> bool:
    """Whether a map is 1-D (stored with height 1 and more than one position)."""
    return heat.ndim == 2 and heat.shape[0] == 1 and heat.shape[1] > 1


def raw_picture(heat: np.ndarray) -> np.ndarray:
    """The raw heatmap alone: a square for an image map, a strip for a 1-D map."""
    if is_signal(heat):
        return heat_picture(heat, (STRIP_HEIGHT, SIGNAL_SIZE[1]))
    return heat_picture(heat)


def signal_picture(signal: np.ndarray | None, heat: np.ndarray, alpha: float,
                   size: tuple[int, int] = SIGNAL_SIZE) -> np.ndarray:
    """A 1-D sample: its channels drawn as lines over the heatmap as a colour band along them.

    Args:
        signal: ``(C, L)`` (or ``(L,)``) values; None draws the band alone.
        heat: the map, ``(1, L')`` or ``(L',)``; upsampled along the signal.
        alpha: opacity of the band over white.
    """
    height, width = size
    band = colorize(normalize(upsample(np.asarray(heat, np.float32).reshape(1, -1), (height, width))))
    canvas = np.rint((1 - alpha) * 255 + alpha * band.astype(np.float32)).clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(canvas)
    if signal is not None:
        values = np.asarray(signal, np.float32).reshape(-1, np.shape(signal)[-1])
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        span = high - low if high > low else 1.0
        draw, margin = ImageDraw.Draw(picture), SIGNAL_MARGIN
        xs = np.linspace(0, width - 1, values.shape[1])
        for channel, row in enumerate(values):
            ys = margin + (1 - (row - low) / span) * (height - 2 * margin)
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=SIGNAL_COLOURS[channel % len(SIGNAL_COLOURS)],
                      width=2)
    return np.asarray(picture)


def difference_picture(heat: np.ndarray, other: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Signed difference of two maps, each scaled by its own maximum: red where ``heat`` is hotter,
    blue where ``other`` is, white where they agree (colours -1..1 on ``RdBu_r``)."""
    difference = normalize(upsample(heat, size)) - normalize(upsample(other, size))
    return colorize((difference + 1) / 2, "RdBu_r")


def blank_picture(size: int = VIEW_SIZE) -> np.ndarray:
    """A neutral grey square shown when there is nothing to draw."""
    return np.full((size, size, 3), 235, np.uint8)


SHEET_TILE, SHEET_GAP, SHEET_CAPTION = 128, 8, 50


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
