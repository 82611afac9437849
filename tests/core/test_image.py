"""Image files as img2img reads them (core/image.py): upright by their EXIF orientation, as
diffusers' load_image; 16-bit grey scaled to 8 bits, not clipped; a broken file named."""

import numpy as np
import pytest
from PIL import Image

from mini_tgate.core import image
from mini_tgate.core.image import read_image


def photo(path, orientation: int, size=(48, 32)) -> np.ndarray:
    """A JPEG as a phone saves it: the sensor's pixels, and an EXIF tag saying how to turn them."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)
    return pixels


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_as_diffusers_load_image(tmp_path, orientation):
    load_image = pytest.importorskip("diffusers.utils").load_image
    path = tmp_path / "phone.jpg"
    photo(path, orientation)
    want = np.asarray(load_image(str(path)))  # upright (PIL.ImageOps.exif_transpose), RGB
    got = read_image(path, 4096)
    assert tuple(got.shape) == (1, 3, *want.shape[:2])
    np.testing.assert_array_equal((got[0].permute(1, 2, 0) * 255).round().byte().numpy(), want)
    with Image.open(path) as im:  # batch's check of the size, from the header
        assert image.upright_size(im) == (want.shape[1], want.shape[0])


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257, 32767, 32896, 65406, 65535]], dtype=np.uint16).repeat(8, axis=0)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    got = read_image(tmp_path / "grey16.png", 4096)
    want = np.array([0, 0, 1, 1, 127, 128, 254, 255])  # round(v / 257)
    assert tuple(got.shape) == (1, 3, 8, 8)
    np.testing.assert_array_equal((got * 255).round().numpy(), np.broadcast_to(want, (1, 3, 8, 8)))


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="cut.png") as e:
        read_image(path, 4096)
    assert "\n" not in str(e.value)


def test_exif_that_is_not_tiff_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bad-exif.png"
    Image.new("RGB", (24, 16)).save(path, exif=b"Exif\x00\x00garbage")
    with pytest.raises(ValueError, match="bad-exif.png"):
        read_image(path, 4096)
    with Image.open(path) as im, pytest.raises(OSError, match="EXIF"):  # batch's check: an OSError, as open's
        image.upright_size(im)
