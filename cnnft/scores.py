"""Per-test-item scores next to the results: what a bootstrap over test images needs.

``results/<analysis>_scores.npz`` (compressed numpy, written atomically, read without pickle):

* probes (``probe_cls``, ``probe_gtbox``; ``lowlevel_control`` with a ``<task>/`` prefix on every
  key): ``image_ids`` [I] (the test images), ``image_index`` [N] (the image of each item: one
  per image, or one per ground-truth box), ``labels`` and ``ignore`` bool [N, 20], and one
  ``scores/<layer>/<ablation>`` float32 [N, 20] of SVM decision values per probe;
* ``detection``: ``image_ids`` [I], ``positives`` int32 [I, 20] (non-difficult objects per
  image and class) and per ``<layer>/<ablation>`` the detections left after NMS and the
  test-set cap, matched as the devkit does, ignored ones (matched to a difficult object)
  left out: ``det/<key>/score`` float32, ``det/<key>/tp`` bool, ``det/<key>/image`` int32,
  ``det/<key>/cls`` int16.

:mod:`cnnft.bootstrap` turns either into one ranking per class.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnft.bootstrap import ClassRanking, detection_rankings, probe_rankings
from cnnft.errors import DataError
from cnnft.io import atomic_path

SUFFIX = "_scores.npz"


def scores_path(results_dir: Path, analysis: str) -> Path:
    return Path(results_dir) / f"{analysis}{SUFFIX}"


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` as one compressed ``.npz``, atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, **arrays)
    return Path(path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickled objects); DataError naming a missing or broken file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read score file {path}: {e}; expected an .npz written by "
                        "cnnft.scores") from e


def _get(arrays: Mapping[str, np.ndarray], key: str, source: object) -> np.ndarray:
    if key not in arrays:
        raise DataError(f"score file {source} has no array {key!r}; it has {sorted(arrays)[:8]}")
    return arrays[key]


@dataclass
class ProbeScores:
    """One probe's test items and the decision values of each (layer/ablation) probe on them."""

    image_ids: list[str]
    image_index: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        out = {f"{prefix}image_ids": np.asarray(self.image_ids, dtype=str),
               f"{prefix}image_index": np.asarray(self.image_index, dtype=np.int32),
               f"{prefix}labels": np.asarray(self.labels, bool),
               f"{prefix}ignore": np.asarray(self.ignore, bool)}
        out.update({f"{prefix}scores/{k}": np.asarray(v, dtype=np.float32) for k, v in self.scores.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "",
                    source: object = "") -> ProbeScores:
        head = f"{prefix}scores/"
        return cls([str(i) for i in _get(arrays, f"{prefix}image_ids", source)],
                   _get(arrays, f"{prefix}image_index", source), _get(arrays, f"{prefix}labels", source),
                   _get(arrays, f"{prefix}ignore", source),
                   {k[len(head):]: v for k, v in arrays.items() if k.startswith(head)})

    def rankings(self, key: str) -> list[ClassRanking]:
        """One ranking per class of probe ``key`` (``<layer>/<ablation>``, or a feature set)."""
        if key not in self.scores:
            raise DataError(f"no probe scores {key!r}; saved: {sorted(self.scores)}")
        return probe_rankings(self.scores[key], self.labels, self.ignore, self.image_index,
                              len(self.image_ids))


@dataclass
class DetectionScores:
    """Matched test detections of each (layer/ablation) detector and the objects per image."""

    image_ids: list[str] = field(default_factory=list)
    positives: np.ndarray | None = None
    detections: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def add(self, key: str, image_ids: Sequence[str], matched: Sequence) -> None:
        """``matched``: per class, ``cnnft.detection.evaluation.MatchedDetections``."""
        self.image_ids = list(image_ids)
        self.positives = np.stack([m.positives for m in matched], axis=1).astype(np.int32)
        self.detections[key] = {
            "score": np.concatenate([m.scores for m in matched]).astype(np.float32),
            "tp": np.concatenate([m.tp for m in matched]).astype(bool),
            "image": np.concatenate([m.image for m in matched]).astype(np.int32),
            "cls": np.concatenate([np.full(len(m.scores), k, dtype=np.int16) for k, m in enumerate(matched)])}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"image_ids": np.asarray(self.image_ids, dtype=str),
               "positives": np.asarray(self.positives, dtype=np.int32)}
        out.update({f"det/{k}/{f}": v for k, d in self.detections.items() for f, v in d.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], source: object = "") -> DetectionScores:
        dets: dict[str, dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            if k.startswith("det/"):
                key, _, name = k[4:].rpartition("/")
                dets.setdefault(key, {})[name] = v
        return cls([str(i) for i in _get(arrays, "image_ids", source)], _get(arrays, "positives", source),
                   dets)

    def rankings(self, key: str) -> list[ClassRanking]:
        if key not in self.detections:
            raise DataError(f"no detection scores {key!r}; saved: {sorted(self.detections)}")
        d = self.detections[key]
        return detection_rankings(d["score"], d["tp"], d["image"], d["cls"], self.positives)
