"""Image decoding: every image enters the project through :func:`load_rgb`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cnnft.errors import CorruptImageError, DataError


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file into a uint8 ``[H, W, 3]`` RGB array.

    Raises ``DataError`` if the file is missing and ``CorruptImageError`` if it cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist; expected a readable JPEG or PNG file")
    try:
        with Image.open(path) as image:
            return np.array(
                image.convert("RGB"), dtype=np.uint8
            )  # convert() forces the full decode
    except Exception as exc:  # Pillow raises many exception types on corrupt data
        raise CorruptImageError(f"cannot decode image {path}: {exc}") from exc
