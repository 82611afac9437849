"""The two image helpers of `diffusers.utils` that scripts import beside a pipeline, so that
`from diffusers.utils import load_image, make_image_grid` needs only its import changed. Both
work on PIL images, so both need Pillow (optional at run time, like output_type="pil")."""

from __future__ import annotations

import os
from pathlib import Path

from .core.bounds import MAX_SIDE
from .core.image import open_image


def load_image(image, convert_method=None):
    """An RGB PIL image from a file path (upright by its EXIF orientation, as diffusers turns it)
    or a PIL image (converted to RGB); `convert_method(image)` replaces the RGB conversion, as in
    diffusers. URLs are refused: nothing here downloads (diffusers fetches them)."""
    from PIL import Image, ImageOps

    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise ValueError(f"load_image: {image!r} is a URL; mini_tgate reads local files only (download it first)")
    if isinstance(image, (str, os.PathLike)):
        if convert_method is None:
            return Image.fromarray(open_image(Path(image), MAX_SIDE)[0])
        with Image.open(image) as im:
            return convert_method(ImageOps.exif_transpose(im))
    if not isinstance(image, Image.Image):
        raise TypeError(f"load_image takes a file path or a PIL image, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    return convert_method(image) if convert_method is not None else image.convert("RGB")


def make_image_grid(images: list, rows: int, cols: int, resize: int | None = None):
    """The images pasted row by row into one PIL image of rows x cols cells of the first one's size
    (each resized to resize x resize first when given), as diffusers' make_image_grid."""
    from PIL import Image

    if len(images) != rows * cols:
        raise ValueError(f"make_image_grid: {len(images)} images for a {rows} x {cols} grid")
    if resize is not None:
        images = [im.resize((resize, resize)) for im in images]
    w, h = images[0].size
    grid = Image.new("RGB", size=(cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, box=(i % cols * w, i // cols * h))
    return grid
