"""Coloured shapes: a tiny text-to-image dataset, and a checker that grades generated images.

    python examples/shapes.py            # writes docs/shapes_dataset.png, checks the checker

Every image is 64x64 RGB: one flat-coloured shape (circle, square or triangle) on a flat
background, captioned "a red circle on a blue background". The eight colours are the corners
of the RGB cube (as far apart as colours can be), so "which colour is this pixel" has one clear
answer; the background is never the shape's colour: 8 x 7 x 3 = 168 prompts. Size and
position vary (they are not in the caption), so each prompt has many right answers.

The checker knows how the images are made and grades an image against its prompt:
- background colour: the palette colour nearest to the median of the 2-pixel border;
- shape colour: the most common palette colour (nearest-colour label) among the pixels
  that are not background-coloured, the "foreground";
- shape: the foreground's fill ratio of its bounding box: a square fills 1.0 of it, a circle
  pi/4 = 0.785, an upright triangle 0.5; decided at the midpoints 0.64 and 0.89.
"""

from __future__ import annotations

import re

import numpy as np

SIZE = 64
LO, HI = 30, 225  # the cube's corners, pulled in a little from 0 and 255
COLORS = {
    "black": (LO, LO, LO), "red": (HI, LO, LO), "green": (LO, HI, LO), "blue": (LO, LO, HI),
    "yellow": (HI, HI, LO), "magenta": (HI, LO, HI), "cyan": (LO, HI, HI), "white": (HI, HI, HI),
}
NAMES = list(COLORS)
PALETTE = np.array([COLORS[n] for n in NAMES], dtype=np.float32)  # (8, 3)
SHAPES = ["circle", "square", "triangle"]
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # share of the bounding box covered
PROMPT = re.compile(r"a (\w+) (\w+) on a (\w+) background")


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_prompts() -> list[str]:
    """The 168 prompts: every shape colour, shape and background colour (never the same colour)."""
    return [caption(c, s, b) for c in NAMES for s in SHAPES for b in NAMES if b != c]


# ----------------------------------------------------------------------------- drawing


def render(color: str, shape: str, background: str, cx: float, cy: float, r: float, aa: int = 4) -> np.ndarray:
    """(64, 64, 3) uint8: the shape centred at (cx, cy) with half-size r, in pixels,
    anti-aliased by drawing at `aa` times the resolution and averaging."""
    x = (np.arange(SIZE * aa, dtype=np.float32) + 0.5) / aa  # sample positions in pixel units
    dx, dy = x[None, :] - cx, x[:, None] - cy  # (1, n) and (n, 1): broadcast to (n, n)
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":  # apex at the top, base at the bottom, as wide as it is tall
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cover = inside.reshape(SIZE, aa, SIZE, aa).mean(axis=(1, 3))[..., None]  # (64, 64, 1) in [0, 1]
    image = cover * np.array(COLORS[color]) + (1 - cover) * np.array(COLORS[background])
    return np.round(image).astype(np.uint8)


def sample(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One random (image, caption)."""
    c = rng.integers(len(NAMES))
    b = (c + 1 + rng.integers(len(NAMES) - 1)) % len(NAMES)  # any colour but the shape's
    shape = SHAPES[rng.integers(len(SHAPES))]
    r = rng.uniform(12, 20)  # half-size: the shape spans 24-40 px
    cx, cy = rng.uniform(r + 6, SIZE - r - 6, size=2)  # at least 6 px of background all round
    return render(NAMES[c], shape, NAMES[b], cx, cy, r), caption(NAMES[c], shape, NAMES[b])


def make_dataset(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """(n, 64, 64, 3) uint8 images and their captions, the same for the same seed."""
    rng = np.random.default_rng(seed)
    pairs = [sample(rng) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


# ----------------------------------------------------------------------------- checking


def nearest_color(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 255] -> (...) index into NAMES of the nearest palette colour."""
    d = ((pixels[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)  # (..., 8)
    return d.argmin(-1)


def describe(image: np.ndarray) -> dict:
    """What the checker sees in one image: (64, 64, 3), uint8 or float in [0, 1]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image * 255, 0, 255)
    image = image.astype(np.float32)
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    bg = int(nearest_color(np.median(border, axis=0)))
    labels = nearest_color(image)  # (64, 64)
    fg = labels != bg
    out = {"background": NAMES[bg], "color": None, "shape": None, "fill": 0.0, "area": int(fg.sum())}
    if fg.sum() < 30:  # no shape to speak of
        return out
    out["color"] = NAMES[np.bincount(labels[fg], minlength=len(NAMES)).argmax()]
    # bounding box from the rows and columns holding at least 2 foreground pixels (ignores specks)
    rows, cols = np.where(fg.sum(1) >= 2)[0], np.where(fg.sum(0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return out
    box = fg[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    out["fill"] = fill = float(box.mean())
    out["shape"] = "triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square"
    return out


def check(image: np.ndarray, prompt: str) -> dict:
    """Per-attribute adherence of an image to its prompt: booleans color, background, shape, all."""
    m = PROMPT.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    color, shape, background = m.groups()
    seen = describe(image)
    ok = {"color": seen["color"] == color, "background": seen["background"] == background,
          "shape": seen["shape"] == shape}
    ok["all"] = all(ok.values())
    return ok


def adherence(images, prompts) -> dict:
    """The share of images right on each attribute."""
    results = [check(im, p) for im, p in zip(images, prompts)]
    return {k: float(np.mean([r[k] for r in results])) for k in ("color", "background", "shape", "all")}


if __name__ == "__main__":
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from mini_tgate.formats.png import image_grid, save_png

    images, prompts = make_dataset(2000, seed=1234)
    print(f"{len(all_prompts())} prompts; checker on 2000 dataset images:", adherence(images, prompts))
    fills = {s: [describe(im)["fill"] for im, p in zip(images, prompts) if f" {s} " in p] for s in SHAPES}
    for s, f in fills.items():
        print(f"  {s:9s} fill ratio {np.mean(f):.3f} (min {np.min(f):.3f}, max {np.max(f):.3f})")
    (root / "docs").mkdir(exist_ok=True)
    save_png(root / "docs" / "shapes_dataset.png", image_grid(images[:32], cols=8))
    print("wrote docs/shapes_dataset.png; first captions:", *prompts[:8], sep="\n  ")
