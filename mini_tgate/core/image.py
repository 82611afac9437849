"""The `image=` argument of img2img, read into one float32 batch (N, 3, H, W) in [0, 1].

What callers have at hand, all accepted (diffusers' `VaeImageProcessor.preprocess` takes the
same kinds and makes the same numbers of them):
- a numpy array (H, W, 3) or (N, H, W, 3): uint8 (0..255) or floating point in [0, 1];
- a torch tensor (N, 3, H, W) or (3, H, W): floating point in [0, 1], or uint8;
- a PIL image (any mode: converted to RGB, so grey, palette and RGBA images work; alpha is dropped);
- a file path, read with Pillow and turned upright by its EXIF orientation (a phone's photo), as
  diffusers' `load_image`. Pillow stays optional: without it a path is refused with a message
  saying so, and the other kinds work.

uint8 values become v / 255 in float32, as diffusers' `pil_to_numpy`. 16-bit grey images (PNG)
become 8 bits as round(v / 257), 65535 -> 255 (Pillow's convert("RGB"), and so diffusers, clips
them at 255: nearly white). Nothing is resized: the pipeline takes its height and width from the
image and refuses sizes it cannot encode.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def read_image(image, max_side: int) -> torch.Tensor:
    """`image` (see the module docstring) -> float32 tensor (N, 3, H, W) in [0, 1]. A file
    larger than `max_side` pixels a side is refused before its pixels are decoded."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(Path(image), max_side)
    elif type(image).__module__.startswith("PIL."):
        image = rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"an image array must be (H, W, 3) or (N, H, W, 3) RGB, got shape {image.shape}")
        return unit_range(torch.from_numpy(np.array(image)).permute(0, 3, 1, 2))  # a copy: the caller's stays as it is
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"an image tensor must be (N, 3, H, W) or (3, H, W) RGB, got shape {tuple(image.shape)}")
        return unit_range(image.detach().cpu())
    raise TypeError("image must be a numpy array, a torch tensor, a PIL image or a file path, "
                    f"got {type(image).__name__}")


def unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> x / 255; floating point checked to lie in [0, 1]; both as float32 (N, 3, H, W)."""
    if x.dtype == torch.uint8:
        return x.float() / 255
    if not x.is_floating_point():
        raise TypeError(f"image values must be uint8 (0..255) or floating point in [0, 1], got {x.dtype}")
    x = x.float()
    if x.numel() and not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise ValueError("floating-point image values must lie in [0, 1] (uint8 images take 0..255), got values "
                         f"from {x.min().item():.4g} to {x.max().item():.4g}")
    return x


def open_image(path: Path, max_side: int) -> np.ndarray:
    """An image file as a uint8 array (1, H, W, 3), read with Pillow (its first frame)."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError(f"reading the image file {path} needs Pillow (pip install pillow); "
                          "or pass the image as a numpy array or torch tensor") from None
    if not path.exists():
        raise FileNotFoundError(f"image file {path}: no such file")
    if not path.is_file():  # a directory, FIFO or device: open() on those fails or hangs
        raise ValueError(f"image file {path}: not a regular file")
    try:
        with Image.open(path) as im:  # reads the header only; pixels are decoded by rgb()
            if max(im.size) > max_side:
                raise ValueError(f"image file {path} is {im.size[0]}x{im.size[1]} pixels; at most {max_side} "
                                 "a side is allowed")
            return rgb(ImageOps.exif_transpose(im))[None]  # (1, H, W, 3) uint8
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # OSError: a truncated file too
        raise ValueError(f"image file {path}: not an image Pillow can read ({e})") from None


def rgb(im) -> np.ndarray:
    """A PIL image as uint8 (H, W, 3); 16-bit grey scaled to 8 bits (the module docstring)."""
    if im.mode == "I" or im.mode.startswith("I;16"):  # "I": how older Pillow reads 16-bit PNGs
        grey = (np.asarray(im).astype(np.int64).clip(0, 65535) + 128) // 257
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def upright_size(im) -> tuple[int, int]:
    """(width, height) of an open PIL image as read_image gives it (EXIF orientations 5 to 8 turn
    it a quarter), from its header: a PNG's eXIf chunk counts when it comes before the pixels."""
    w, h = im.size
    try:
        exif = im.getexif() if im.format != "PNG" or "exif" in im.info else {}  # a PNG's getexif decodes it
    except SyntaxError as e:  # what Pillow raises for EXIF data that is not TIFF: an OSError, as open's
        raise OSError(f"its EXIF data: {e}") from None
    return (h, w) if exif.get(0x0112) in (5, 6, 7, 8) else (w, h)
