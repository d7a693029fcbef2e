"""Reading user images robustly: any common mode, EXIF orientation, a pixel limit.

Every failure is an :class:`InputError` naming the file, so a stage can record it and move on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fmbseg.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 50_000_000


def list_images(folder: str | Path) -> list[Path]:
    """Image files below ``folder``, sorted by relative path (stable ids across runs)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: image folder not found")
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not path.name.startswith(".")
    )


def image_id(path: Path, root: Path) -> str:
    """The image's path below ``root`` without its suffix, with forward slashes."""
    return path.relative_to(root).with_suffix("").as_posix()


def _to_rgb_array(image) -> np.ndarray:
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_rgb(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, exif_transpose: bool = True
) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright per EXIF; refuses images above ``max_pixels`` unread.

    ``exif_transpose=False`` keeps the stored pixel order, which benchmark masks are drawn on.
    """
    file = Path(path)
    return _decode_rgb(file, str(file), max_pixels, exif_transpose)


def decode_rgb(
    data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, *, exif_transpose: bool = True
) -> np.ndarray:
    """:func:`read_rgb` for an encoded image in memory (an upload, a request); errors say
    ``name``."""
    import io

    return _decode_rgb(io.BytesIO(data), name, max_pixels, exif_transpose)


def _decode_rgb(source: Any, name: str, max_pixels: int, exif_transpose: bool) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(
                        f"{name}: {width}x{height} pixels exceeds the limit of {max_pixels}"
                    )
                image.load()
                array = _to_rgb_array(ImageOps.exif_transpose(image) if exif_transpose else image)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except Image.DecompressionBombError:
        raise InputError(f"{name}: image too large (decompression bomb guard)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{name}: cannot decode image ({exc})") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name}: empty image")
    return array
