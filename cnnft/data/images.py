"""Image decoding: every image enters the project through :func:`load_rgb`."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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


@functools.cache
def _decode_error(path: str, size: int, mtime_ns: int) -> str | None:
    """Why ``load_rgb`` cannot decode ``path`` (None if it can); memoised per file version."""
    try:
        load_rgb(path)
    except CorruptImageError as e:
        return str(e)
    return None


def undecodable(paths: Sequence[str | Path], workers: int = 4) -> dict[Path, str]:
    """The files of ``paths`` that :func:`load_rgb` cannot decode, each with the reason.

    Each file is decoded in full (the datasets' own decoder: "decodable" means what they accept),
    in ``workers`` threads (Pillow releases the GIL while decoding), once per process and file
    version (path, size, mtime). A missing file raises ``DataError``: it is not corrupt."""
    def check(p: str | Path) -> str | None:
        st = os.stat(p) if Path(p).is_file() else None
        if st is None:
            load_rgb(p)  # raises the DataError naming the missing file
        return _decode_error(str(p), st.st_size, st.st_mtime_ns)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = list(pool.map(check, paths))
    return {Path(p): e for p, e in zip(paths, errors, strict=True) if e is not None}
