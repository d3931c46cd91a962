"""Region proposals of VOC images: OpenCV-contrib selective search (cached per image) or R-CNN's
published boxes read from a MATLAB file. Settings: the ``conf/proposals`` group. (Over 400
lines: the two sources of one contract, their cache and their input checks, read together.)

Selective search follows R-CNN's MATLAB "fast" mode (``rcnn/selective_search/
selective_search_boxes.m``): Felzenszwalb-Huttenlocher segmentations with k in {50, 100}, minimum
segment size k, sigma 0.8, of the image in HSV and in Lab, each grouped hierarchically by two
strategies (colour+fill+texture+size and fill+texture+size; OpenCV's strategy objects, weighted
equally), boxes ranked by level x random number, duplicates removed (OpenCV keeps the first),
boxes narrower or shorter than ``min_size`` dropped, no cap unless ``max_boxes`` is set.
OpenCV's own ``switchToSelectiveSearchFast`` uses k in {150, 300, 450} with minimum segment 100:
``OPENCV_FAST`` spells it in these settings (``bench/proposals.py`` compares the two).

The cache lives in ``<cache_dir>/ss_<hash of the settings>/<image_id>_<file stamp>.npy``; changing
any setting selects another folder, and rewriting an image (its size or modification time)
another file, so a cache is never reused for settings or pixels it was not made with. Each file
is written to a temporary name and renamed. Proposals are computed once, in parallel worker
processes (one OpenCV thread each).

OpenCV ranks the regions with the C library's ``rand()``, which ``cv2.setRNGSeed`` does not seed:
unseeded, the order of the boxes (and so which ``max_boxes`` are kept, and which windows a
fine-tuning batch draws) depended on what the worker process had computed before.
``selective_search`` seeds it before each image.

R-CNN's files (``selective_search_data/voc_2007_<split>.mat``) hold two cell arrays: ``images``
(image ids) and ``boxes`` (per image an ``[N, 4]`` array of 1-based, pixel-inclusive
``[y1 x1 y2 x2]``). ``read_proposal_file`` converts them to cnnft's 0-based half-open
``[x1, y1, x2, y2)`` (``cnnft.data.voc``): ``(x1 - 1, y1 - 1, x2, y2)``, the same conversion as
the devkit's boxes, so IoUs equal R-CNN's (its ``boxoverlap`` adds 1 to widths). MATLAB v5/v7
files are read with scipy.io; v7.3 (HDF5) files with h5py (optional: ``pip install h5py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import multiprocessing as mp
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnft.data.images import load_rgb
from cnnft.errors import ConfigError, CorruptImageError, DataError
from cnnft.hashing import files_fingerprint, stable_hash
from cnnft.io import atomic_path

log = logging.getLogger(__name__)

SOURCES = ("selective_search", "file")
COLOR_SPACES = ("hsv", "lab", "rgi", "h", "intensity")
STRATEGY_PARTS = ("color", "fill", "texture", "size")
#: version of the cached boxes' recipe; bump it when the same settings would give other boxes
CACHE_VERSION = 2


@dataclass(frozen=True)
class ProposalSettings:
    """How proposals are made (``conf/proposals``; the defaults are R-CNN's fast mode).

    ``source``: ``selective_search`` or ``file`` (R-CNN's .mat files: ``path``, a file, a
    pattern with ``{split}``, or the folder holding ``voc_2007_<split>.mat``). Selective
    search: ``ks`` (graph-segmentation thresholds),
    ``min_segment`` (minimum segment size; None: k, as R-CNN), ``sigma``, ``color_spaces``,
    ``strategies`` (each a list of similarity parts, combined with equal weights), ``min_size``
    (boxes narrower or shorter are dropped; R-CNN's minBoxWidth 20), ``seed`` (of the ranking).
    ``max_boxes``: keep the first (highest-ranked) boxes; None keeps all (both sources)."""

    source: str = "selective_search"
    path: str | None = None
    ks: tuple[int, ...] = (50, 100)
    min_segment: int | None = None
    sigma: float = 0.8
    color_spaces: tuple[str, ...] = ("hsv", "lab")
    strategies: tuple[tuple[str, ...], ...] = (("color", "fill", "texture", "size"),
                                               ("fill", "texture", "size"))
    min_size: int = 20
    max_boxes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        normalise = functools.partial(object.__setattr__, self)  # YAML lists -> tuples (frozen)
        normalise("ks", tuple(int(k) for k in self.ks))
        normalise("color_spaces", tuple(str(c).lower() for c in self.color_spaces))
        normalise("strategies", tuple(tuple(str(p).lower() for p in s) for s in self.strategies))
        if self.source not in SOURCES:
            raise ConfigError(f"proposals.source={self.source!r}; expected one of {list(SOURCES)}")
        if self.source == "file" and not self.path:
            raise ConfigError("proposals.source=file needs proposals.path: R-CNN's .mat file, or a "
                              "pattern with {split} (e.g. .../selective_search_data/voc_2007_{split}.mat)")
        if self.source == "selective_search" and self.path:
            raise ConfigError(f"proposals.path={self.path!r} is set but proposals.source=selective_search; "
                              "to read R-CNN's boxes: proposals=file proposals.path=...")
        if not self.ks or min(self.ks) <= 0:
            raise ConfigError(f"proposals.ks={list(self.ks)}; expected positive segmentation thresholds")
        bad = [c for c in self.color_spaces if c not in COLOR_SPACES]
        if bad or not self.color_spaces:
            raise ConfigError(f"proposals.color_spaces={list(self.color_spaces)}; expected a non-empty "
                              f"list of {list(COLOR_SPACES)}")
        bad_parts = [s for s in self.strategies
                     if not 1 <= len(s) <= 4 or len(set(s)) < len(s) or set(s) - set(STRATEGY_PARTS)]
        if bad_parts or not self.strategies:
            raise ConfigError(f"proposals.strategies={[list(s) for s in self.strategies]}; expected a "
                              "non-empty list of strategies, each 1-4 distinct parts of "
                              f"{list(STRATEGY_PARTS)}")
        if self.max_boxes is not None and self.max_boxes < 1:
            raise ConfigError(f"proposals.max_boxes={self.max_boxes}; expected null (no cap) or >= 1")

    def key(self) -> str:
        return stable_hash({**asdict(self), "ranking": "seeded", "version": CACHE_VERSION})

    def file_for(self, split: str) -> Path:
        """The .mat file holding ``split``'s boxes: ``path`` with ``{split}`` filled in, or in a
        folder ``path``, R-CNN's name ``voc_2007_<split>.mat``."""
        path = Path(str(self.path).replace("{split}", split))
        return path / f"voc_2007_{split}.mat" if path.is_dir() else path


#: OpenCV-contrib's ``switchToSelectiveSearchFast()`` in these settings (its k 150, 300, 450; min segment 100)
OPENCV_FAST = dict(ks=(150, 300, 450), min_segment=100)


@dataclass(frozen=True)
class ProposalSource:
    """Settings plus where and how selective search is cached and run (``conf/proposals``)."""

    settings: ProposalSettings = field(default_factory=ProposalSettings)
    cache_dir: Path | None = None
    workers: int = 2
    compute_missing: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, **defaults: Any) -> ProposalSource:
        """From the ``conf/proposals`` mapping: ``cache_dir``, ``workers``, ``compute_missing``
        and the ``ProposalSettings`` fields (``defaults`` fill what it leaves out)."""
        d = {**defaults, **dict(cfg or {})}
        extra = {k: d.pop(k) for k in ("cache_dir", "workers", "compute_missing") if k in d}
        known = ProposalSettings.__dataclass_fields__
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"proposals: unknown key(s) {unknown}; expected "
                              f"{sorted([*known, 'cache_dir', 'workers', 'compute_missing'])}")
        cache = extra.get("cache_dir")
        return cls(ProposalSettings(**d), Path(cache) if cache else None, int(extra.get("workers", 2)),
                   bool(extra.get("compute_missing", True)))

    def check(self, images: Sequence[Any], split: str) -> None:
        """Raise before any work if the file source does not cover ``images`` (no-op otherwise)."""
        if self.settings.source == "file":
            read_proposal_file(self.settings.file_for(split), images, max_boxes=self.settings.max_boxes)

    def boxes(self, images: Sequence[Any], split: str, *, progress: bool = True,
              skip_corrupt: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
        """Proposals of ``images`` (``VOCImage``s) of ``split`` and the ids skipped as corrupt."""
        s = self.settings
        if s.source == "file":
            return read_proposal_file(s.file_for(split), images, max_boxes=s.max_boxes), []
        if self.cache_dir is None:
            raise ConfigError("proposals.cache_dir is not set; expected the selective-search cache folder")
        return compute_proposals([(im.image_id, im.path) for im in images], self.cache_dir, s,
                                 workers=self.workers, progress=progress,
                                 compute_missing=self.compute_missing, skip_corrupt=skip_corrupt,
                                 with_skipped=True)


# ------------------------------------------------------------------ selective search (OpenCV)

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


def _color_image(bgr: np.ndarray, space: str) -> np.ndarray:
    """The image in one of R-CNN's colour types (as OpenCV's quality mode builds them)."""
    import cv2

    if space == "hsv":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    if space == "lab":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)
    if space == "h":
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[:, :, 0])
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    if space == "intensity":
        return gray
    return np.ascontiguousarray(np.dstack([bgr[:, :, 2], bgr[:, :, 1], gray]))  # rgi: r, g, intensity


def selective_search(image: np.ndarray, settings: ProposalSettings) -> np.ndarray:
    """Proposals of one RGB uint8 image as float32 ``[N,4]`` half-open boxes, ranked."""
    import cv2

    seg = cv2.ximgproc.segmentation
    parts = {"color": seg.createSelectiveSearchSegmentationStrategyColor,
             "fill": seg.createSelectiveSearchSegmentationStrategyFill,
             "texture": seg.createSelectiveSearchSegmentationStrategyTexture,
             "size": seg.createSelectiveSearchSegmentationStrategySize}
    cv2.setNumThreads(1)
    cv2.setRNGSeed(settings.seed)
    _seed_c_rand(settings.seed)
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # OpenCV wants BGR
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    for space in settings.color_spaces:
        ss.addImage(_color_image(bgr, space))
    for k in settings.ks:
        min_segment = k if settings.min_segment is None else settings.min_segment
        ss.addGraphSegmentation(seg.createGraphSegmentation(settings.sigma, float(k), int(min_segment)))
    for strategy in settings.strategies:
        ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(*[parts[p]() for p in strategy]))
    rects = ss.process().reshape(-1, 4).astype(np.float32)  # x, y, w, h (duplicates removed)
    keep = (rects[:, 2] >= settings.min_size) & (rects[:, 3] >= settings.min_size)
    rects = rects[keep][: settings.max_boxes]
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def _compute_one(job: tuple[str, str, str, ProposalSettings, bool]) -> tuple[str, bool]:
    """Compute and cache one image's boxes: ``(image_id, done)``; not done = skipped as corrupt."""
    image_id, image_path, out_path, settings, skip_corrupt = job
    try:
        image = load_rgb(image_path)
    except CorruptImageError as e:
        if not skip_corrupt:
            raise
        log.warning("selective search: skipping corrupt image (data.skip_corrupt=true): %s", e)
        return image_id, False
    boxes = selective_search(image, settings)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.save(f, boxes)
    return image_id, True


def cache_folder(cache_dir: str | Path, settings: ProposalSettings) -> Path:
    return Path(cache_dir) / f"ss_{settings.key()}"


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
                      progress: bool = True, compute_missing: bool = True, skip_corrupt: bool = False,
                      with_skipped: bool = False) -> Any:
    """Selective-search proposals for ``(image_id, image_path)`` pairs, computing the missing ones
    in parallel (``compute_missing=False``: a DataError naming the images without cached
    proposals). An image that cannot be decoded raises CorruptImageError, or with
    ``skip_corrupt`` is logged and left out. Returns ``{id: boxes}``, or with ``with_skipped``
    ``({id: boxes}, skipped ids)``."""
    if settings.source != "selective_search":
        raise ConfigError(f"compute_proposals runs selective search; proposals.source={settings.source!r}")
    folder = cache_folder(cache_dir, settings)
    files = {i: folder / f"{i}_{files_fingerprint([p])[:10]}.npy" for i, p in images}
    missing = [(i, str(p), str(files[i]), settings, skip_corrupt) for i, p in images
               if not files[i].exists()]
    if missing and not compute_missing:
        names = ", ".join(job[0] for job in missing[:5])
        raise DataError(f"{len(missing)} of {len(images)} images have no cached proposals in {folder} "
                        f"(first: {names}); expected one <id>_<stamp>.npy per image, or allow "
                        "computing them (proposals.compute_missing=true)")
    skipped: list[str] = []
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        log.info("selective search on %d of %d images (cache %s)", len(missing), len(images), folder)
        from tqdm import tqdm

        bar = tqdm(total=len(missing), desc="selective search", disable=not progress, unit="img")
        if workers > 1 and len(missing) > 1:
            with mp.get_context("spawn").Pool(workers) as pool:
                for image_id, done in pool.imap_unordered(_compute_one, missing, chunksize=4):
                    skipped += [] if done else [image_id]
                    bar.update()
        else:
            for job in missing:
                image_id, done = _compute_one(job)
                skipped += [] if done else [image_id]
                bar.update()
        bar.close()
    if skipped:
        left_out = set(skipped)
        skipped = [i for i, _ in images if i in left_out]  # in the split's order
        log.warning("selective search: %d corrupt image(s) skipped (data.skip_corrupt=true): %s",
                    len(skipped), ", ".join(skipped[:10]))
    out = {i: load_cached(files[i]) for i, _ in images if i not in set(skipped)}
    return (out, skipped) if with_skipped else out


# ------------------------------------------------------------------ R-CNN's .mat files

def _is_hdf5(path: Path) -> bool:
    """A MATLAB v7.3 file: HDF5, its signature after a 512-byte user block (or at the start)."""
    with open(path, "rb") as f:
        head = f.read(520)
    return any(head[o:o + 8] == b"\x89HDF\r\n\x1a\n" for o in (0, 512))


def _cells_scipy(path: Path) -> tuple[list[Any], list[Any]] | None:
    """``(images, boxes)`` cells of a v5/v7 file; None for a v7.3 (HDF5) file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["images", "boxes"])
    except NotImplementedError:  # scipy: "Please use HDF reader for matlab v7.3 files"
        return None
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"proposals file {path}: cannot read it as a MATLAB file ({e}); expected "
                        "R-CNN's selective_search_data/voc_2007_<split>.mat") from e
    missing = [k for k in ("images", "boxes") if k not in mat]
    if missing:
        raise DataError(f"proposals file {path} has no variable(s) {missing}; expected cell arrays "
                        "'images' (image ids) and 'boxes' (per image [N, 4] 1-based [y1 x1 y2 x2])")
    return list(np.asarray(mat["images"], dtype=object).ravel(order="F")), \
        list(np.asarray(mat["boxes"], dtype=object).ravel(order="F"))


def _cells_hdf5(path: Path) -> tuple[list[Any], list[Any]]:
    """``(images, boxes)`` cells of a MATLAB v7.3 (HDF5) file: MATLAB stores arrays transposed."""
    try:
        import h5py
    except ImportError as e:
        raise DataError(f"proposals file {path} is a MATLAB v7.3 (HDF5) file; reading it needs h5py "
                        "(pip install h5py), or save it as v7 in MATLAB (save(..., '-v7'))") from e
    with h5py.File(path, "r") as f:
        missing = [k for k in ("images", "boxes") if k not in f]
        if missing:
            raise DataError(f"proposals file {path} has no variable(s) {missing}; expected cell arrays "
                            "'images' and 'boxes'")

        def cells(name: str) -> list[Any]:
            refs = f[name][()]
            if refs.dtype != h5py.ref_dtype:
                raise DataError(f"proposals file {path}: {name!r} is not a cell array (HDF5 dtype "
                                f"{refs.dtype}); expected one cell per image")
            return [_hdf5_value(f[r]) for r in refs.T.ravel()]

        return cells("images"), cells("boxes")


def _hdf5_value(ds: Any) -> Any:
    data = ds[()]
    cls = ds.attrs.get("MATLAB_class", b"")
    cls = cls.decode() if isinstance(cls, bytes) else str(cls)
    if cls == "char":
        return "".join(map(chr, np.asarray(data).T.ravel()))
    if ds.attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 4))
    return np.asarray(data).T


@functools.lru_cache(maxsize=2)
def _read_cells(path: str, stamp: str) -> tuple[list[Any], list[Any]]:
    """The file's cells, read once per process and file version (``stamp``): fine-tuning checks
    the file when it is configured and reads it again for its windows."""
    p = Path(path)
    return _cells_hdf5(p) if _is_hdf5(p) else _cells_scipy(p) or _cells_hdf5(p)


def _image_id(cell: Any) -> str:
    value = np.asarray(cell).ravel()
    return str(value[0]) if value.size == 1 else "".join(map(str, value))


def read_proposal_file(path: str | Path, images: Sequence[Any], *,
                       max_boxes: int | None = None) -> dict[str, np.ndarray]:
    """R-CNN's boxes of ``images`` (``VOCImage``s) from ``path``, as 0-based half-open float32
    ``[x1, y1, x2, y2)`` in the file's order (see the module doc). DataError naming the file and
    the image for a missing file or image id, a box array that is not ``[N, 4]``, or a box not
    inside its image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"proposals file {path} does not exist; expected R-CNN's "
                        "selective_search_data/voc_2007_<split>.mat (proposals.path)")
    ids, boxes = _read_cells(str(path), files_fingerprint([path]))
    if len(ids) != len(boxes):
        raise DataError(f"proposals file {path}: {len(ids)} image ids but {len(boxes)} box arrays; "
                        "expected one per image")
    index = {_image_id(c): n for n, c in enumerate(ids)}
    absent = [im.image_id for im in images if im.image_id not in index]
    if absent:
        raise DataError(f"proposals file {path} does not cover the split: {len(absent)} of {len(images)} "
                        f"images have no boxes (first: {', '.join(absent[:5])}); expected every image "
                        "id of the split in its 'images' cell")
    out = {}
    for im in images:
        out[im.image_id] = _convert(boxes[index[im.image_id]], path, im)[:max_boxes]
    return out


def _convert(cell: Any, path: Path, im: Any) -> np.ndarray:
    raw = np.asarray(cell)
    if raw.size == 0:
        return np.zeros((0, 4), np.float32)
    if raw.ndim != 2 or raw.shape[1] != 4 or not np.issubdtype(raw.dtype, np.number):
        raise DataError(f"proposals file {path}: boxes of image {im.image_id} have shape {raw.shape} "
                        f"({raw.dtype}); expected [N, 4] numbers, 1-based [y1 x1 y2 x2]")
    y1, x1, y2, x2 = (raw[:, j].astype(np.float64) for j in range(4))
    bad = ~((x1 >= 1) & (y1 >= 1) & (x2 <= im.width) & (y2 <= im.height) & (x1 <= x2) & (y1 <= y2))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DataError(f"proposals file {path}: image {im.image_id} box {j + 1} [y1 x1 y2 x2] = "
                        f"{raw[j].tolist()} is not inside the {im.width}x{im.height} image "
                        f"({int(bad.sum())} such boxes); expected 1 <= x1 <= x2 <= {im.width} and "
                        f"1 <= y1 <= y2 <= {im.height}")
    return np.stack([x1 - 1, y1 - 1, x2, y2], axis=1).astype(np.float32)
