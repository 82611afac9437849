"""mini_tgate.utils against diffusers.utils: the same pixels from load_image (an EXIF-rotated
photo, a palette image, a PIL image given) and from make_image_grid."""

import numpy as np
import pytest
from diffusers.utils import load_image as their_load
from diffusers.utils import make_image_grid as their_grid
from PIL import Image

from mini_tgate.utils import load_image, make_image_grid


def photo(tmp_path, orientation=6, mode="RGB"):
    rng = np.random.default_rng(orientation)
    im = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    im = im.convert(mode) if mode != "RGB" else im
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{orientation}{mode}.png"
    im.save(path, exif=exif)
    return path


@pytest.mark.parametrize("orientation, mode", [(6, "RGB"), (3, "RGB"), (1, "P"), (8, "L")])
def test_load_image_matches_diffusers(tmp_path, orientation, mode):
    path = photo(tmp_path, orientation, mode)
    ours, theirs = load_image(str(path)), their_load(str(path))
    assert ours.mode == theirs.mode == "RGB" and ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    with Image.open(path) as im:  # a PIL image given
        assert np.array_equal(np.asarray(load_image(im)), np.asarray(their_load(im)))
    grey = load_image(str(path), convert_method=lambda im: im.convert("L"))
    assert np.array_equal(np.asarray(grey), np.asarray(their_load(str(path), convert_method=lambda im: im.convert("L"))))


def test_load_image_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="URL"):
        load_image("https://example.com/a.png")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="file path or a PIL image"):
        load_image(3)


@pytest.mark.parametrize("resize", [None, 16])
def test_make_image_grid_matches_diffusers(resize):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(6)]
    ours, theirs = make_image_grid(images, 2, 3, resize), their_grid(images, 2, 3, resize)
    assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs))
    with pytest.raises(ValueError, match="6 images for a 2 x 2 grid"):
        make_image_grid(images, 2, 2)
