"""Image reading: modes, orientation, limits, and one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmbseg.errors import InputError
from fmbseg.io.images import image_id, list_images, read_rgb

RGB = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)


def save(tmp_path: Path, name: str, image: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgb_png_round_trips(tmp_path: Path) -> None:
    assert np.array_equal(read_rgb(save(tmp_path, "a.png", Image.fromarray(RGB))), RGB)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "1"])
def test_common_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    image = Image.fromarray(RGB).convert(mode)
    suffix = "jpg" if mode == "CMYK" else "png"
    if mode == "LA":
        suffix = "png"
    array = read_rgb(save(tmp_path, f"a.{suffix}", image))
    assert array.shape == (6, 9, 3) and array.dtype == np.uint8


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = save(tmp_path, "g16.png", Image.fromarray(values))
    assert read_rgb(path)[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.fromarray(RGB)  # 9 wide, 6 high
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    path = save(tmp_path, "r.jpg", image, exif=exif)
    assert read_rgb(path).shape == (9, 6, 3)


def test_pixel_limit_refuses_before_decoding(tmp_path: Path) -> None:
    path = save(tmp_path, "big.png", Image.new("RGB", (100, 100)))
    with pytest.raises(InputError, match=r"big.png: 100x100 pixels exceeds the limit of 5000"):
        read_rgb(path, max_pixels=5000)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jpg", b""), ("text.png", b"not an image at all"), ("cut.png", None)],
)
def test_undecodable_files_name_the_file(tmp_path: Path, name: str, content: bytes | None) -> None:
    path = tmp_path / name
    if content is None:
        whole = save(tmp_path, "whole.png", Image.fromarray(RGB)).read_bytes()
        content = whole[: len(whole) // 2]
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        read_rgb(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_listing_is_sorted_recursive_and_ids_are_relative(tmp_path: Path) -> None:
    for relative in ["b/2.jpg", "a.png", "b/1.PNG", "notes.txt", ".hidden.png"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    paths = list_images(tmp_path)
    assert [image_id(p, tmp_path) for p in paths] == ["a", "b/1", "b/2"]
    with pytest.raises(InputError, match="image folder not found"):
        list_images(tmp_path / "absent")
