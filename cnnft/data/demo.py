"""Deterministic generator of the demo data, written in the real ImageNet and VOC2007 layouts.

(Over 400 lines with this docstring: the design below and the drawing code that implements it
are read together; a change to the drawing bumps ``GENERATOR_VERSION``, which keys the data.)

Design: the class of an object is in the *arrangement* of its parts, never in its colour or
texture, so that a network has to learn shapes and their spatial composition, as on real images.

* **Parts.** A vocabulary of :data:`PARTS` (disc, square, triangle, bar, ...) shared by every
  class and by the background.
* **Classes are compositions.** A class (:class:`Composition`) is a body part with an aspect ratio
  plus 2-3 attached parts, each of a given shape and size at one of 8 directions on the body's
  rim, pointing outward. Parts overlap the body, so an object is one connected silhouette (large
  and easy to segment: the issue's trial showed a 1/4-width CaffeNet learns nothing in minutes
  from scattered, small parts). Two classes never share a composition, up to mirroring.
* **Appearance is drawn per instance from pools shared by all classes:** one colour
  (:data:`COLORS`, jittered) and one texture (:data:`TEXTURES`) for the whole object, with a
  second pool colour on some parts; so colour and texture histograms carry no class information.
* **Pose varies per instance:** mirror (a class includes both chiralities, so training's mirror
  augmentation keeps classes apart), rotation within +-25 degrees, scale, aspect (x0.8-1.25),
  part sizes (x0.85-1.15) and directions (+-10 degrees). Objects are occluded by later objects and
  by clutter drawn on top, and truncated by the frame.
* **Backgrounds** are low-saturation blobs and lines with loose parts of the same vocabulary,
  colours and textures, scattered without arrangement, so parts alone do not reveal the class;
  fewer and smaller than the objects (again for a narrow net that must learn in minutes).
* **ImageNet-like classes** (wnid ``n{c:08d}``) are compositions of the same vocabulary, one
  object per image filling 45-90% of the side, so pretraining has parts and arrangements to
  learn. Fewer classes with more images each than real ImageNet, to fit the demo's budget.
* **The 20 VOC-like classes** are further compositions, none of them a pretraining class (as VOC's
  classes are not ImageNet's), 1..``max_objects`` per image.
* **VOC-like images carry their class as a whole (v4).** Each image has one dominant object, of
  the class the image surely shows: drawn last (on top), near the centre, at the scale of the
  ImageNet-like objects once both are warped to the square network input (body radius 0.6-1.0 x
  sqrt(W H)/4, as 0.6-1.0 x side/4 in the square ImageNet-like images): it spans about half the
  image or more. In :data:`VOC_SINGLE` of the images it is alone; otherwise 1..``max_objects - 1`` smaller
  objects (0.25-0.45 x sqrt(W H)/4) lie behind it, anywhere. Clutter is sparser than in pretraining
  images: 0-2 small loose parts, and a loose part on top in 15% of the images. Why: real VOC
  images mostly show one large object (about half of VOC07's images hold a single object), and
  the whole-image probe (one warped image, one SVM per class, ~10-20 positives per class) can
  only see a class that fills the image. Generator v3 drew every object at 25-80% of that size,
  1-3 per image over up to 4 parts of clutter: the largest box covered 11% of the image on
  average and every network, random or pretrained, and the low-level control were at chance
  (13-15 mAP) on image classification while GT-box classification worked. The ImageNet-like
  images are unchanged from v3 (same bytes), so networks pretrained on v3 stay valid.

Every image is seeded from (seed, split, index), so the output bytes depend only on the
:class:`DemoSpec`, not on scheduling or on the number of worker processes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from cnnft.data.voc import VOC_CLASSES
from cnnft.errors import ConfigError, DataError
from cnnft.hashing import stable_hash

GENERATOR_VERSION = 4
MANIFEST = "demo.json"


def _circle(
    radius: float = 1.0, center: tuple[float, float] = (0.0, 0.0), n: int = 48
) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t)], axis=1)


# Each part is a list of (polygon in unit coordinates, pointing along +x, fill value): 255 paints,
# 0 cuts a hole.
PARTS: dict[str, list[tuple[np.ndarray, int]]] = {
    "disc": [(_circle(), 255)],
    "square": [(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) * 0.8, 255)],
    "triangle": [(_circle(n=3), 255)],
    "ring": [(_circle(), 255), (_circle(0.5), 0)],
    "bar": [(np.array([(-1, -0.35), (1, -0.35), (1, 0.35), (-1, 0.35)]), 255)],
    "diamond": [(np.array([(1, 0), (0, 0.6), (-1, 0), (0, -0.6)]), 255)],
    "half": [(_circle(n=48)[np.r_[36:48, 0:13]] * [1, 1] - [0.4, 0], 255)],  # half disc, arc at +x
    "hexagon": [(_circle(n=6), 255)],
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 225), "yellow": (235, 215, 40),
    "magenta": (205, 50, 205), "cyan": (40, 205, 215), "orange": (245, 135, 30),
    "white": (238, 238, 238),
}  # fmt: skip
# Textures are drawn in image axes and all are invariant under horizontal flips (up to phase).
_PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "solid": lambda u, v: np.ones((1, 1), bool),
    "vstripes": lambda u, v: u % 1 < 0.5,
    "hstripes": lambda u, v: v % 1 < 0.5,
    "checker": lambda u, v: (u % 1 < 0.5) == (v % 1 < 0.5),
    "dots": lambda u, v: (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 > 0.09,
}
TEXTURES: tuple[str, ...] = tuple(_PATTERNS)
_DIRECTIONS = 8  # attachment directions on the body's rim, 45 degrees apart
#: Share of VOC-like images whose dominant object is alone (v4; see the module doc).
VOC_SINGLE = 0.6
MAX_IMAGENET_CLASSES = 200


@dataclass(frozen=True)
class DemoSpec:
    """Settings of the demo data; sizes are (width, height) in pixels."""

    seed: int = 0
    imagenet_classes: int = 20
    imagenet_train_per_class: int = 200
    imagenet_val_per_class: int = 10
    imagenet_size: tuple[int, int] = (184, 184)  # like Caffe's 256x256 warp, scaled to the demo net
    voc_trainval: int = 200
    voc_test: int = 200
    # ((min W, max W), (min H, max H)), both inclusive
    voc_size_range: tuple[tuple[int, int], tuple[int, int]] = ((160, 240), (120, 180))
    max_objects: int = 3
    jpeg_quality: int = 90


DEFAULT_SPEC = DemoSpec()


class Attachment(NamedTuple):
    """A part attached to the body's rim: shape, direction (0..7, x 45 degrees), size ratio."""

    part: str
    direction: int
    size: float


class Composition(NamedTuple):
    """A class: a body part (aspect = width/height) and the parts attached to it."""

    body: str
    aspect: float
    attachments: tuple[Attachment, ...]

    def signature(self) -> tuple:
        """What identifies the class, the same for its mirror image (directions reflected)."""
        def sig(mirror: bool) -> tuple:
            dirs = [((4 - a.direction) % 8 if mirror else a.direction) for a in self.attachments]
            return (self.body, tuple(sorted((a.part, d) for a, d in zip(self.attachments, dirs))))
        return min(sig(False), sig(True))

    def describe(self) -> str:
        parts = ", ".join(f"{a.part} at {45 * a.direction} deg" for a in self.attachments)
        return f"{self.body} body (aspect {self.aspect:.2f}) with {parts}"


@dataclass(frozen=True)
class _Plan:
    """Compositions of the ImageNet-like classes and of the VOC classes."""

    spec: DemoSpec
    imagenet: tuple[Composition, ...]
    voc: tuple[Composition, ...]


class _Object(NamedTuple):
    """A rendered VOC object; box is 0-based half-open ``[x1, y1, x2, y2)``."""

    label: int
    box: tuple[int, int, int, int]
    difficult: bool
    truncated: bool


def _validate(spec: DemoSpec) -> None:
    """ConfigError naming the first out-of-range field of ``spec``."""
    (wlo, whi), (hlo, hhi) = spec.voc_size_range
    checks = {
        "imagenet_classes": 1 <= spec.imagenet_classes <= MAX_IMAGENET_CLASSES,
        "imagenet_train_per_class": spec.imagenet_train_per_class >= 1,
        "imagenet_val_per_class": spec.imagenet_val_per_class >= 1,
        "imagenet_size": min(spec.imagenet_size) >= 32,
        "voc_trainval": spec.voc_trainval >= 2,
        "voc_test": spec.voc_test >= 1,
        "voc_size_range": 64 <= wlo <= whi and 64 <= hlo <= hhi,
        "max_objects": spec.max_objects >= 1,
        "jpeg_quality": 1 <= spec.jpeg_quality <= 100,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(
            f"DemoSpec.{bad[0]}={getattr(spec, bad[0])!r} is out of range; expected counts >= 1 "
            f"(voc_trainval >= 2), imagenet_classes <= {MAX_IMAGENET_CLASSES}, "
            "image sides >= 32 (VOC >= 64) with lo <= hi, jpeg_quality in 1..100"
        )


def _random_composition(rng: np.random.Generator) -> Composition:
    names = list(PARTS)
    body = names[int(rng.integers(len(names)))]
    aspect = float(rng.choice([1.0, 1.5, 0.67]))
    count = int(rng.integers(2, 4))
    directions = rng.choice(_DIRECTIONS, size=count, replace=False)
    attachments = tuple(
        Attachment(names[int(rng.integers(len(names)))], int(d), float(rng.uniform(0.4, 0.65)))
        for d in sorted(directions)
    )
    return Composition(body, aspect, attachments)


def _make_plan(spec: DemoSpec) -> _Plan:
    """Distinct random compositions (up to mirroring): ImageNet-like classes first, then VOC's."""
    rng = np.random.default_rng([spec.seed, 7])
    seen: set[tuple] = set()
    comps: list[Composition] = []
    while len(comps) < spec.imagenet_classes + len(VOC_CLASSES):
        comp = _random_composition(rng)
        if comp.signature() not in seen:
            seen.add(comp.signature())
            comps.append(comp)
    n = spec.imagenet_classes
    return _Plan(spec, tuple(comps[:n]), tuple(comps[n:]))


def spec_hash(spec: DemoSpec) -> str:
    """Hash of the spec and the generator version; identical hashes mean identical data."""
    return stable_hash({"version": GENERATOR_VERSION, "spec": asdict(spec)}, length=64)


# ---------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Random low-saturation background with low-contrast blobs and lines (uint8 [H, W, 3])."""
    base = np.clip(rng.uniform(60, 190) + rng.normal(0, 18, 3), 0, 255)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = base.astype(np.uint8)
    side = min(width, height)
    for _ in range(rng.integers(5, 12)):
        center = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        axes = (int(rng.uniform(0.05, 0.35) * side), int(rng.uniform(0.05, 0.35) * side))
        colour = np.clip(base + rng.normal(0, 22, 3), 0, 255).tolist()
        cv2.ellipse(img, center, axes, rng.uniform(0, 180), 0, 360, colour, -1, cv2.LINE_AA)
    for _ in range(rng.integers(2, 8)):
        p1 = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        p2 = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        colour = np.clip(base + rng.normal(0, 30, 3), 0, 255).tolist()
        cv2.line(img, p1, p2, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def _pattern(texture: str, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """1 where ``texture`` shows the main colour, 0 where it shows the dark one.

    ``v`` ([H, 1]) and ``u`` ([1, W]) are row and column coordinates in texture periods.
    """
    return np.broadcast_to(_PATTERNS[texture](u, v), (v.shape[0], u.shape[1])).astype(np.float32)


class _Piece(NamedTuple):
    """A part placed in the image: shape, centre (x, y), radius, angle (rad), x-stretch."""

    part: str
    center: tuple[float, float]
    radius: float
    angle: float
    stretch: float = 1.0


def _outline(piece: _Piece, poly: np.ndarray) -> np.ndarray:
    """A part polygon in image coordinates: stretched along its axis, rotated, scaled, moved."""
    c, s = np.cos(piece.angle), np.sin(piece.angle)
    pts = poly * [piece.stretch, 1.0]
    return np.asarray(piece.center) + piece.radius * pts @ np.array([[c, s], [-s, c]])


def _raster(pieces: list[_Piece], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage (uint8 [H, W]) of the union of ``pieces`` and its outline points."""
    mask = np.zeros((height, width), np.uint8)
    points = []
    for piece in pieces:
        for poly, value in PARTS[piece.part]:
            pts = _outline(piece, poly)
            cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], value, cv2.LINE_AA, shift=4)
            points.append(pts)
    return mask, np.concatenate(points)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A colour of the shared pool with per-instance brightness and hue jitter."""
    names = list(COLORS)
    base = np.array(COLORS[names[int(rng.integers(len(names)))]], dtype=float)
    return np.clip(base * rng.uniform(0.8, 1.1) + rng.normal(0, 14, 3), 0, 255)


def _paint(img: np.ndarray, rng: np.random.Generator, mask: np.ndarray, points: np.ndarray,
           colour: np.ndarray, texture: str, scale: float) -> tuple[bool, tuple[int, int, int, int]]:
    """Blend ``colour`` with ``texture`` into ``img`` where ``mask`` covers it (in place).

    Returns whether the shape extends past the frame, and the painted region.
    """
    height, width = img.shape[:2]
    lo, hi = points.min(axis=0), points.max(axis=0)
    truncated = bool(lo[0] < -0.5 or lo[1] < -0.5 or hi[0] > width - 0.5 or hi[1] > height - 0.5)
    x0, y0 = min(max(int(lo[0]) - 1, 0), width), min(max(int(lo[1]) - 1, 0), height)
    x1, y1 = max(min(int(hi[0]) + 2, width), x0), max(min(int(hi[1]) + 2, height), y0)
    period = max(scale / rng.uniform(2.5, 4.5), 3.0)
    offset = rng.uniform(0, period, 2)
    v = (np.arange(y0, y1, dtype=np.float32)[:, None] + offset[1]) / period
    u = (np.arange(x0, x1, dtype=np.float32)[None, :] + offset[0]) / period
    pattern = _pattern(texture, v, u)[..., None]
    paint = pattern * colour + (1 - pattern) * (0.4 * colour)
    alpha = mask[y0:y1, x0:x1, None].astype(np.float32) / 255
    region = img[y0:y1, x0:x1]
    region[:] = np.round(region * (1 - alpha) + paint * alpha).astype(np.uint8)
    return truncated, (x0, y0, x1, y1)


def _texture(rng: np.random.Generator) -> str:
    return TEXTURES[int(rng.integers(len(TEXTURES)))]


def _pieces(comp: Composition, rng: np.random.Generator, center: tuple[float, float],
            radius: float) -> list[_Piece]:
    """The parts of one instance of ``comp``: body radius ``radius`` (its longer half-axis) at
    ``center``, mirrored, rotated and jittered at random."""
    mirror = bool(rng.integers(2))
    turn = np.deg2rad(rng.uniform(-25, 25))
    aspect = comp.aspect * rng.uniform(0.8, 1.25)
    rx, ry = (radius, radius / aspect) if aspect >= 1 else (radius * aspect, radius)
    # every part is symmetric about its axis, so the mirror image of the body is a half turn
    body = _Piece(comp.body, center, ry, turn + (np.pi if mirror else 0.0), rx / ry)
    pieces = [body]
    rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    for att in comp.attachments:
        theta = np.deg2rad(45 * att.direction + rng.uniform(-10, 10))
        if mirror:
            theta = np.pi - theta
        rim = rot @ np.array([rx * np.cos(theta), ry * np.sin(theta)]) * 0.9
        size = att.size * rng.uniform(0.85, 1.15) * max(rx, ry)
        angle = np.arctan2(rim[1], rim[0])
        pos = (center[0] + rim[0] + 0.55 * size * np.cos(angle),
               center[1] + rim[1] + 0.55 * size * np.sin(angle))
        pieces.append(_Piece(att.part, pos, size, angle))
    return pieces


def _draw_object(img: np.ndarray, rng: np.random.Generator, comp: Composition,
                 center: tuple[float, float], radius: float) -> tuple[np.ndarray, bool]:
    """Paint one instance of ``comp`` (one colour and texture, some parts in a second colour).

    Returns its coverage mask (uint8 [H, W]) and whether it extends past the frame.
    """
    height, width = img.shape[:2]
    pieces = _pieces(comp, rng, center, radius)
    texture, main = _texture(rng), _colour(rng)
    mask, points = _raster(pieces, height, width)
    truncated, _ = _paint(img, rng, mask, points, main, texture, radius)
    for piece in pieces[1:]:
        if rng.uniform() < 0.3:  # a part in a second pool colour (same for the whole object)
            part_mask, part_points = _raster([piece], height, width)
            _paint(img, rng, part_mask, part_points, _colour(rng), texture, radius)
    return mask, truncated


def _draw_loose_part(img: np.ndarray, rng: np.random.Generator, size: tuple[float, float]) -> np.ndarray:
    """A clutter part: random shape, place, angle, colour and texture; returns its mask."""
    height, width = img.shape[:2]
    names = list(PARTS)
    radius = rng.uniform(*size) * min(width, height) / 2
    piece = _Piece(names[int(rng.integers(len(names)))],
                   (rng.uniform(0, width), rng.uniform(0, height)), radius,
                   rng.uniform(0, 2 * np.pi), rng.uniform(0.7, 1.4))
    mask, points = _raster([piece], height, width)
    _paint(img, rng, mask, points, _colour(rng), _texture(rng), radius)
    return mask


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add sensor-like Gaussian noise."""
    noise = rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(3, 8)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _render_imagenet(plan: _Plan, class_index: int, rng: np.random.Generator) -> np.ndarray:
    """One ImageNet-like image: one class object over 0-2 loose parts, sometimes an occluder."""
    width, height = plan.spec.imagenet_size
    img = _background(rng, width, height)
    for _ in range(rng.integers(0, 3)):
        _draw_loose_part(img, rng, (0.08, 0.2))
    side = min(width, height)
    radius = rng.uniform(0.6, 1.0) * side / 4  # the whole object spans about 3-4 body radii
    center = (rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height)
    _draw_object(img, rng, plan.imagenet[class_index], center, radius)
    if rng.uniform() < 0.25:
        _draw_loose_part(img, rng, (0.08, 0.2))
    return _finish(img, rng)


def _voc_object(label: int, covered: np.ndarray, visible: np.ndarray, truncated: bool) -> _Object:
    """Box of the in-frame coverage; difficult if under 20 px or more than half occluded."""
    ys, xs = np.nonzero(covered)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    small = min(box[2] - box[0], box[3] - box[1]) < 20
    occluded = visible.sum() < 0.5 * covered.sum()
    return _Object(label, box, bool(small or occluded), truncated)


def _render_voc(plan: _Plan, rng: np.random.Generator, sure_label: int) -> tuple[np.ndarray, list[_Object]]:
    """One VOC-like image: one dominant object of class ``sure_label`` (drawn last, near the centre,
    at the ImageNet-like objects' scale), alone in :data:`VOC_SINGLE` of the images, else over
    1..max_objects-1 smaller objects; 0-2 small loose parts below, sometimes one on top."""
    (wlo, whi), (hlo, hhi) = plan.spec.voc_size_range
    width, height = int(rng.integers(wlo, whi + 1)), int(rng.integers(hlo, hhi + 1))
    img = _background(rng, width, height)
    for _ in range(rng.integers(0, 3)):
        _draw_loose_part(img, rng, (0.05, 0.12))
    owner = np.full((height, width), -1, np.int16)
    drawn = []
    single = plan.spec.max_objects == 1 or rng.uniform() < VOC_SINGLE
    count = 1 if single else int(rng.integers(2, plan.spec.max_objects + 1))
    # radii in units of sqrt(W * H) / 4: warped to the square network input, the dominant object
    # then has the size of an ImageNet-like one (whose radius is 0.6-1.0 x side / 4)
    side = float(np.sqrt(width * height))
    for k in range(count):
        last = k == count - 1
        label = sure_label if last else int(rng.integers(len(plan.voc)))
        spread = (0.35, 0.65) if last else (0.1, 0.9)
        center = (rng.uniform(*spread) * width, rng.uniform(*spread) * height)
        radius = rng.uniform(*((0.6, 1.0) if last else (0.25, 0.45))) * side / 4
        mask, truncated = _draw_object(img, rng, plan.voc[label], center, radius)
        covered = mask >= 128
        owner[covered] = k
        drawn.append((label, covered, truncated))
    if rng.uniform() < 0.15:
        owner[_draw_loose_part(img, rng, (0.05, 0.12)) >= 128] = -1
    objects = [
        _voc_object(lab, cov, owner == k, tr) for k, (lab, cov, tr) in enumerate(drawn) if cov.any()
    ]
    return _finish(img, rng), objects


# ---------------------------------------------------------------- files


def _annotation_xml(image_id: str, width: int, height: int, objects: list[_Object]) -> bytes:
    """VOC2007-style annotation with 1-based inclusive boxes."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "cnnft demo"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        x1, y1, x2, y2 = obj.box
        values = (("name", VOC_CLASSES[obj.label]), ("pose", "Unspecified"),
                  ("truncated", int(obj.truncated)), ("difficult", int(obj.difficult)))  # fmt: skip
        for key, value in values:
            ET.SubElement(node, key).text = str(value)
        bndbox = ET.SubElement(node, "bndbox")
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, key).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Write a file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class _Task(NamedTuple):
    """One image to render: split code (0/1 ImageNet train/val, 2 VOC), index, class (for VOC:
    the class it surely shows), output."""

    split: int
    index: int
    class_index: int
    path: Path


def _run_task(plan: _Plan, task: _Task) -> list[_Object] | None:
    """Render and write one image (and its annotation for VOC); returns the VOC objects."""
    rng = np.random.default_rng([plan.spec.seed, task.split, task.index])
    if task.split < 2:
        _write(
            task.path, _jpeg(_render_imagenet(plan, task.class_index, rng), plan.spec.jpeg_quality)
        )
        return None
    img, objects = _render_voc(plan, rng, task.class_index)
    _write(task.path, _jpeg(img, plan.spec.jpeg_quality))
    xml = _annotation_xml(task.path.stem, img.shape[1], img.shape[0], objects)
    _write(task.path.parent.parent / "Annotations" / f"{task.path.stem}.xml", xml)
    return objects


def _wnid(class_index: int) -> str:
    return f"n{class_index:08d}"


def _imagenet_tasks(spec: DemoSpec, root: Path) -> list[_Task]:
    """One task per ImageNet-like image; indices are unique within a split."""
    counts = (("train", spec.imagenet_train_per_class), ("val", spec.imagenet_val_per_class))
    return [
        _Task(code, c * n + i, c, root / split / _wnid(c) / f"{_wnid(c)}_{i:04d}.JPEG")
        for code, (split, n) in enumerate(counts)
        for c in range(spec.imagenet_classes)
        for i in range(n)
    ]


def _voc_ids(spec: DemoSpec) -> dict[str, list[str]]:
    """Disjoint, interleaved trainval/test ids and a train/val split of trainval."""
    rng = np.random.default_rng([spec.seed, 3])
    n = spec.voc_trainval + spec.voc_test
    ids = [f"{i:06d}" for i in range(1, n + 1)]
    order = rng.permutation(n)
    trainval = sorted(ids[i] for i in order[: spec.voc_trainval])
    half = rng.permutation(spec.voc_trainval)[: spec.voc_trainval // 2]
    train = sorted(trainval[i] for i in half)
    return {
        "train": train,
        "val": sorted(set(trainval) - set(train)),
        "trainval": trainval,
        "test": sorted(ids[i] for i in order[spec.voc_trainval :]),
    }


def _image_label(objects: list[_Object], label: int) -> int:
    """Devkit label: 1 if a non-difficult object of ``label``, 0 if only difficult ones, else -1."""
    flags = [o.difficult for o in objects if o.label == label]
    return -1 if not flags else (0 if all(flags) else 1)


def _write_image_sets(
    voc_root: Path, splits: dict[str, list[str]], objects: dict[str, list[_Object]]
) -> None:
    """Write ``<split>.txt`` and the devkit's ``<class>_<split>.txt`` (1, 0: difficult only, -1)."""
    main = voc_root / "ImageSets" / "Main"
    for split, ids in splits.items():
        _write(main / f"{split}.txt", "".join(f"{i}\n" for i in ids).encode())
        for c, name in enumerate(VOC_CLASSES):
            lines = [f"{i} {_image_label(objects[i], c):2d}\n" for i in ids]
            _write(main / f"{name}_{split}.txt", "".join(lines).encode())


def _manifest(spec: DemoSpec, plan: _Plan) -> dict:
    return {
        "generator": f"cnnft.data.demo v{GENERATOR_VERSION}",
        "spec": asdict(spec),
        "spec_hash": spec_hash(spec),
        "imagenet_classes": {_wnid(c): comp.describe() for c, comp in enumerate(plan.imagenet)},
        "voc_classes": {name: comp.describe() for name, comp in zip(VOC_CLASSES, plan.voc)},
    }


def _manifest_matches(root: Path, spec: DemoSpec) -> bool:
    """True if ``root`` holds demo data generated from ``spec``."""
    try:
        return json.loads((root / MANIFEST).read_text()).get("spec_hash") == spec_hash(spec)
    except (OSError, ValueError, AttributeError):
        return False


def _render_all(plan: _Plan, tasks: list[_Task], progress: bool) -> list[list[_Object] | None]:
    """Run the tasks, on 2 worker processes when there are many; results in task order."""
    run = partial(_run_task, plan)
    workers = min(2, os.cpu_count() or 1) if len(tasks) >= 200 else 1
    bar = partial(tqdm, total=len(tasks), desc="demo data", unit="img", disable=not progress)
    if workers == 1:
        return list(bar(map(run, tasks)))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(bar(pool.imap(run, tasks, chunksize=16)))


def _build(tmp: Path, spec: DemoSpec, progress: bool) -> None:
    """Write the whole demo tree into the empty folder ``tmp``."""
    plan = _make_plan(spec)
    voc_root = tmp / "VOC2007"
    splits = _voc_ids(spec)
    voc_ids = sorted(splits["trainval"] + splits["test"])
    # the n-th image of each of trainval and test surely shows class n mod 20, so every class
    # has positives in both splits once a split has 20 images
    position = {i: n for split in ("trainval", "test") for n, i in enumerate(splits[split])}
    voc_tasks = [_Task(2, int(i), position[i] % len(VOC_CLASSES), voc_root / "JPEGImages" / f"{i}.jpg")
                 for i in voc_ids]
    results = _render_all(plan, _imagenet_tasks(spec, tmp / "imagenet") + voc_tasks, progress)
    objects = dict(zip(voc_ids, results[-len(voc_tasks) :]))
    _write_image_sets(voc_root, splits, objects)
    _write(
        tmp / MANIFEST,
        (json.dumps(_manifest(spec, plan), indent=1, sort_keys=True) + "\n").encode(),
    )


def generate_demo(
    root: str | Path, spec: DemoSpec = DEFAULT_SPEC, *, progress: bool = True
) -> dict[str, Path]:
    """Generate the demo data under ``root`` (atomically) unless it is already there.

    Returns ``{"imagenet_root": root/"imagenet", "voc_root": root/"VOC2007"}``. Raises DataError if
    ``root`` exists, is not empty and was not generated from ``spec``.
    """
    root = Path(root)
    paths = {"imagenet_root": root / "imagenet", "voc_root": root / "VOC2007"}
    if _manifest_matches(root, spec):
        return paths
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"demo root {root} exists but its {MANIFEST} is missing or was made from another "
            "DemoSpec; expected an empty or absent folder (or demo data of the same spec); "
            "remove it or choose another root"
        )
    _validate(spec)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        _build(tmp, spec, progress)
        os.replace(tmp, root)  # atomic; also replaces an empty root folder
    except OSError:
        if not _manifest_matches(root, spec):  # a concurrent run may have finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
