"""`generate --compare`: each image made without and with the gate, saved as three labelled
panels [no gate | TGATE | difference], and the speed-up said plainly.

The speed-up is measured on the first batch, made again after its two saved runs (which warmed
both paths up: allocations, kernel caches, compilation) COMPARE_TIMED_RUNS times more, the two
paths in turn. It compares the best denoising time of each; when the timed runs of one path
differ by more than COMPARE_NOISE of the faster one, the machine was too noisy for the ratio to be
trusted, and a warning says so (docs/command-line.md).
"""

from __future__ import annotations

import numpy as np

from ..core.bounds import CLI_LABEL_PIXELS, COMPARE_NOISE
from ..formats.png import side_by_side, to_uint8

LABELS = ("no gate", "TGATE", "difference")
NO_PILLOW = ("note: Pillow is not installed, so --compare's panels are not labelled: they are no gate | TGATE | "
             "difference, left to right (pip install pillow labels them)")


def has_pillow() -> bool:
    try:
        import PIL.ImageDraw  # noqa: F401
    except ImportError:
        return False
    return True


def compared(plain, gated) -> np.ndarray:
    """[no gate | TGATE | difference] (png.side_by_side) as uint8, each panel's label drawn in a
    black strip above it (Pillow's default bitmap font, scaled up with the image); unlabelled
    without Pillow (has_pillow; generate says so once)."""
    picture = to_uint8(side_by_side(plain, gated))
    return label_panels(picture, LABELS) if has_pillow() else picture


def label_panels(picture: np.ndarray, labels) -> np.ndarray:
    """`picture`, uint8 (H, W, C) of len(labels) panels side by side, with a strip above naming
    each: white text on black, cut to its panel's width."""
    from PIL import Image, ImageDraw, ImageFont

    font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()  # the bitmap font
    h, width, channels = picture.shape
    panel = width // len(labels)
    scale = max(1, h // CLI_LABEL_PIXELS)  # about the same share of a large image as of a small one
    text_height = max(font.getbbox(label)[3] for label in labels)
    strip = Image.new("L", (width // scale, text_height + 4), 0)
    draw = ImageDraw.Draw(strip)
    for k, label in enumerate(labels):
        while label and draw.textlength(label, font=font) > panel // scale - 4:
            label = label[:-1]
        draw.text((k * panel // scale + 2, 2), label, fill=255, font=font)
    strip = strip.resize((width, strip.height * scale), Image.Resampling.NEAREST)
    rows = np.repeat(np.asarray(strip)[:, :, None], channels, axis=2)
    if channels in (2, 4):  # opaque alpha
        rows[:, :, -1] = 255
    return np.concatenate([rows, picture], axis=0)


def seconds(x: float) -> str:
    return f"{x:.2f} s" if x >= 1 else f"{x * 1000:.0f} ms"


def speedup(plain: list[float], gated: list[float]) -> tuple[str, str | None]:
    """(the speed-up line, a warning or None) from the denoising seconds of the timed runs of each
    path. The ratio is of the best run of each; the runs are too noisy to trust when those of
    one path lie more than COMPARE_NOISE apart (of the faster one)."""
    best_plain, best_gated = min(plain), min(gated)
    ratio = best_plain / best_gated
    how = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
    line = (f"TGATE: {how} ({seconds(best_gated)} vs {seconds(best_plain)} of denoising; the best of "
            f"{len(plain)} timed runs of each, after a warm-up run of both)")
    spread = {name: (max(t) - min(t)) / min(t) for name, t in (("without the gate", plain), ("with it", gated))}
    if max(spread.values()) <= COMPARE_NOISE:
        return line, None
    runs = "; ".join(f"{name} {', '.join(seconds(x) for x in t)} ({spread[name]:.0%} apart)"
                     for name, t in zip(spread, (plain, gated)))
    return line, (f"the timed runs were too noisy to trust the speed-up: {runs}, more than {COMPARE_NOISE:.0%} "
                  "apart; rerun with the machine otherwise idle, or with more --steps")
