"""The README's pictures of transformer and 1-D maps, drawn by camscope's own code.

    python docs/make_engine_images.py

Writes ``docs/images/vit-depth-strip.png`` (the demo's "vit" run: GradCAM of the true digit at every
depth of the view that holds it, input to output) and ``docs/images/signal-overlay.png`` (the GunPoint
demo's "cnn1d" run: GradCAM of the true class along the signal at three depths, for one series of each
class). Models train on first use (cached), as in ``camscope demo``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from camscope import CamEngine  # noqa: E402
from ui.pictures import overlay_picture, signal_picture, tile_sheet  # noqa: E402

IMAGES = ROOT / "docs" / "images"


def vit_depth_strip(sample: str = "4003", algorithm: str = "gradcam") -> np.ndarray:
    """One tile per depth (the last layer to finish at that depth) of the view holding the digit."""
    from camscope.demo import project

    engine = CamEngine(project.model("vit"))
    view = project.metadata("validation", sample)["view"]
    label = project.ground_truth("validation", sample)
    explanation = engine.explain(project.load_batch("validation", [sample]), labels=[label], algorithms=[algorithm])
    deepest = {info.depth[view]: info for info in engine.layers if view in info.depth}
    image = project.visualize("ground-truth box", "validation", sample)
    half = image[:, :64] if view == "left" else image[:, -64:]
    tiles = []
    for depth, info in sorted(deepest.items()):
        heat = explanation.maps[algorithm][info.name][0, 0].numpy()
        name = info.name.removeprefix(f"{view}_branch.")
        tiles.append((overlay_picture(half, heat, 0.5, size=128), f"depth {depth}\n{name}"))
    return tile_sheet(tiles, columns=min(len(tiles), 8))


def signal_overlay(algorithm: str = "gradcam") -> np.ndarray:
    """For the first test series of each class: GradCAM of its true class as a colour band along it, at three depths."""
    from camscope.demo_signals import LABEL_NAMES, project

    test = project.slices["test"].sample_ids
    ids = [next(i for i in test if project.ground_truth("test", i) == label) for label in range(len(LABEL_NAMES))]
    engine = CamEngine(project.model("cnn1d"))
    font = ImageFont.load_default(size=14)
    rows = []
    for sample in ids:
        label = project.ground_truth("test", sample)
        signal = project.sample("test", sample)["signal"]
        explanation = engine.explain(project.load_batch("test", [sample]), labels=[label], algorithms=[algorithm])
        for name in ("features.0", "features.1", "features"):
            info = engine.layer(name)
            heat = explanation.maps[algorithm][name][0].numpy()  # [1, L'] (K = 1)
            picture = Image.fromarray(signal_picture(signal, heat, 0.6, (110, 560)))
            canvas = Image.new("RGB", (picture.width, picture.height + 22), "white")
            canvas.paste(picture, (0, 22))
            ImageDraw.Draw(canvas).text(
                (4, 3), f"test series {sample} (class '{LABEL_NAMES[label]}'): {algorithm} at {name}, "
                        f"depth {info.depth['signal']}, L = {info.shape[1]}", fill=(40, 40, 40), font=font)
            rows.append(np.asarray(canvas))
    gap = np.full((8, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([piece for row in rows for piece in (row, gap)][:-1])


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    Image.fromarray(signal_overlay()).save(IMAGES / "signal-overlay.png")
    Image.fromarray(vit_depth_strip()).save(IMAGES / "vit-depth-strip.png")
    print(f"wrote {IMAGES / 'signal-overlay.png'} and {IMAGES / 'vit-depth-strip.png'}")


if __name__ == "__main__":
    main()
