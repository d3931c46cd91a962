"""Selective-search region proposals (OpenCV-contrib, fast mode), cached on disk per image.

The cache lives in ``<cache_dir>/<hash of the settings>/<image_id>_<file stamp>.npy``; changing
any setting (mode, minimum size, maximum count, seed) selects another folder, and rewriting an
image (its size or modification time) another file, so a cache is never reused for settings or
pixels it was not made with. Each file is written to a temporary name and renamed.
Proposals are computed once, in parallel worker processes (one OpenCV thread each).

OpenCV ranks the regions with the C library's ``rand()`` (level x random number, as in the
selective-search paper), which ``cv2.setRNGSeed`` does not seed: unseeded, the order of the boxes
(and so which ``max_boxes`` are kept, and which windows a fine-tuning batch draws) depended on
what the worker process had computed before. ``selective_search`` seeds it before each image.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cnnft.data.images import load_rgb
from cnnft.errors import DataError
from cnnft.io import atomic_path, files_fingerprint, stable_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProposalSettings:
    """How proposals are made. ``min_size``: boxes narrower or shorter than this are dropped
    (R-CNN used 20 px); ``max_boxes``: keep the first (highest-ranked) boxes."""

    mode: str = "fast"
    min_size: int = 20
    max_boxes: int = 2000
    seed: int = 0

    def key(self) -> str:
        return stable_hash({**asdict(self), "ranking": "seeded"})  # caches of unseeded runs differ


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name)
    except OSError:
        log.warning("C library %s not found: selective search's box order will not be reproducible", name)
        return None


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's ``rand()``, which OpenCV's selective search uses to rank regions."""
    lib = _c_library()
    if lib is not None:
        lib.srand(ctypes.c_uint(seed + 1))  # glibc takes 0 for 1: seeds 0 and 1 would coincide


def selective_search(image: np.ndarray, settings: ProposalSettings) -> np.ndarray:
    """Proposals of one RGB uint8 image as float32 ``[N,4]`` half-open boxes, ranked."""
    import cv2

    if settings.mode not in ("fast", "quality", "single"):
        raise DataError(f"proposals.mode={settings.mode!r}; expected 'fast', 'quality' or 'single'")
    cv2.setNumThreads(1)
    cv2.setRNGSeed(settings.seed)
    _seed_c_rand(settings.seed)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
    {"fast": ss.switchToSelectiveSearchFast, "quality": ss.switchToSelectiveSearchQuality,
     "single": ss.switchToSingleStrategy}[settings.mode]()
    rects = ss.process().reshape(-1, 4).astype(np.float32)  # x, y, w, h
    keep = (rects[:, 2] >= settings.min_size) & (rects[:, 3] >= settings.min_size)
    rects = rects[keep][: settings.max_boxes]
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def _compute_one(job: tuple[str, str, str, ProposalSettings]) -> str:
    image_id, image_path, out_path, settings = job
    boxes = selective_search(load_rgb(image_path), settings)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.save(f, boxes)
    return image_id


def cache_folder(cache_dir: str | Path, settings: ProposalSettings) -> Path:
    return Path(cache_dir) / f"ss_{settings.mode}_{settings.key()}"


def load_cached(path: Path) -> np.ndarray:
    """Read one cache file; raise DataError if it is unreadable or not ``[N,4]``."""
    try:
        boxes = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"corrupt proposal cache file {path}: {e}; delete it to recompute") from e
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DataError(f"proposal cache file {path} holds shape {boxes.shape}; expected [N, 4]")
    return boxes.astype(np.float32)


def compute_proposals(images: Sequence[tuple[str, str | Path]], cache_dir: str | Path,
                      settings: ProposalSettings, *, workers: int = 2,
                      progress: bool = True, compute_missing: bool = True) -> dict[str, np.ndarray]:
    """Proposals for ``(image_id, image_path)`` pairs, computing the missing ones in parallel
    (``compute_missing=False``: a DataError naming the images without cached proposals)."""
    folder = cache_folder(cache_dir, settings)
    folder.mkdir(parents=True, exist_ok=True)
    files = {i: folder / f"{i}_{files_fingerprint([p])[:10]}.npy" for i, p in images}
    missing = [(i, str(p), str(files[i]), settings) for i, p in images if not files[i].exists()]
    if missing and not compute_missing:
        names = ", ".join(job[0] for job in missing[:5])
        raise DataError(f"{len(missing)} of {len(images)} images have no cached proposals in {folder} "
                        f"(first: {names}); expected one <id>_<stamp>.npy per image, or allow "
                        "computing them (proposals.compute_missing=true)")
    if missing:
        log.info("selective search on %d of %d images (cache %s)", len(missing), len(images), folder)
        from tqdm import tqdm

        bar = tqdm(total=len(missing), desc="selective search", disable=not progress, unit="img")
        if workers > 1 and len(missing) > 1:
            with mp.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_compute_one, missing, chunksize=4):
                    bar.update()
        else:
            for job in missing:
                _compute_one(job)
                bar.update()
        bar.close()
    return {i: load_cached(files[i]) for i, _ in images}
